"""The engine on its own: what happens to work still queued when it stops."""

from __future__ import annotations

import threading
import time

import pytest

from server.engine import Engine, EngineStopped, GenerationJob
from server.scheduler import SchedulerConfig


def _job(pipeline, seed: int) -> GenerationJob:
    encoded = pipeline.encode(["a red circle"])
    return GenerationJob(prompt=encoded, seeds=[seed], steps=2, guidance_scale=3.0)


def test_a_drain_timeout_answers_the_requests_left_queued(pipeline, monkeypatch):
    release = threading.Event()
    real_generate = pipeline.generate

    def blocking_generate(*args, **kwargs):
        release.wait(timeout=30)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(pipeline, "generate", blocking_generate)
    engine = Engine(pipeline, SchedulerConfig(num_codes=pipeline.num_codes, max_batch_size=1, max_wait_ms=0))
    engine.start()
    running = engine.submit("running", 0, _job(pipeline, 1))
    while engine.scheduler.stats().running_requests == 0:
        time.sleep(0.01)
    queued = engine.submit("queued", 0, _job(pipeline, 2))

    outcome: dict[str, bool] = {}
    stopper = threading.Thread(target=lambda: outcome.setdefault("drained", engine.shutdown(drain_timeout=0.2)))
    stopper.start()
    time.sleep(0.4)  # the drain times out while the first batch is still blocked
    release.set()
    stopper.join(timeout=30)

    assert outcome == {"drained": False}
    assert running.result(timeout=5).images.shape == (1, 3, 32, 32)  # the running batch still finishes
    with pytest.raises(EngineStopped):
        queued.result(timeout=5)
    assert not engine.running


def test_an_engine_needs_a_scheduler_for_every_code(pipeline):
    with pytest.raises(ValueError, match="codes"):
        Engine(pipeline, SchedulerConfig(num_codes=pipeline.num_codes + 1))
