"""The inline router lane: stages run in submission order, one per ``advance``, errors at ``wait``."""

from __future__ import annotations

import pytest

from nestrec.errors import ConfigError
from nestrec.pipeline.engine import PipelineConfig
from nestrec.pipeline.staged import StagedLane


def _job(name: str, log: list[str], stages: int = 3, fail_at: int | None = None):
    for i in range(stages):
        if i == fail_at:
            raise RuntimeError(f"{name} failed at stage {i}")
        log.append(f"{name}{i}")
        if i < stages - 1:
            yield
    return name.upper()


def test_stages_run_one_per_advance_in_submission_order():
    log: list[str] = []
    lane = StagedLane("router")
    a = lane.submit(_job("a", log))
    b = lane.submit(_job("b", log))
    assert log == ["a0", "b0"]  # submit runs the first stage at once
    lane.advance()
    assert log == ["a0", "b0", "a1", "b1"]
    # Waiting for the newer job finishes the older one first: collectives keep their issue order.
    assert b.wait() == "B"
    assert log == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert a.done and a.wait() == "A"


def test_an_error_surfaces_at_wait_and_later_jobs_still_run():
    log: list[str] = []
    lane = StagedLane("router")
    bad = lane.submit(_job("a", log, fail_at=1))
    good = lane.submit(_job("b", log))
    lane.advance()
    with pytest.raises(RuntimeError, match="a failed at stage 1"):
        bad.wait()
    assert good.wait() == "B"
    lane.shutdown()


def test_router_choice_is_checked():
    assert PipelineConfig(mode="dbp", router="thread").router == "thread"
    with pytest.raises(ConfigError, match=r"^unknown router 'fibre'; expected one of auto, thread, inline$"):
        PipelineConfig(mode="dbp", router="fibre")
