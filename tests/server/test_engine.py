"""The engine on its own: what happens to work still queued when it stops."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest

from server.engine import Engine, EngineStopped, GenerationJob
from server.scheduler import SchedulerConfig
from tests.helpers import native_thread_name


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


# ------------------------------------------------------------------------------------------- step-level batching
def _step_engine(pipeline, **config) -> Engine:
    settings = {"num_codes": pipeline.num_codes, "max_batch_size": 4, "max_wait_ms": 0, **config}
    engine = Engine(pipeline, SchedulerConfig(**settings), step_level=True)
    engine.start()
    return engine


def _alone(pipeline, code: int, job: GenerationJob):
    count = len(job.seeds)
    return pipeline.generate(code, job.prompt.repeat(count), job.seeds, job.steps, [job.guidance_scale] * count)


def test_a_request_joins_a_running_batch_at_the_next_step_and_gets_the_image_it_gets_alone(pipeline, monkeypatch):
    import server.engine as engine_module

    calls, release = [], threading.Event()
    real_advance = engine_module.advance

    def recording_advance(unet, trajectories):
        calls.append([(t.step, t.steps) for t in trajectories])
        if len(calls) == 2:
            release.wait(timeout=30)  # hold the second step until the second request is queued
        real_advance(unet, trajectories)

    monkeypatch.setattr(engine_module, "advance", recording_advance)
    engine = _step_engine(pipeline)
    try:
        long_job = GenerationJob(prompt=pipeline.encode(["a red circle"]), seeds=[1], steps=5, guidance_scale=3.0)
        short_job = GenerationJob(prompt=pipeline.encode(["a blue square"]), seeds=[2, 3], steps=2, guidance_scale=1.5)
        first = engine.submit("long", 0, long_job)
        while len(calls) < 2:
            time.sleep(0.01)
        second = engine.submit("short", 0, short_job)
        release.set()
        short, long = second.result(timeout=60), first.result(timeout=60)
    finally:
        engine.shutdown(drain_timeout=5)
    assert calls[2] == [(2, 5), (0, 2)]  # joined at the long request's third step, at its own first
    assert calls[4] == [(4, 5)]  # and left once its two steps were done
    assert short.batch_images == 3 and long.batch_images == 3 and short.unet_calls == 4 and long.unet_calls == 10
    for result, job in ((long, long_job), (short, short_job)):
        difference = (result.images.int() - _alone(pipeline, 0, job).int()).abs().max().item()
        assert difference <= 1, difference  # float rounding of other batch shapes: at most one intensity level


def test_step_level_batching_holds_a_code_to_its_batch_size(pipeline):
    engine = _step_engine(pipeline, max_batch_size=2)
    try:
        jobs = [
            GenerationJob(prompt=pipeline.encode([f"prompt {i}"]), seeds=[i], steps=2, guidance_scale=1.0)
            for i in range(5)
        ]
        futures = [engine.submit(f"r{i}", 0, job) for i, job in enumerate(jobs)]
        results = [future.result(timeout=60) for future in futures]
    finally:
        engine.shutdown(drain_timeout=5)
    assert all(result.batch_images <= 2 for result in results)
    assert engine.scheduler.stats().completed == 5


def test_a_failing_step_fails_its_codes_running_requests_and_the_engine_keeps_serving(pipeline, monkeypatch):
    import server.engine as engine_module
    from server.engine import BatchFailed

    real_advance, failures = engine_module.advance, [1]

    def failing_once(unet, trajectories):
        if failures:
            failures.pop()
            raise RuntimeError("out of memory (simulated)")
        real_advance(unet, trajectories)

    monkeypatch.setattr(engine_module, "advance", failing_once)
    engine = _step_engine(pipeline)
    try:
        with pytest.raises(BatchFailed, match="out of memory"):
            engine.submit("doomed", 0, _job(pipeline, 1)).result(timeout=60)
        assert engine.submit("fine", 0, _job(pipeline, 2)).result(timeout=60).images.shape == (1, 3, 32, 32)
    finally:
        engine.shutdown(drain_timeout=5)


def _held_advance(monkeypatch, hold_at: int):
    """`advance` recording each call's trajectories, holding call `hold_at` (1-based) until the returned event is
    set."""
    import server.engine as engine_module

    calls, release = [], threading.Event()
    real_advance = engine_module.advance

    def held(unet, trajectories):
        calls.append(list(trajectories))
        if len(calls) == hold_at:
            release.wait(timeout=30)
        real_advance(unet, trajectories)

    monkeypatch.setattr(engine_module, "advance", held)
    return calls, release


def test_a_running_request_whose_client_left_takes_no_more_steps_and_frees_its_place(pipeline, monkeypatch):
    """Step-level batching stops denoising for a client that went away at the next step (whole batches can only
    discard the result), so the request queued behind it starts at once instead of after the remaining steps."""
    from server.scheduler import AbortOutcome

    calls, release = _held_advance(monkeypatch, hold_at=2)
    engine = _step_engine(pipeline, max_batch_size=1)
    try:
        leaving = GenerationJob(prompt=pipeline.encode(["a red circle"]), seeds=[1], steps=10, guidance_scale=3.0)
        left = engine.submit("leaving", 0, leaving)
        while len(calls) < 2:
            time.sleep(0.01)
        staying = engine.submit("staying", 0, _job(pipeline, 2))  # no room: the code's one row is taken
        assert engine.abort("leaving") is AbortOutcome.RUNNING
        release.set()
        result = staying.result(timeout=60)
    finally:
        engine.shutdown(drain_timeout=5)
    leaving_trajectory = calls[0][0]
    assert sum(leaving_trajectory in call for call in calls) == 2  # the step under way when it left, none after
    assert [len(call) for call in calls[2:]] == [1, 1] and result.unet_calls == 4
    assert left.cancelled()
    stats = engine.scheduler.stats()
    assert (stats.aborted, stats.completed, stats.running_requests) == (1, 1, 0)


def test_a_step_level_request_that_waited_past_its_timeout_never_starts(pipeline, monkeypatch):
    """A queued request's timeout holds under step-level batching too: when a place opens after its deadline it is
    answered `QueueTimeout` (HTTP 504) rather than started, and the running request is not disturbed."""
    from server.engine import QueueTimeout

    calls, release = _held_advance(monkeypatch, hold_at=1)
    engine = _step_engine(pipeline, max_batch_size=1)
    try:
        running = engine.submit("running", 0, _job(pipeline, 1))
        while not calls:
            time.sleep(0.01)
        late = engine.submit("late", 0, _job(pipeline, 2), timeout_s=0.1)
        time.sleep(0.3)
        release.set()
        with pytest.raises(QueueTimeout):
            late.result(timeout=60)
        assert running.result(timeout=60).images.shape == (1, 3, 32, 32)
    finally:
        engine.shutdown(drain_timeout=5)
    assert all(len(call) == 1 for call in calls) and len(calls) == 2  # the late request never took a step


def test_step_level_drain_answers_everything_queued(pipeline):
    engine = _step_engine(pipeline, max_batch_size=1)
    futures = [engine.submit(f"r{i}", i % pipeline.num_codes, _job(pipeline, i)) for i in range(4)]
    assert engine.shutdown(drain_timeout=60)
    assert all(future.result(timeout=1).images.shape == (1, 3, 32, 32) for future in futures)


def _nice(thread_id: int) -> int:
    """A thread's nice value, from /proc (field 19 of its stat line)."""
    with open(f"/proc/self/task/{thread_id}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[16])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread priorities from Linux's /proc")
def test_compute_runs_below_the_event_loops_priority_and_denoising_below_routing(make_client):
    """On a busy CPU the thread serving HTTP preempts routing, and routing (short, and every request waits for it)
    preempts the engine's denoising: the server's settings reach both threads. Both carry their names to the OS."""
    with make_client(compute_niceness=7, routing_niceness=3) as client:
        assert client.post("/generate", json={"prompt": "a red circle", "steps": 1}).status_code == 200
        threads = {thread.name: thread.native_id for thread in threading.enumerate()}
        mine = _nice(threading.get_native_id())
        workers = {name: native for name, native in threads.items() if re.fullmatch(r"aptp-engine-\d+", name)}
        # the kernel caps niceness at 19, so a suite run under `nice` sees the offsets clipped there
        assert workers and all(_nice(native) == min(mine + 7, 19) for native in workers.values())
        assert _nice(threads["aptp-routing"]) == min(mine + 3, 19)
        assert all(native_thread_name(native) == name for name, native in workers.items())
        assert native_thread_name(threads["aptp-routing"]) == "aptp-routing"


def _threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts the process's threads in Linux's /proc")
def test_warm_up_leaves_no_openmp_workers_with_the_thread_that_asked_for_it(pipeline):
    """A Ray replica warms its engine up from its long-lived actor thread: workers left with that thread would sit
    beside the engine's own, and past one OpenMP thread per CPU every worker sleeps between operations."""
    engine = Engine(pipeline, SchedulerConfig(num_codes=pipeline.num_codes), threads=2)
    counts: list[tuple[int, int]] = []

    def long_lived_caller() -> None:
        before = _threads_now()
        engine.warm_up(steps=1)
        deadline = time.monotonic() + 5  # the warm-up thread's workers leave with it, a moment after it ends
        while _threads_now() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        counts.append((before, _threads_now()))

    caller = threading.Thread(target=long_lived_caller)
    caller.start()
    caller.join(60)
    ((before, after),) = counts
    assert after <= before


def test_a_warm_up_that_fails_raises_in_the_caller(pipeline, monkeypatch):
    engine = Engine(pipeline, SchedulerConfig(num_codes=pipeline.num_codes))

    def broken(*args, **kwargs):
        raise RuntimeError("expert 0 cannot run")

    monkeypatch.setattr(pipeline, "generate", broken)
    with pytest.raises(RuntimeError, match="expert 0 cannot run"):
        engine.warm_up()


# ------------------------------------------------------------------------------------------------ several workers
def test_two_workers_run_two_batches_at_once_and_each_request_gets_the_images_it_gets_alone(pipeline, monkeypatch):
    """On a CPU two batches on one thread each outrun one batch on two (server.engine): the second worker must
    really take a batch while the first still runs one, and sharing the experts between threads must not change
    an image."""
    both_running = threading.Barrier(2, timeout=30)
    real_generate = pipeline.generate

    def meeting_generate(*args, **kwargs):
        both_running.wait()  # breaks (and fails the batch) unless a second batch starts while this one runs
        return real_generate(*args, **kwargs)

    jobs = [_job(pipeline, seed) for seed in range(4)]
    codes = [seed % pipeline.num_codes for seed in range(4)]
    alone = [_alone(pipeline, code, job) for code, job in zip(codes, jobs, strict=True)]
    monkeypatch.setattr(pipeline, "generate", meeting_generate)
    engine = Engine(pipeline, SchedulerConfig(num_codes=pipeline.num_codes, max_batch_size=1, max_wait_ms=0), workers=2)
    engine.start()
    futures = [engine.submit(f"r{i}", code, job) for i, (code, job) in enumerate(zip(codes, jobs, strict=True))]
    results = [future.result(timeout=60) for future in futures]
    assert engine.shutdown(drain_timeout=10)
    assert [result.code for result in results] == codes
    for result, image in zip(results, alone, strict=True):
        difference = (result.images.int() - image.int()).abs().max().item()
        assert difference <= 1, difference  # float rounding of another thread count: at most one intensity level


def test_one_worker_runs_one_batch_at_a_time(pipeline, monkeypatch):
    running, most = [0], [0]
    lock = threading.Lock()
    real_generate = pipeline.generate

    def counting_generate(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return real_generate(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(pipeline, "generate", counting_generate)
    engine = Engine(pipeline, SchedulerConfig(num_codes=pipeline.num_codes, max_batch_size=1, max_wait_ms=0))
    engine.start()
    futures = [engine.submit(f"r{i}", i % pipeline.num_codes, _job(pipeline, i)) for i in range(4)]
    assert all(future.result(timeout=60).images.shape == (1, 3, 32, 32) for future in futures)
    assert engine.shutdown(drain_timeout=10)
    assert most == [1]


class _OverlappingAdvance:
    """`advance` that records which trajectories are being stepped at once, and holds the first call until a second
    one runs beside it (so the test fails, after the wait, unless two workers step at the same time)."""

    def __init__(self, advance):
        self.real_advance, self.lock = advance, threading.Lock()
        self.stepping: list[tuple[int, list[int]]] = []  # (expert id, trajectory ids) of the calls running now
        self.overlaps: list[list[tuple[int, list[int]]]] = []
        self.second_beside_first = threading.Event()

    def __call__(self, unet, trajectories):
        call = (id(unet), [id(t) for t in trajectories])
        with self.lock:
            self.stepping.append(call)
            self.overlaps.append(list(self.stepping))
            if len(self.stepping) == 2:
                self.second_beside_first.set()
        try:
            if len(self.overlaps) == 1:
                self.second_beside_first.wait(timeout=30)
            self.real_advance(unet, trajectories)
        finally:
            with self.lock:
                self.stepping.remove(call)

    def no_row_stepped_twice_at_once(self) -> bool:
        for now in self.overlaps:
            rows = [row for _, trajectories in now for row in trajectories]
            if len(set(rows)) != len(rows):
                return False
        return True


def _run_step_workers(pipeline, monkeypatch, codes: list[int], max_batch_size: int):
    import server.engine as engine_module

    jobs = [
        GenerationJob(prompt=pipeline.encode([f"prompt {i}"]), seeds=[i], steps=3, guidance_scale=2.0)
        for i in range(len(codes))
    ]
    alone = [_alone(pipeline, code, job) for code, job in zip(codes, jobs, strict=True)]
    advance = _OverlappingAdvance(engine_module.advance)
    monkeypatch.setattr(engine_module, "advance", advance)
    config = SchedulerConfig(num_codes=pipeline.num_codes, max_batch_size=max_batch_size, max_wait_ms=0)
    engine = Engine(pipeline, config, step_level=True, workers=2)
    engine.start()
    try:
        futures = [engine.submit(f"r{i}", code, job) for i, (code, job) in enumerate(zip(codes, jobs, strict=True))]
        results = [future.result(timeout=60) for future in futures]
    finally:
        assert engine.shutdown(drain_timeout=10)
    assert [result.code for result in results] == codes
    for result, image in zip(results, alone, strict=True):
        assert result.batch_images <= max_batch_size
        difference = (result.images.int() - image.int()).abs().max().item()
        assert difference <= 1, difference  # float rounding of other batch shapes and threads: one intensity level
    return advance


def test_two_step_level_workers_step_two_codes_at_once_and_never_one_row_twice(pipeline, monkeypatch):
    """Step-level batching on two workers: while one worker steps a code, the other steps another code, no row is
    ever in two U-Net calls at once, and every request still gets the images it gets alone."""
    advance = _run_step_workers(pipeline, monkeypatch, codes=[i % 2 for i in range(6)], max_batch_size=2)
    assert any(len({expert for expert, _ in now}) == 2 for now in advance.overlaps)  # two codes stepped at once
    assert advance.no_row_stepped_twice_at_once()


def test_two_step_level_workers_share_a_code_that_has_all_the_work(pipeline, monkeypatch):
    """When every request is for one code, the second worker steps a second lane of it instead of idling (whole
    batches would run a second batch of that code), and lanes never share a row."""
    advance = _run_step_workers(pipeline, monkeypatch, codes=[0] * 6, max_batch_size=2)
    assert any(len(now) == 2 for now in advance.overlaps)  # two lanes of code 0 stepped at once
    assert advance.no_row_stepped_twice_at_once()


def test_step_level_requests_queued_together_share_one_lane(pipeline):
    """Requests of one code waiting together join one lane (one U-Net call), not one lane per worker: a second
    lane is for work the first cannot take now, not a way to split a batch."""
    config = SchedulerConfig(num_codes=pipeline.num_codes, max_batch_size=4, max_wait_ms=0)
    engine = Engine(pipeline, config, step_level=True, workers=2)
    futures = [engine.submit(f"r{i}", 0, _job(pipeline, i)) for i in range(3)]  # queued before any worker runs
    engine.start()
    try:
        results = [future.result(timeout=60) for future in futures]
    finally:
        assert engine.shutdown(drain_timeout=10)
    assert [result.batch_images for result in results] == [3, 3, 3]
