"""The device API and its CPU and CUDA implementations: lanes, events and the host-sync guard.

A **lane** is where a pipeline stage runs off the main thread: one worker thread (so Python-side
work — key dedup, collectives issued to gloo, the host shard's gathers — overlaps compute) and,
on an accelerator, one device *stream* of its own (so its copies and collectives overlap the
main stream's kernels, as TorchRec's memcpy and data-dist streams do). Ordering across lanes is
by events, never by blocking the host:

* ``Lane.submit(fn)`` records an event on the caller's current stream; the lane's stream waits
  for it before ``fn`` runs, so ``fn`` sees everything the caller queued before submitting;
* ``LaneHandle.wait()`` makes the caller's *current stream* wait for an event recorded after
  ``fn``, and ``record_stream``s every device tensor of the result onto it, so the caching
  allocator does not hand their memory to the lane again while the caller still reads it.

On CPU there are no streams or events (each is ``None``, every method a no-op): a lane is just
its thread, and gloo collectives issued from it progress while the main thread computes.

``host_sync_guard()`` makes the calling thread raise :class:`HostSyncError` at any call that
would block the host on the device (``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, a
data-dependent shape such as ``nonzero``...). It is thread-local, so the pipeline's lanes may
sync (the router reads split sizes) while the micro-batch loop on the main thread must not.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import fields, is_dataclass
from importlib.metadata import entry_points
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from nestrec.errors import ConfigError

__all__ = [
    "SYNCING_OPS",
    "CpuDeviceAPI",
    "CudaDeviceAPI",
    "DeviceAPI",
    "HostSyncError",
    "Lane",
    "LaneHandle",
    "get_device_api",
    "register_device_api",
]

#: Tensor methods and functions that block the host until the device has produced a value (a
#: Python scalar, a host copy, or an output whose shape depends on the data).
SYNCING_OPS = frozenset(
    {
        "item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
        "nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount",
        "is_nonzero", "equal", "allclose",
    }
)  # fmt: skip


class HostSyncError(RuntimeError):
    """A host synchronisation happened where the pipeline promised none."""


def _device_tensors(obj: Any, device_type: str) -> Iterator[torch.Tensor]:
    """Every tensor on ``device_type`` inside ``obj`` (tensors, dicts, lists, tuples, dataclasses)."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == device_type:
            yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _device_tensors(value, device_type)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _device_tensors(value, device_type)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            yield from _device_tensors(getattr(obj, f.name), device_type)


class _HostSyncGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING_OPS:
            raise HostSyncError(
                f"host synchronisation inside a pipelined micro-batch loop: {name}() — keep scalars and "
                "sizes on the device, or compute them on a lane before the loop"
            )
        return func(*args, **(kwargs or {}))


class DeviceAPI:
    """What a device plugin provides. Subclasses set ``device_type`` and ``backend``.

    The defaults are the CPU behaviour: no streams, no events, nothing to pin.
    """

    device_type: str = ""
    backend: str = ""

    def is_available(self) -> bool:
        raise NotImplementedError

    # -- streams and events ------------------------------------------------------------------------
    def new_stream(self) -> Any:
        """A new device stream (``None`` where the device has none)."""
        return None

    def stream_scope(self, stream: Any) -> contextlib.AbstractContextManager:
        """Make ``stream`` the calling thread's current stream inside the block."""
        return contextlib.nullcontext()

    def record_event(self) -> Any:
        """An event recorded on the calling thread's current stream (``None`` without streams)."""
        return None

    def wait_event(self, event: Any) -> None:
        """Make the calling thread's current stream wait for ``event`` (the host never blocks)."""

    def record_stream(self, obj: Any) -> None:
        """Mark every device tensor in ``obj`` as used by the current stream (allocator safety)."""

    def synchronize(self) -> None:
        """Block the host until all queued device work is done."""

    def new_lane(self, name: str) -> Lane:
        return Lane(self, name)

    # -- memory ------------------------------------------------------------------------------------
    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if self.device_type != "cpu" else tensor

    def host_staging(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host buffer for rows about to be copied to the device (pinned: the copy is async)."""
        return torch.empty(shape, dtype=dtype, pin_memory=self.device_type != "cpu")

    # -- checks ------------------------------------------------------------------------------------
    def host_sync_guard(self) -> contextlib.AbstractContextManager:
        """Raise :class:`HostSyncError` at any host synchronisation on this thread inside the block."""
        return _HostSyncGuard()


class Lane:
    """One pipeline stage's worker: a thread and, on accelerators, a stream (see the module doc)."""

    def __init__(self, api: DeviceAPI, name: str):
        self.api, self.name = api, name
        self.stream = api.new_stream()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nestrec-{name}")

    def submit(self, fn: Callable[[], Any]) -> LaneHandle:
        """Run ``fn`` on the lane after everything the caller has queued so far."""
        api, stream = self.api, self.stream
        ready = api.record_event()

        def run() -> tuple[Any, Any]:
            with api.stream_scope(stream):
                api.wait_event(ready)
                result = fn()
                done = api.record_event()
            return result, done

        return LaneHandle(api, self._pool.submit(run))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class LaneHandle:
    """Completion of work on a lane; ``wait()`` orders the caller's stream after it."""

    def __init__(self, api: DeviceAPI, future: Future):
        self.api, self.future = api, future

    def wait(self) -> Any:
        result, done = self.future.result()
        self.api.wait_event(done)
        self.api.record_stream(result)
        return result


class CpuDeviceAPI(DeviceAPI):
    device_type = "cpu"
    backend = "gloo"

    def is_available(self) -> bool:
        return True


class CudaDeviceAPI(DeviceAPI):
    """CUDA streams and events (``torch.get_device_module``, so devices with CUDA's stream API —
    Ascend's ``torch.npu`` — subclass it by changing ``device_type`` and ``backend``)."""

    device_type = "cuda"
    backend = "nccl"

    def is_available(self) -> bool:
        return self._module().is_available()

    def _module(self):
        return torch.get_device_module(self.device_type)

    def new_stream(self) -> Any:
        return self._module().Stream()

    def stream_scope(self, stream: Any) -> contextlib.AbstractContextManager:
        return self._module().stream(stream)

    def record_event(self) -> Any:
        event = self._module().Event()
        event.record()
        return event

    def wait_event(self, event: Any) -> None:
        if event is not None:
            self._module().current_stream().wait_event(event)

    def record_stream(self, obj: Any) -> None:
        stream = self._module().current_stream()
        for tensor in _device_tensors(obj, self.device_type):
            tensor.record_stream(stream)

    def synchronize(self) -> None:
        self._module().synchronize()


_REGISTRY: dict[str, DeviceAPI] = {"cpu": CpuDeviceAPI(), "cuda": CudaDeviceAPI()}
_LOCK = threading.Lock()
_ENTRY_POINTS_LOADED = False


def register_device_api(api: DeviceAPI, override: bool = False) -> None:
    """Make ``api`` the plugin for ``api.device_type`` (plugins call this on import)."""
    with _LOCK:
        if api.device_type in _REGISTRY and not override:
            return
        _REGISTRY[api.device_type] = api


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for entry in entry_points(group="nestrec.devices"):
        try:
            entry.load()()
        except (ImportError, RuntimeError, OSError):
            # A plugin whose runtime is absent (e.g. torch_npu without CANN) just stays unregistered.
            continue


def get_device_api(device_type: str) -> DeviceAPI:
    if device_type not in _REGISTRY:
        _load_entry_points()
    if device_type not in _REGISTRY:
        raise ConfigError(
            f"no nestrec device plugin for {device_type!r} (known: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[device_type]
