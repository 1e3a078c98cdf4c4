"""Host-memory master store of one table shard (weights + optimizer state), the paper's
hierarchical storage: the full shard lives in host DRAM (pinned when an accelerator is used) and
only the rows a batch needs travel to the device, as a working buffer.

Keeping reads (``gather``) and write-backs (``write_back``) as the only two doors to the master
copy is what lets the pipelines add dual buffers and write-back ordering without reshaping this.
"""

from __future__ import annotations

import torch

from nestrec.sharding.optim import RowWiseOptimizer

__all__ = ["ShardStore"]


class ShardStore:
    def __init__(self, weight: torch.Tensor, optimizer: RowWiseOptimizer, pin_memory: bool = False):
        self.weight = weight.pin_memory() if pin_memory else weight
        self.state = {name: optimizer.init_state(name, self.weight) for name in optimizer.state_names}
        if pin_memory:
            self.state = {k: v.pin_memory() for k, v in self.state.items()}
        self.step = 0

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    def gather(self, local_index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Copy the requested rows into a working buffer on ``device``."""
        return self._gather(self.weight, local_index, device)

    def gather_state(self, local_index: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: self._gather(v, local_index, device) for k, v in self.state.items()}

    @staticmethod
    def _gather(source: torch.Tensor, local_index: torch.Tensor, device: torch.device) -> torch.Tensor:
        index = local_index.to(source.device)
        if source.device == device or not source.is_pinned():
            return source.index_select(0, index).to(device)
        # Host shard, device buffer: gather into pinned staging so the copy is asynchronous
        # (the caching host allocator keeps the staging alive until the copy has run).
        staging = torch.empty((len(index), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
        torch.index_select(source, 0, index, out=staging)
        return staging.to(device, non_blocking=True)

    def write_back(
        self, local_index: torch.Tensor, rows: torch.Tensor, state: dict[str, torch.Tensor]
    ) -> None:
        """Store updated rows (and their state rows) into the master copy."""
        index = local_index.to(self.weight.device)
        self.weight.index_copy_(0, index, rows.to(self.weight.device))
        for name, values in state.items():
            self.state[name].index_copy_(0, index, values.to(self.weight.device))
