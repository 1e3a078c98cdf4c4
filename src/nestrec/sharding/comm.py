"""The collectives the sharded lookup is made of, plus an opt-in injected-latency shim.

gloo rejects list-form ``all_to_all`` with uneven sizes, so the counts travel first in an
equal-size ``all_to_all_single`` and the payload follows with explicit split sizes; the same two
calls work on NCCL and HCCL. With one rank (or no process group) the exchange is the identity.

The **latency shim** exists because a 2-core loopback box has no network worth hiding: on CPU a
gloo All2All costs a memcpy, so overlap cannot show. With ``set_latency_shim(alpha_ms, gbps)``
every collective here costs ``alpha + bytes / bandwidth`` more — the cost model of the design
brief (§8) — less whatever work the caller did between starting it and waiting for it, and
sleeping releases the GIL, so a collective issued from a lane thread, or started asynchronously
and waited later, really does overlap compute on the main thread, as it would on a NIC. Off by default; benchmarks
that use it say so in their output. ``COMM_BYTES`` counts payload bytes per channel either way.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "COMM_BYTES",
    "LatencyShim",
    "PendingExchange",
    "PendingMean",
    "all_to_all_uneven",
    "exchange_counts",
    "get_latency_shim",
    "group_device",
    "set_latency_shim",
    "start_all_reduce_mean",
    "start_all_to_all_uneven",
    "start_exchange_counts",
]


EMBEDDING_CHANNELS = ("counts", "keys", "rows", "grads")


@dataclass(frozen=True)
class LatencyShim:
    """Per-call latency (seconds) and bandwidth (bytes per second) added to the shimmed channels."""

    alpha_s: float
    bytes_per_s: float
    channels: tuple[str, ...] = EMBEDDING_CHANNELS

    def delay(self, nbytes: int) -> float:
        return self.alpha_s + nbytes / self.bytes_per_s


_shim: LatencyShim | None = None
_bytes_lock = threading.Lock()
COMM_BYTES: Counter = Counter()  # channel name -> payload bytes sent by this process


def set_latency_shim(
    alpha_ms: float | None, gbps: float = 10.0, channels: tuple[str, ...] = EMBEDDING_CHANNELS
) -> None:
    """Turn the shim on (``alpha_ms`` per call, ``gbps`` gigabits/s) or off (``None``).

    By default only the embedding channels (key routing, rows, gradients) are shimmed: they are
    what the pipelines schedule; the dense all-reduce keeps its real cost in every mode.
    """
    global _shim
    _shim = None if alpha_ms is None else LatencyShim(alpha_ms / 1e3, gbps * 1e9 / 8, tuple(channels))


def get_latency_shim() -> LatencyShim | None:
    return _shim


def _account(channel: str, nbytes: int) -> float | None:
    """Count the payload; under the shim, return when the modelled network would deliver it."""
    with _bytes_lock:
        COMM_BYTES[channel] += nbytes
    if _shim is not None and channel in _shim.channels:
        return time.perf_counter() + _shim.delay(nbytes)
    return None


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_device(group, compute_device: torch.device) -> torch.device:
    """Where a collective's tensors must live on ``group``: host memory for gloo (and without a
    process group), the compute device for device backends (NCCL, HCCL); ``None`` is the world."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else torch.device(compute_device)


class PendingExchange:
    """An All2All in flight; ``wait()`` returns what arrived.

    Under the latency shim the modelled network time runs from the start, so work done between
    start and wait hides it, as it would hide a NIC's transfer (``wait`` sleeps only the rest).
    """

    def __init__(self, out: torch.Tensor, work=None, ready_at: float | None = None):
        self.out, self.work, self.ready_at = out, work, ready_at

    def wait(self) -> torch.Tensor:
        called = time.perf_counter()
        if self.work is not None:
            self.work.wait()
            self.work = None
        _sleep_rest(self.ready_at, called)
        self.ready_at = None
        return self.out


def _sleep_rest(ready_at: float | None, called: float) -> None:
    """The shim's modelled transfer, less only the work the caller did between start and wait.

    Time spent *blocked* in the real collective (e.g. waiting for a late peer) is not credited:
    the modelled bytes cannot arrive before the peer has sent them, so a blocking call costs
    real + modelled, and a call started early costs what of the modelled time is left.
    """
    if ready_at is not None and (remaining := ready_at - called) > 0:
        time.sleep(remaining)


def start_exchange_counts(send_counts: torch.Tensor, group=None, channel: str = "counts") -> PendingExchange:
    """Start telling every rank how many items it will receive from each peer (``send_counts[r]``
    go to rank r)."""
    if _world(group) == 1:
        return PendingExchange(send_counts.clone())
    recv = torch.empty_like(send_counts)
    work = dist.all_to_all_single(recv, send_counts, group=group, async_op=True)
    return PendingExchange(recv, work, _account(channel, send_counts.numel() * send_counts.element_size()))


def exchange_counts(send_counts: torch.Tensor, group=None, channel: str = "counts") -> torch.Tensor:
    """:func:`start_exchange_counts`, waited."""
    return start_exchange_counts(send_counts, group, channel).wait()


def start_all_to_all_uneven(
    tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None, channel: str = "a2a"
) -> PendingExchange:
    """Start sending ``tensor``'s first ``send_counts[0]`` rows to rank 0, the next to rank 1, ... ."""
    if _world(group) == 1:
        return PendingExchange(tensor.clone())
    out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
    work = dist.all_to_all_single(
        out, tensor.contiguous(), recv_counts, send_counts, group=group, async_op=True
    )
    return PendingExchange(out, work, _account(channel, tensor.numel() * tensor.element_size()))


def all_to_all_uneven(
    tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int], group=None, channel: str = "a2a"
) -> torch.Tensor:
    """:func:`start_all_to_all_uneven`, waited."""
    return start_all_to_all_uneven(tensor, send_counts, recv_counts, group, channel).wait()


class PendingMean:
    """An all-reduce in flight; ``wait()`` lands the averaged values in the original tensors."""

    def __init__(
        self, tensors: list[torch.Tensor], flat: torch.Tensor | None, work, world: int, ready_at=None
    ):
        self.tensors, self.flat, self.work, self.world = tensors, flat, work, world
        self.ready_at = ready_at

    def wait(self) -> None:
        if self.flat is None:
            return
        called = time.perf_counter()
        self.work.wait()
        _sleep_rest(self.ready_at, called)
        self.flat.div_(self.world)
        offset = 0
        for t in self.tensors:
            t.copy_(self.flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        self.flat = None


def start_all_reduce_mean(tensors: list[torch.Tensor], group=None, channel: str = "allreduce") -> PendingMean:
    """Start averaging ``tensors`` over the ranks as one flat (coalesced) all-reduce, like DDP's bucket.

    Asynchronous, so the caller can do independent work (the sparse update) while it travels.
    """
    world = _world(group)
    if world == 1 or not tensors:
        return PendingMean(tensors, None, None, world)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    work = dist.all_reduce(flat, group=group, async_op=True)
    return PendingMean(tensors, flat, work, world, _account(channel, flat.numel() * flat.element_size()))
