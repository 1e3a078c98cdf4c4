"""Request and response models of the recommendation API (FastAPI publishes them as OpenAPI).

The request model is built per artifact (:func:`request_model`): the scenario and genre enums, the
item-id range and the K / beam limits are the artifact's, so the published schema is exactly what
the service accepts and a client (or a fuzzer) can read the limits instead of guessing them.
Field-level problems (types, ranges, unknown fields, malformed JSON) are rejected by pydantic
with 422; rules that span fields (a channel needs a genre, K <= beam, ...) are checked when the
request is resolved, also with 422.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

__all__ = [
    "ErrorResponse",
    "RecommendResponse",
    "RecommendedItem",
    "ValidationErrorResponse",
    "request_model",
    "MAX_HISTORY",
    "MAX_QUERY_CHARS",
    "MAX_DEADLINE_MS",
    "MAX_USER",
]

MAX_HISTORY = 1000  # items a request may send (the model reads only the newest history_len)
MAX_QUERY_CHARS = 512
MAX_DEADLINE_MS = 60_000
MAX_USER = 2**31 - 1


def request_model(
    scenarios: list[str], genres: list[str], num_items: int, max_k: int, max_beam: int
) -> type[BaseModel]:
    """The ``RecommendRequest`` model for one artifact."""
    item = Annotated[int, Field(ge=1, le=num_items)]
    scenario_type = Literal[tuple(scenarios)]  # type: ignore[valid-type]
    genre_type = Literal[tuple(genres)] if genres else str  # type: ignore[valid-type]
    fields: dict[str, Any] = {
        "scenario": (
            scenario_type,
            Field(description="Which surface asks: " + ", ".join(scenarios) + "."),
        ),
        "user": (
            int | None,
            Field(
                None,
                ge=0,
                le=MAX_USER,
                description="nestrec user index (the key of the training data and of the instruction cache). "
                "Unknown users take the cold-start path; omit for an anonymous request.",
            ),
        ),
        "history": (
            list[item] | None,
            Field(
                None,
                max_length=MAX_HISTORY,
                description="Item ids, oldest first. Replaces the user's stored history when given.",
            ),
        ),
        "trigger_item": (
            item | None,
            Field(
                None, description="related only: the item being viewed (default: the newest history item)."
            ),
        ),
        "genre": (
            genre_type | None,
            Field(None, description="channel only (required): the channel's genre."),
        ),
        "query": (
            str | None,
            Field(
                None,
                min_length=1,
                max_length=MAX_QUERY_CHARS,
                description="search only (required): the query text; it is the reasoning instruction.",
            ),
        ),
        "k": (int | None, Field(None, ge=1, le=max_k, description="Items to return (default per scenario).")),
        "beam": (
            int | None,
            Field(None, ge=1, le=max_beam, description="Beam width (default per scenario); must be >= k."),
        ),
        "exclude_history": (bool, Field(False, description="Never recommend an item from the history.")),
        "use_instruction": (
            bool,
            Field(
                True, description="Use the user's cached reasoning instruction (false: the learned default)."
            ),
        ),
        "deadline_ms": (
            int | None,
            Field(
                None,
                ge=1,
                le=MAX_DEADLINE_MS,
                description="Answer within this many ms or get 504 (default: the service's deadline).",
            ),
        ),
    }
    return create_model(
        "RecommendRequest",
        __config__=ConfigDict(
            extra="forbid", json_schema_extra={"examples": [{"user": 1, "scenario": scenarios[0]}]}
        ),
        **fields,
    )


class RecommendedItem(BaseModel):
    item: int = Field(description="nestrec item index (1..N)")
    item_id: str = Field(description="the dataset's own item id")
    title: str
    year: int | None
    genres: list[str]
    score: float = Field(description="log-probability of the item's semantic ID under beam search")


class RecommendResponse(BaseModel):
    user: int | None
    scenario: str
    k: int
    beam: int
    items: list[RecommendedItem]
    cold_start: bool = Field(description="true when neither a known user nor a history was given")
    history_source: Literal["request", "stored", "none"]
    instruction: Literal["query", "cached", "default"] = Field(
        description="where the reasoning instruction came from"
    )
    model_version: str
    batch_size: int = Field(description="requests that shared this forward pass (micro-batching)")
    latency_ms: float = Field(description="time spent inside the service")


class ErrorResponse(BaseModel):
    detail: str


class ValidationErrorResponse(BaseModel):
    message: str = Field(description="the first problem, in one line")
    detail: list[dict[str, Any]]
