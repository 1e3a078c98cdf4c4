"""From a validated request to a model :class:`~nestrec.serve.engine.Query`: fill in what the client
did not send (stored history and profile, the scenario's default K and beam, the trigger, the
instruction) and reject requests that are well-formed but meaningless (422).

Cold start (documented in docs/serving.md): a user the artifact does not know, with no history in
the request, is served from the profile token alone: unknown profile values, an empty history and
the cached instruction if the slow-thinking cache has one for that id, else the learned default.
The model was trained with short and empty histories, so this is its own prior over the catalogue
for the scenario, not an error. ``related`` still needs an item to relate to.

``exclude_history`` removes every item of the history in use, not only the newest ``history_len``
the model reads: all of a request's ``history`` (up to 1,000 items), or for a known user without
one, every item they interacted with before export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from nestrec.serve.artifact import Artifact
from nestrec.serve.engine import Query
from nestrec.serve.instructions import InstructionSource

__all__ = ["RequestError", "Resolved", "resolve"]


class RequestError(ValueError):
    """A well-formed request the service cannot answer as asked (HTTP 422); the message says why."""


@dataclass
class Resolved:
    query: Query
    user: int | None
    cold_start: bool
    history_source: str  # request | stored | none
    instruction: str  # query | cached | default
    query_text: str | None  # search: still to be encoded into query.reasoning


def _scenario_rules(req: BaseModel) -> None:
    scenario = req.scenario
    if scenario == "channel" and req.genre is None:
        raise RequestError("scenario 'channel' needs a genre (the channel being browsed)")
    if scenario != "channel" and req.genre is not None:
        raise RequestError(f"genre is only meaningful for scenario 'channel', not {scenario!r}")
    if scenario == "search" and (req.query is None or not req.query.strip()):
        raise RequestError("scenario 'search' needs a non-blank query")
    if scenario != "search" and req.query is not None:
        raise RequestError(f"query is only meaningful for scenario 'search', not {scenario!r}")
    if scenario != "related" and req.trigger_item is not None:
        raise RequestError(f"trigger_item is only meaningful for scenario 'related', not {scenario!r}")


def resolve(req: BaseModel, artifact: Artifact, instructions: InstructionSource) -> Resolved:
    """Raise :class:`RequestError` for a meaningless request, else build its :class:`Query`."""
    _scenario_rules(req)
    serving = artifact.serving
    beam = req.beam if req.beam is not None else int(serving["beam"][req.scenario])
    k = req.k if req.k is not None else min(int(serving["k"][req.scenario]), beam)
    if k > beam:
        raise RequestError(f"k ({k}) must not exceed beam ({beam}): beam search returns at most beam items")

    known = req.user is not None and req.user < artifact.num_users
    if req.history is not None:
        history, source = np.asarray(req.history, dtype=np.int64), "request"
    elif known:
        stored = artifact.histories[req.user]
        history, source = stored[stored > 0].cpu().numpy(), "stored"
    else:
        history, source = np.zeros(0, dtype=np.int64), "none"
    cold_start = not known and req.history is None
    profile = (
        artifact.profiles[req.user].cpu().numpy()
        if known
        else np.zeros(artifact.profiles.shape[1], dtype=np.int64)
    )

    trigger_item, trigger_genre = 0, -1
    if req.scenario == "related":
        trigger_item = req.trigger_item or (int(history[-1]) if len(history) else 0)
        if not trigger_item:
            raise RequestError("scenario 'related' needs trigger_item or a non-empty history to relate to")
    if req.scenario == "channel":
        if not artifact.genres:
            raise RequestError(
                "scenario 'channel' is not available: this artifact's catalogue has no genres to browse"
            )
        if req.genre not in artifact.genres:  # the schema enumerates them; this guards other callers
            raise RequestError(f"unknown genre {req.genre!r}; known: {', '.join(artifact.genres)}")
        trigger_genre = artifact.genres.index(req.genre)

    reasoning, instruction, query_text = None, "default", None
    if req.scenario == "search":
        instruction, query_text = "query", req.query
    elif req.use_instruction:
        reasoning = instructions.cached(req.user)
        instruction = "cached" if reasoning is not None else "default"

    query = Query(
        history=history,
        profile=profile,
        scenario=artifact.scenarios.index(req.scenario),
        k=k,
        beam=beam,
        trigger_item=trigger_item,
        trigger_genre=trigger_genre,
        reasoning=reasoning,
        exclude_history=req.exclude_history,
        # A known user's stored history is cut to the model's window; exclude everything they saw.
        seen=artifact.seen(req.user) if req.exclude_history and source == "stored" else None,
    )
    return Resolved(query, req.user, cold_start, source, instruction, query_text)
