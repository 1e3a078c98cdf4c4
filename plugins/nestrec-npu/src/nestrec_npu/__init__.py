"""Ascend NPU plugin for nestrec: Lightning accelerator ``npu`` + NestPipe device API (HCCL)."""

from nestrec_npu.accelerator import NPUAccelerator, npu_import_error
from nestrec_npu.device_api import NpuDeviceAPI

__all__ = ["NPUAccelerator", "NpuDeviceAPI", "npu_import_error", "register"]


def register() -> None:
    """Entry point of the ``nestrec.devices`` group: register the accelerator and device API."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    from nestrec.devices import register_device_api

    if "npu" not in AcceleratorRegistry:
        NPUAccelerator.register_accelerators(AcceleratorRegistry)
    register_device_api(NpuDeviceAPI())


register()
