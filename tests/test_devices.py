"""Device API: CPU streams run work in order, off the caller's thread; unknown devices are refused."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from nestrec.devices import get_device_api
from nestrec.errors import ConfigError


def test_cpu_stream_runs_in_order_and_concurrently():
    api = get_device_api("cpu")
    assert api.backend == "gloo" and api.is_available()
    stream = api.new_stream()
    order: list[int] = []
    caller = threading.get_ident()
    threads: set[int] = set()

    def work(i):
        time.sleep(0.01)
        order.append(i)
        threads.add(threading.get_ident())
        return torch.tensor(i)

    handles = [api.submit(stream, lambda i=i: work(i)) for i in range(5)]
    done_at_submit = len(order)
    results = [int(h.wait()) for h in handles]
    assert results == order == [0, 1, 2, 3, 4]
    assert caller not in threads and len(threads) == 1
    assert done_at_submit < 5  # submit returned while the 50 ms of queued work was still running


def test_unknown_device_type_is_a_config_error():
    with pytest.raises(ConfigError, match="no nestrec device plugin for 'tpu9'"):
        get_device_api("tpu9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on these CPU machines)")
def test_cuda_stream_orders_consumer_after_producer():
    api = get_device_api("cuda")
    stream = api.new_stream()
    x = torch.randn(1024, 1024, device="cuda")
    handle = api.submit(stream, lambda: x @ x)
    torch.testing.assert_close(handle.wait(), x @ x)
