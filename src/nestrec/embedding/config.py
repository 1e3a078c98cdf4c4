"""What an embedding table is: its name, size, the features that look it up, and how they pool."""

from __future__ import annotations

from dataclasses import dataclass, field

from nestrec.errors import ConfigError

__all__ = ["EmbeddingTableConfig", "POOLINGS"]

POOLINGS = ("sum", "mean", "none")


@dataclass(frozen=True)
class EmbeddingTableConfig:
    """One table. ``features`` look it up (a table may serve several features, e.g. a user's
    history and the candidate item); ``pooling='none'`` keeps one vector per id (sequences)."""

    name: str
    num_rows: int
    dim: int
    features: tuple[str, ...] = field(default=())
    pooling: str = "sum"

    def __post_init__(self) -> None:
        if self.num_rows <= 0 or self.dim <= 0:
            raise ConfigError(
                f"table {self.name!r}: num_rows and dim must be positive, got {self.num_rows} x {self.dim}"
            )
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"table {self.name!r}: pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}"
            )
        object.__setattr__(self, "features", tuple(self.features) or (self.name,))

    @classmethod
    def from_config(cls, name: str, spec) -> EmbeddingTableConfig:
        spec = dict(spec)
        return cls(
            name=name,
            num_rows=int(spec["num_rows"]),
            dim=int(spec["dim"]),
            features=tuple(spec.get("features", ())),
            pooling=spec.get("pooling", "sum"),
        )
