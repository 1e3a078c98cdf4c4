"""``NPUAccelerator``: Lightning's accelerator hooks on ``torch.npu`` (from torch_npu)."""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch.accelerators import Accelerator

__all__ = ["NPUAccelerator", "npu_import_error"]


@functools.lru_cache(maxsize=1)
def npu_import_error() -> str | None:
    """``None`` if torch_npu imports and sees a device, else why not (for skips and errors).

    torch_npu raises ``ImportError`` when absent and ``RuntimeError`` / ``OSError`` when the CANN
    libraries are missing, so all three mean "unavailable", never a crash.
    """
    try:
        import torch_npu  # noqa: F401
    except (ImportError, RuntimeError, OSError) as err:
        return f"torch_npu is not importable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not hasattr(torch, "npu") or not torch.npu.is_available():
        return "torch_npu imported but no NPU device is visible"
    return None


class NPUAccelerator(Accelerator):
    """Ascend NPU accelerator (``accelerator="npu"``)."""

    def setup_device(self, device: torch.device) -> None:
        if device.type != "npu":
            raise ValueError(f"device should be an NPU, got {device}")
        torch.npu.set_device(device)

    def get_device_stats(self, device: Any) -> dict[str, Any]:
        return dict(torch.npu.memory_stats(device))

    def teardown(self) -> None:
        torch.npu.empty_cache()

    @staticmethod
    def parse_devices(devices: int | str | list[int]) -> list[int]:
        if isinstance(devices, str):
            devices = (
                NPUAccelerator.auto_device_count()
                if devices.strip() in ("-1", "auto")
                else [int(d) for d in devices.split(",") if d.strip()]
            )
        if isinstance(devices, int):
            devices = list(range(NPUAccelerator.auto_device_count() if devices == -1 else devices))
        return list(devices)

    @staticmethod
    def get_parallel_devices(devices: list[int]) -> list[torch.device]:
        return [torch.device("npu", i) for i in devices]

    @staticmethod
    def auto_device_count() -> int:
        return torch.npu.device_count() if npu_import_error() is None else 0

    @staticmethod
    def is_available() -> bool:
        return npu_import_error() is None

    @staticmethod
    def name() -> str:
        return "npu"

    @classmethod
    def register_accelerators(cls, accelerator_registry) -> None:
        accelerator_registry.register("npu", cls, description="Ascend NPU via torch_npu (nestrec-npu)")
