"""NestPipe device API for Ascend: ``torch.npu`` streams/events mirror CUDA's; HCCL collectives."""

from __future__ import annotations

from nestrec.devices import CudaDeviceAPI
from nestrec_npu.accelerator import npu_import_error

__all__ = ["NpuDeviceAPI"]


class NpuDeviceAPI(CudaDeviceAPI):
    """Same stream/event protocol as CUDA (``torch.get_device_module('npu')``), backend ``hccl``.

    HCCL, like NCCL, runs collectives on the process group's own internal stream, so the
    pipelines issue All2All with ``async_op=True`` and wait on the handle just before the consumer.
    """

    device_type = "npu"
    backend = "hccl"

    def is_available(self) -> bool:
        return npu_import_error() is None
