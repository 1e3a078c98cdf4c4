"""The device API and its CPU and CUDA implementations.

On accelerators a stream is the device's own (``torch.get_device_module(type).Stream``) and a
handle is an event recorded after the work; ``wait()`` makes the *current stream* wait, not the
host. On CPU there are no streams, so a stream is a single worker thread (work submitted to one
stream runs in order, concurrently with the caller) and a handle is its future — gloo collectives
issued from it progress while the main thread computes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import entry_points
from typing import Any

import torch

from nestrec.errors import ConfigError

__all__ = [
    "DeviceAPI",
    "CpuDeviceAPI",
    "CudaDeviceAPI",
    "WorkHandle",
    "get_device_api",
    "register_device_api",
]


class WorkHandle:
    """Completion of work submitted to a stream; ``wait()`` orders the caller after it."""

    def __init__(self, wait: Callable[[], Any]):
        self._wait = wait

    def wait(self) -> Any:
        return self._wait()


class DeviceAPI:
    """What a device plugin provides. Subclasses set ``device_type`` and ``backend``."""

    device_type: str = ""
    backend: str = ""

    def is_available(self) -> bool:
        raise NotImplementedError

    def new_stream(self) -> Any:
        raise NotImplementedError

    def submit(self, stream: Any, fn: Callable[[], Any]) -> WorkHandle:
        """Run ``fn`` ordered on ``stream``, asynchronously to the caller."""
        raise NotImplementedError

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if self.device_type != "cpu" else tensor

    def to_device(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    def synchronize(self) -> None:
        """Block the host until all queued device work is done."""


class CpuDeviceAPI(DeviceAPI):
    device_type = "cpu"
    backend = "gloo"

    def is_available(self) -> bool:
        return True

    def new_stream(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="nestrec-cpu-stream")

    def submit(self, stream: ThreadPoolExecutor, fn: Callable[[], Any]) -> WorkHandle:
        future: Future = stream.submit(fn)
        return WorkHandle(future.result)


class CudaDeviceAPI(DeviceAPI):
    """CUDA streams and events; NCCL collectives run on the process group's own internal stream."""

    device_type = "cuda"
    backend = "nccl"

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def _module(self):
        return torch.get_device_module(self.device_type)

    def new_stream(self) -> Any:
        return self._module().Stream()

    def submit(self, stream: Any, fn: Callable[[], Any]) -> WorkHandle:
        module = self._module()
        stream.wait_stream(module.current_stream())
        with module.stream(stream):
            result = fn()
            event = module.Event()
            event.record(stream)

        def wait():
            module.current_stream().wait_event(event)
            return result

        return WorkHandle(wait)

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
