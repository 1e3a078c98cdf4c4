"""The recommendation service without HTTP: resolve a request, batch it, decode, describe the items.

Kept apart from :mod:`nestrec.serve.app` so the request path can be reasoned about (and timed)
without the web framework; the app only maps exceptions to status codes.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
from pydantic import BaseModel

from nestrec.serve.artifact import Artifact
from nestrec.serve.batching import MicroBatcher
from nestrec.serve.engine import Query, Ranked, Recommender
from nestrec.serve.instructions import InstructionSource
from nestrec.serve.metrics import ServiceMetrics
from nestrec.serve.resolve import resolve
from nestrec.serve.schema import RecommendedItem, RecommendResponse
from nestrec.serve.settings import ServeSettings

__all__ = ["Service"]

ROUTES = ("/v1/recommend", "/v1/model", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")


class Service:
    def __init__(self, artifact: Artifact, instructions: InstructionSource, settings: ServeSettings):
        self.artifact, self.instructions, self.settings = artifact, instructions, settings
        self.recommender = Recommender(artifact)
        self.metrics = ServiceMetrics(
            ROUTES,
            {
                "model_version": artifact.model_version,
                "registry_version": artifact.registry.version,
                "device": str(self.recommender.device),
            },
        )
        self.batcher: MicroBatcher[Query, Ranked] = MicroBatcher(
            self.recommender.recommend,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            cost=lambda query: query.beam,
            max_cost=settings.max_batch_beams,
            on_batch=self.metrics.observe_batch,
        )
        self.metrics.gauge("nestrec_queue_depth", "Requests waiting for a batch.", lambda: self.batcher.depth)
        self.metrics.gauge(
            "nestrec_users_with_instruction",
            "Users with a cached reasoning instruction.",
            lambda: self.instructions.users_with_instruction,
        )
        self.ready = False
        self.warm_up_error: str | None = None
        self._refresher: asyncio.Task | None = None
        self._warm_task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.batcher.start()
        self._refresher = asyncio.create_task(self._refresh_instructions(), name="nestrec-cri-refresh")
        # Keep a reference: the event loop holds tasks only weakly.
        self._warm_task = asyncio.create_task(self._warm_up(), name="nestrec-warm-up")

    async def stop(self) -> None:
        for task in (self._refresher, self._warm_task):
            if task is not None:
                task.cancel()
        await self.batcher.stop()

    async def _warm_up(self) -> None:
        """One decode per scenario (and the text encoder) before /readyz says yes."""
        art = self.artifact
        history = art.histories[0].cpu().numpy() if art.num_users else np.zeros(0, np.int64)
        queries = [
            Query(
                history=history[history > 0],
                profile=np.zeros(art.profiles.shape[1], np.int64),
                scenario=index,
                k=1,
                beam=int(art.serving["beam"][name]),
                trigger_item=1 if name == "related" else 0,
                trigger_genre=0 if name == "channel" and art.genres else -1,
            )
            for index, name in enumerate(art.scenarios)
        ]
        try:
            await asyncio.to_thread(self.instructions.warm_up)
            await self.batcher.call(lambda: self.recommender.recommend(queries))
        except Exception as err:
            self.warm_up_error = f"warm-up failed: {type(err).__name__}: {err}"
            print(f"nestrec.serve: {self.warm_up_error}", flush=True)
            return
        self.ready = True

    async def _refresh_instructions(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.settings.cri_refresh_s))
            try:
                await asyncio.to_thread(self.instructions.maybe_reload)
            except Exception as err:  # keep serving the previous snapshot
                print(
                    f"nestrec.serve: instruction cache reload failed, keeping the last one: {err}", flush=True
                )

    # -- the request path -----------------------------------------------------------------------------
    async def recommend(self, request: BaseModel) -> RecommendResponse:
        started = time.perf_counter()
        resolved = resolve(request, self.artifact, self.instructions)
        deadline_s = (request.deadline_ms or self.settings.deadline_ms) / 1000
        if resolved.query_text is not None:  # a repeated query is a dictionary hit; a new one is encoded
            known = self.instructions.known_query(resolved.query_text)
            resolved.query.reasoning = (
                known
                if known is not None
                else await asyncio.to_thread(self.instructions.encode_query, resolved.query_text)
            )
        remaining = deadline_s - (time.perf_counter() - started)
        ranked, batch_size = await self.batcher.submit(resolved.query, remaining)
        items = self.artifact.items
        return RecommendResponse(
            user=resolved.user,
            scenario=request.scenario,
            k=resolved.query.k,
            beam=resolved.query.beam,
            items=[
                RecommendedItem(
                    item=i,
                    item_id=items[i].item_id,
                    title=items[i].title,
                    year=items[i].year,
                    genres=list(items[i].genres),
                    score=round(s, 6),
                )
                for i, s in zip(ranked.items, ranked.scores)
            ],
            cold_start=resolved.cold_start,
            history_source=resolved.history_source,
            instruction=resolved.instruction,
            model_version=self.artifact.model_version,
            batch_size=batch_size,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
        )
