"""Device plugins: what the sharded training needs to know about a device type, behind one API.

``get_device_api("cuda")`` returns the plugin for a device type: its collective backend, pinned
host staging, *lanes* (a worker thread plus a device stream, ordered by events) and the
host-sync guard the pipeline tests run under. CPU and CUDA are
built in; other devices (Ascend NPU: ``plugins/nestrec-npu``) register through the
``nestrec.devices`` entry-point group, so the pipeline code never names a device.
"""

from nestrec.devices.api import (
    SYNCING_OPS,
    CpuDeviceAPI,
    CudaDeviceAPI,
    DeviceAPI,
    HostSyncError,
    Lane,
    LaneHandle,
    get_device_api,
    register_device_api,
)

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
