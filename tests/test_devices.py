"""Device API: CPU streams run work in order, off the caller's thread; unknown devices are refused."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from nestrec.devices import HostSyncError, get_device_api
from nestrec.errors import ConfigError


def test_cpu_lane_runs_in_order_and_concurrently():
    api = get_device_api("cpu")
    assert api.backend == "gloo" and api.is_available()
    lane = api.new_lane("test")
    assert lane.stream is None  # a CPU lane is its thread only
    order: list[int] = []
    caller = threading.get_ident()
    threads: set[int] = set()

    def work(i):
        time.sleep(0.01)
        order.append(i)
        threads.add(threading.get_ident())
        return torch.tensor(i)

    handles = [lane.submit(lambda i=i: work(i)) for i in range(5)]
    done_at_submit = len(order)
    results = [int(h.wait()) for h in handles]
    lane.shutdown()
    assert results == order == [0, 1, 2, 3, 4]
    assert caller not in threads and len(threads) == 1
    assert done_at_submit < 5  # submit returned while the 50 ms of queued work was still running


@pytest.mark.parametrize(
    "sync",
    [
        lambda x: x.sum().item(),
        lambda x: x.tolist(),
        lambda x: bool(x.any()),
        lambda x: float(x[0]),
        lambda x: x.cpu(),
        lambda x: x.nonzero(),
        lambda x: torch.unique(x),
    ],
    ids=["item", "tolist", "bool", "float", "cpu", "nonzero", "unique"],
)
def test_host_sync_guard_raises_on_the_calling_thread_only(sync):
    api = get_device_api("cpu")
    x = torch.arange(6.0)
    with api.host_sync_guard():
        y = (x * 2 + 1).index_select(0, torch.tensor([1, 3]))  # device-side work is allowed
        with pytest.raises(HostSyncError, match="host synchronisation"):
            sync(x)
        # another thread (a lane) may sync: the guard is thread-local
        lane = api.new_lane("sync-ok")
        assert lane.submit(lambda: sync(x)).wait() is not None
        lane.shutdown()
    sync(x)  # outside the block nothing is checked
    assert y.tolist() == [3.0, 7.0]


def test_unknown_device_type_is_a_config_error():
    with pytest.raises(ConfigError, match="no nestrec device plugin for 'tpu9'"):
        get_device_api("tpu9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on these CPU machines)")
def test_cuda_lane_orders_consumer_after_producer():
    api = get_device_api("cuda")
    lane = api.new_lane("test")
    x = torch.randn(1024, 1024, device="cuda")
    x.mul_(2)  # queued on the main stream before the submit: the lane's stream must see it
    handle = lane.submit(lambda: x @ x)
    torch.testing.assert_close(handle.wait(), x @ x)
    lane.shutdown()
