"""Batched inference: resolved queries in, ranked item ids and scores out.

This is the same decoding as :meth:`OxygenPretrainModule.recommend` (encode once, then
trie-constrained beam search one SID level at a time) without the LightningModule around it, so
the service, the benchmark's in-process bound and the tests all exercise one code path. A batch
may mix scenarios, users and K freely; queries are grouped by beam width, since one beam search
runs at one width.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from nestrec.oxygen.decoding import constrained_beam_search, items_from_beams
from nestrec.oxygen.shared_memory_decoder import SharedMemoryDecoder
from nestrec.serve.artifact import Artifact

__all__ = ["Query", "Ranked", "Recommender"]


@dataclass
class Query:
    """One request after validation, in the model's vocabulary (ids, indices, vectors)."""

    history: np.ndarray  # item ids, oldest first (any length; the model reads the newest history_len)
    profile: np.ndarray  # [fields] int64, 0 = unknown
    scenario: int  # index into the artifact's scenario list
    k: int
    beam: int
    trigger_item: int = 0  # 0 = none
    trigger_genre: int = -1  # -1 = none; else the channel's genre index (restricts candidates)
    reasoning: np.ndarray | None = None  # [text_dim] float32; None = the learned default instruction
    exclude_history: bool = False  # never recommend an item of ``history`` (all of it) or ``seen``
    seen: np.ndarray | None = None  # more items to exclude with exclude_history (a known user's full record)


@dataclass
class Ranked:
    items: list[int]
    scores: list[float]


class Recommender:
    """Runs queries through an artifact's model on the artifact's device.

    ``shared_memory=True`` decodes with :class:`~nestrec.oxygen.shared_memory_decoder.SharedMemoryDecoder`
    (encoder keys/values projected once per request, not once per beam); ``False`` is the
    reference decoding of ``OxygenPretrainModule.recommend``, kept for comparison.
    """

    def __init__(self, artifact: Artifact, shared_memory: bool = True):
        self.artifact = artifact
        self.model = artifact.model
        self.device = next(self.model.parameters()).device
        self.decoder = SharedMemoryDecoder(self.model) if shared_memory else None

    def _batch(self, queries: list[Query]) -> dict[str, torch.Tensor]:
        art, n = self.artifact, len(queries)
        length = art.history_len
        history = np.zeros((n, length), dtype=np.int64)
        for row, q in enumerate(queries):
            tail = q.history[-length:]
            if len(tail):
                history[row, length - len(tail) :] = tail
        reasoning = np.zeros((n, art.text_dim), dtype=np.float32)
        for row, q in enumerate(queries):
            if q.reasoning is not None:
                reasoning[row] = q.reasoning
        fields = art.profiles.shape[1]
        profile = np.stack([q.profile for q in queries]) if fields else np.zeros((n, 0), np.int64)
        arrays = {
            "history": history,
            "scenario": np.array([q.scenario for q in queries], np.int64),
            "trigger_item": np.array([q.trigger_item for q in queries], np.int64),
            "trigger_genre": np.array([q.trigger_genre for q in queries], np.int64),
            "reasoning": reasoning,
            "profile": profile.astype(np.int64),
        }
        return {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}

    def _item_mask(self, queries: list[Query]) -> torch.Tensor | None:
        """Candidate pool per row: a channel's genre and/or everything but the history; None = all.

        The history mask is built from the query's whole history (and ``seen``), not from the
        model's window (``_batch``): an item older than the newest ``history_len`` is still history.
        """
        if not any(q.trigger_genre >= 0 or q.exclude_history for q in queries):
            return None
        mask = torch.ones(len(queries), self.artifact.num_items + 1, dtype=torch.bool, device=self.device)
        mask[:, 0] = False
        for row, q in enumerate(queries):
            if q.trigger_genre >= 0:
                mask[row] &= self.artifact.genre_item_mask[q.trigger_genre]
            if q.exclude_history:
                for items in (q.history, q.seen):
                    if items is not None and len(items):
                        index = torch.as_tensor(np.asarray(items), dtype=torch.long, device=self.device)
                        mask[row, index] = False
        return mask

    @torch.inference_mode()
    def _run_group(self, queries: list[Query], beam: int) -> list[Ranked]:
        batch = self._batch(queries)
        mask = self._item_mask(queries)
        model = self.model
        encoded = model.encode(batch)
        if self.decoder is not None:
            prepared = self.decoder.prepare(encoded)

            def step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
                return self.decoder.next_logits(prepared, rows, prefix)

        else:

            def step(rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
                return model.next_logits({k: v[rows] for k, v in encoded.items()}, prefix)

        result = constrained_beam_search(step, len(queries), self.artifact.trie, beam, mask)
        items, scores = items_from_beams(result, self.artifact.trie, max(q.k for q in queries), mask)
        out = []
        for row, q in enumerate(queries):
            keep = items[row, : q.k] > 0
            out.append(Ranked(items[row, : q.k][keep].tolist(), scores[row, : q.k][keep].tolist()))
        return out

    def recommend(self, queries: list[Query]) -> list[Ranked]:
        """Ranked items per query, in query order (best first, at most ``k`` each)."""
        groups: dict[int, list[int]] = defaultdict(list)
        for index, q in enumerate(queries):
            groups[q.beam].append(index)
        out: list[Ranked | None] = [None] * len(queries)
        for beam, indices in groups.items():
            for index, ranked in zip(indices, self._run_group([queries[i] for i in indices], beam)):
                out[index] = ranked
        return out  # type: ignore[return-value]
