"""The NPU plugin registers itself and detects (the absence of) Ascend honestly."""

from __future__ import annotations

import pytest
import torch
from nestrec_npu import NPUAccelerator, npu_import_error

from nestrec.devices import get_device_api

NO_NPU = npu_import_error()


def test_registered_with_lightning_and_nestrec():
    from lightning.pytorch.accelerators import AcceleratorRegistry

    assert "npu" in AcceleratorRegistry
    assert AcceleratorRegistry.get("npu").__class__ is NPUAccelerator
    api = get_device_api("npu")
    assert api.backend == "hccl" and api.device_type == "npu"


def test_availability_matches_torch_npu():
    # Without torch_npu (every CI machine here) the accelerator must say unavailable, not crash.
    assert NPUAccelerator.is_available() == (NO_NPU is None)
    assert get_device_api("npu").is_available() == (NO_NPU is None)
    if NO_NPU is not None:
        assert NPUAccelerator.auto_device_count() == 0
        assert "torch_npu" in NO_NPU or "NPU" in NO_NPU


def test_device_parsing():
    assert NPUAccelerator.parse_devices([0, 3]) == [0, 3]
    assert NPUAccelerator.parse_devices("0,2") == [0, 2]


@pytest.mark.skipif(NO_NPU is not None, reason=f"needs an Ascend NPU with torch_npu + CANN; here: {NO_NPU}")
def test_hccl_all_to_all_and_stream_on_npu():
    assert NPUAccelerator.get_parallel_devices([0]) == [
        torch.device("npu", 0)
    ]  # needs torch_npu's device type
    api = get_device_api("npu")
    lane = api.new_lane("test")
    x = torch.arange(8.0, device="npu")
    handle = lane.submit(lambda: x * 2)
    assert torch.equal(handle.wait().cpu(), torch.arange(8.0) * 2)
    lane.shutdown()
