"""All2All with uneven splits, the one collective the sharded lookup is made of.

gloo rejects list-form ``all_to_all`` with uneven sizes, so the counts travel first in an
equal-size ``all_to_all_single`` and the payload follows with explicit split sizes; the same two
calls work on NCCL and HCCL. With one rank (or no process group) the exchange is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["exchange_counts", "all_to_all_uneven"]


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def exchange_counts(send_counts: torch.Tensor, group=None) -> torch.Tensor:
    """Tell every rank how many items it will receive from each peer (``send_counts[r]`` go to rank r)."""
    if _world(group) == 1:
        return send_counts.clone()
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv


def all_to_all_uneven(
    tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None
) -> torch.Tensor:
    """Send ``tensor``'s first ``send_counts[0]`` rows to rank 0, the next to rank 1, ... ."""
    if _world(group) == 1:
        return tensor.clone()
    out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts, group=group)
    return out
