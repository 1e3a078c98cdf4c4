"""NestPipe device API for Ascend: ``torch.npu`` streams/events mirror CUDA's; HCCL collectives."""

from __future__ import annotations

from nestrec.devices import CudaDeviceAPI
from nestrec_npu.accelerator import npu_import_error

__all__ = ["NpuDeviceAPI"]


class NpuDeviceAPI(CudaDeviceAPI):
    """Same stream/event protocol as CUDA (``torch.get_device_module('npu')``), backend ``hccl``.

    HCCL, like NCCL, runs a collective on the process group's internal stream after the issuing
    thread's current stream (a lane's own stream), so lanes order their All2All by events.
    """

    device_type = "npu"
    backend = "hccl"

    def is_available(self) -> bool:
        return npu_import_error() is None
