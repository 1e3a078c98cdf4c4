"""Device plugins: what the sharded training needs to know about a device type, behind one API.

``get_device_api("cuda")`` returns the plugin for a device type: its collective backend, pinned
memory, host↔device copies and *streams* (ordered queues of asynchronous work). CPU and CUDA are
built in; other devices (Ascend NPU: ``plugins/nestrec-npu``) register through the
``nestrec.devices`` entry-point group, so the pipeline code never names a device.
"""

from nestrec.devices.api import (
    CpuDeviceAPI,
    CudaDeviceAPI,
    DeviceAPI,
    WorkHandle,
    get_device_api,
    register_device_api,
)

__all__ = [
    "CpuDeviceAPI",
    "CudaDeviceAPI",
    "DeviceAPI",
    "WorkHandle",
    "get_device_api",
    "register_device_api",
]
