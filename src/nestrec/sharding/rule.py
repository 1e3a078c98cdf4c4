"""Row-wise sharding rules: which rank owns a row, and where the row sits in the owner's shard.

Both rules are closed-form (no per-row index maps), so tables of any size cost nothing to shard:

* ``range``: contiguous blocks; the first ``num_rows % world_size`` ranks hold one row more.
  Keeps id locality (an id and its neighbours share an owner).
* ``cyclic``: ``owner = id mod world_size``, ``slot = id div world_size``: a stable hash that
  spreads consecutive (often similarly popular) ids over every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nestrec.errors import ConfigError

__all__ = ["RowWiseSharding", "SHARDING_MODES"]

SHARDING_MODES = ("range", "cyclic")


@dataclass(frozen=True)
class RowWiseSharding:
    num_rows: int
    world_size: int
    mode: str = "range"

    def __post_init__(self) -> None:
        if self.mode not in SHARDING_MODES:
            raise ConfigError(
                f"unknown sharding mode {self.mode!r}; expected one of {', '.join(SHARDING_MODES)}"
            )
        if self.world_size < 1:
            raise ConfigError(f"world size must be at least 1, got {self.world_size}")
        # Tables smaller than the world (e.g. gender) are fine: the last ranks hold empty shards.

    # -- shard geometry --------------------------------------------------------------------------
    def shard_size(self, rank: int) -> int:
        base, extra = divmod(self.num_rows, self.world_size)
        return base + (1 if rank < extra else 0)

    def shard_offset(self, rank: int) -> int:
        """First global row of ``rank``'s block (range mode)."""
        base, extra = divmod(self.num_rows, self.world_size)
        return rank * base + min(rank, extra)

    def global_ids(self, rank: int) -> torch.Tensor:
        """Global row ids held by ``rank``, in local-slot order."""
        if self.mode == "range":
            start = self.shard_offset(rank)
            return torch.arange(start, start + self.shard_size(rank), dtype=torch.long)
        return torch.arange(min(rank, self.num_rows), self.num_rows, self.world_size, dtype=torch.long)

    # -- per-id lookups ----------------------------------------------------------------------------
    def owner(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "cyclic":
            return ids % self.world_size
        base, extra = divmod(self.num_rows, self.world_size)
        boundary = extra * (base + 1)  # rows below this sit in the larger, first `extra` blocks
        big = ids // (base + 1)
        small = extra + (ids - boundary) // max(base, 1)
        return torch.where(ids < boundary, big, small)

    def local_index(self, ids: torch.Tensor) -> torch.Tensor:
        if self.mode == "cyclic":
            return ids // self.world_size
        owners = self.owner(ids)
        base, extra = divmod(self.num_rows, self.world_size)
        offsets = owners * base + torch.clamp(owners, max=extra)
        return ids - offsets
