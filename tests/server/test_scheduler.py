"""The per-code scheduler: batching by size and by wait, fairness between codes, admission bounds, drain, abort,
expiry, the running-batch limit, stats, thread safety and config validation. Every time is an explicit `now`."""

from __future__ import annotations

import contextlib
import sys
import threading

import pytest
from pydantic import ValidationError

from server.scheduler import (
    MIN_RETRY_SECONDS,
    AbortOutcome,
    AdmissionError,
    QueuedRequest,
    QueueFull,
    ScheduledBatch,
    Scheduler,
    SchedulerClosed,
    SchedulerConfig,
)


def make(num_codes: int = 2, **overrides) -> Scheduler:
    config = {"max_batch_size": 4, "max_wait_ms": 100.0, "max_queue_size": 16, **overrides}
    return Scheduler(SchedulerConfig(num_codes=num_codes, **config))


def req(request_id: str, code: int = 0, images: int = 1, at: float = 0.0, deadline: float | None = None):
    return QueuedRequest(request_id, code, images, at, deadline, payload={"prompt": request_id})


def add_all(scheduler: Scheduler, requests: list[QueuedRequest], now: float | None = None) -> None:
    for request in requests:
        scheduler.add(request, request.arrival if now is None else now)


def ids(batch: ScheduledBatch | None) -> list[str]:
    assert batch is not None, "expected a batch"
    return batch.request_ids


def run_one(scheduler: Scheduler, now: float, done: float | None = None) -> list[str]:
    """Schedule one batch at `now`, finish it at `done` (default `now`), return its request ids."""
    batch = scheduler.schedule(now)
    scheduler.finish(batch.batch_id, now if done is None else done) if batch else None
    return ids(batch)


# ---------------------------------------------------------------------------------------------- batching by size
def test_same_code_requests_batch_up_to_max_batch_size_and_the_rest_waits():
    scheduler = make(max_batch_size=4, max_wait_ms=100.0)
    add_all(scheduler, [req(f"r{i}", at=1.0) for i in range(6)])

    batch = scheduler.schedule(1.0)  # full by size: no waiting
    assert ids(batch) == ["r0", "r1", "r2", "r3"]
    assert batch.code == 0 and batch.num_images == 4 and batch.scheduled_at == 1.0
    scheduler.finish(batch.batch_id, 1.0)

    assert scheduler.schedule(1.0) is None  # two images left: not full, not old enough
    assert ids(scheduler.schedule(1.1)) == ["r4", "r5"]


def test_batches_never_mix_codes():
    scheduler = make(max_batch_size=4, max_running_batches=2)
    add_all(scheduler, [req("a0", code=0), req("b0", code=1), req("a1", code=0), req("b1", code=1)])
    first, second = scheduler.schedule(0.1), scheduler.schedule(0.1)
    assert (first.code, ids(first)) == (0, ["a0", "a1"])
    assert (second.code, ids(second)) == (1, ["b0", "b1"])


def test_per_code_max_batch_size():
    scheduler = make(max_batch_size={0: 1, 1: 3}, max_running_batches=4)
    add_all(scheduler, [req(f"a{i}", code=0) for i in range(2)] + [req(f"b{i}", code=1) for i in range(4)])
    batches = [scheduler.schedule(0.0) for _ in range(3)]
    # Equal arrivals: admission order decides between the ready codes.
    assert [(b.code, ids(b)) for b in batches] == [(0, ["a0"]), (0, ["a1"]), (1, ["b0", "b1", "b2"])]
    assert scheduler.schedule(0.0) is None  # b3 alone waits for max_wait


# ---------------------------------------------------------------------------------------------------- max wait
def test_lone_request_is_ready_only_after_max_wait():
    scheduler = make(max_wait_ms=500.0)
    assert scheduler.next_deadline(10.0) is None  # nothing queued
    scheduler.add(req("a", at=10.0), 10.0)

    assert scheduler.schedule(10.0) is None
    assert scheduler.next_deadline(10.0) == pytest.approx(0.5)
    assert scheduler.schedule(10.25) is None
    assert scheduler.next_deadline(10.25) == pytest.approx(0.25)
    assert scheduler.next_deadline(10.5) == 0.0
    assert ids(scheduler.schedule(10.5)) == ["a"]


def test_next_deadline_is_the_soonest_code_and_zero_when_ready():
    scheduler = make(num_codes=3, max_wait_ms=1000.0, max_batch_size=2)
    scheduler.add(req("a", code=0, at=5.0), 5.0)
    scheduler.add(req("b", code=1, at=4.5), 5.0)
    assert scheduler.next_deadline(5.0) == pytest.approx(0.5)  # code 1's head is older
    scheduler.add(req("c", code=2, images=2, at=5.2), 5.2)
    assert scheduler.next_deadline(5.2) == 0.0  # code 2 is full
    assert ids(scheduler.schedule(5.2)) == ["c"]  # code 1 is not ready yet, code 2 is, despite a newer head


def test_max_wait_zero_schedules_immediately():
    scheduler = make(max_wait_ms=0.0)
    scheduler.add(req("a", at=3.0), 3.0)
    assert scheduler.next_deadline(3.0) == 0.0
    assert ids(scheduler.schedule(3.0)) == ["a"]


# ---------------------------------------------------------------------------------------------------- fairness
def test_oldest_head_of_line_goes_first_among_ready_codes():
    scheduler = make(num_codes=3, max_batch_size=2, max_wait_ms=100.0)
    add_all(scheduler, [req("c1", code=1, at=0.30), req("c2", code=2, at=0.10), req("c0", code=0, at=0.20)])
    # At 1.0 every code is ready by wait; order follows the head's arrival, not the code or the add order.
    assert [run_one(scheduler, 1.0) for _ in range(3)] == [["c2"], ["c0"], ["c1"]]


def test_a_full_code_does_not_jump_an_older_ready_code():
    scheduler = make(max_batch_size=2, max_wait_ms=100.0)
    scheduler.add(req("old", code=1, at=0.0), 0.0)
    add_all(scheduler, [req("new0", code=0, at=0.5), req("new1", code=0, at=0.5)])
    assert run_one(scheduler, 0.5) == ["old"]
    assert run_one(scheduler, 0.5) == ["new0", "new1"]


def test_flooded_code_does_not_starve_another_code():
    batch, dt, queue_size, max_wait = 4, 0.05, 32, 0.1
    scheduler = make(max_batch_size=batch, max_wait_ms=max_wait * 1000, max_queue_size=queue_size)
    waits: dict[str, float] = {}
    flood_served = 0
    sparse = [f"sparse{r}" for r in range(0, 200, 10)]
    for round_ in range(220):
        now = round_ * dt
        if round_ < 200:
            for i in range(2 * batch):  # twice what one batch per round can serve: code 0 stays full and backlogged
                with contextlib.suppress(QueueFull):
                    scheduler.add(req(f"flood{round_}-{i}", code=0, at=now), now)
            if round_ % 10 == 0:
                scheduler.add(req(f"sparse{round_}", code=1, at=now), now)
        scheduled = scheduler.schedule(now)
        if scheduled is None:
            continue
        scheduler.finish(scheduled.batch_id, now)
        if scheduled.code == 1:
            waits.update({r.request_id: scheduled.queue_wait(r) for r in scheduled.requests})
        else:
            flood_served += 1
    assert sorted(waits) == sorted(sparse)
    # Once ready, the sparse request waits only for the flood requests older than it: at most a full queue of them.
    bound = max_wait + (queue_size / batch) * dt + dt
    assert max(waits.values()) <= bound
    assert flood_served >= 150  # and the flood is still served nearly every round


# ------------------------------------------------------------------------------------------- multi-image requests
def test_multi_image_requests_are_never_split():
    scheduler = make(max_batch_size=4, max_running_batches=8)
    sizes = {"a": 2, "b": 3, "c": 2, "d": 1, "e": 4, "f": 1}
    add_all(scheduler, [req(name, images=n) for name, n in sizes.items()])
    batches = []
    while (batch := scheduler.schedule(1.0)) is not None:
        batches.append(batch)
    assert [ids(b) for b in batches] == [["a"], ["b"], ["c", "d"], ["e"], ["f"]]  # FIFO, stop at the first misfit
    assert all(b.num_images <= 4 for b in batches)
    assert [b.num_images for b in batches] == [2, 3, 3, 4, 1]


def test_oversized_request_runs_alone():
    scheduler = make(max_batch_size=4, max_wait_ms=1000.0)
    add_all(scheduler, [req("small", images=1), req("huge", images=6), req("after", images=1)])
    assert run_one(scheduler, 0.0) == ["small"]  # ready by size (8 images queued), "huge" does not fit
    batch = scheduler.schedule(0.0)  # "huge" alone is over the limit: ready, and alone
    assert ids(batch) == ["huge"] and batch.num_images == 6
    scheduler.finish(batch.batch_id, 0.0)
    assert scheduler.schedule(0.0) is None  # "after" waits for max_wait like any lone request


# ------------------------------------------------------------------------------------------------------ bounds
def test_full_queue_raises_queue_full_and_other_codes_are_unaffected():
    scheduler = make(max_queue_size=2)
    add_all(scheduler, [req("a"), req("b")])
    with pytest.raises(QueueFull) as caught:
        scheduler.add(req("c"), 0.0)
    assert caught.value.code == 0
    assert caught.value.retry_after_s >= MIN_RETRY_SECONDS
    assert isinstance(caught.value, AdmissionError)
    scheduler.add(req("other", code=1), 0.0)  # code 1 has its own queue
    stats = scheduler.stats()
    assert stats.queued_requests == {0: 2, 1: 1}
    assert stats.rejected == {"queue_full": 1, "closed": 0}
    # The rejected request left no trace: its id can be queued once there is room.
    run_one(scheduler, 1.0)
    scheduler.add(req("c"), 1.0)


def test_check_room_refuses_only_when_no_code_could_take_a_request():
    scheduler = make(max_queue_size=1)
    scheduler.check_room(0.0)
    scheduler.add(req("a", code=0), 0.0)
    scheduler.check_room(0.0)  # code 1 still has room
    scheduler.add(req("b", code=1), 0.0)
    with pytest.raises(QueueFull) as caught:
        scheduler.check_room(0.0)
    assert caught.value.code is None and "every code's queue is full" in str(caught.value)
    assert caught.value.retry_after_s >= MIN_RETRY_SECONDS
    assert scheduler.stats().rejected == {"queue_full": 1, "closed": 0}
    run_one(scheduler, 1.0)  # a batch leaves a queue with room
    scheduler.check_room(1.0)
    scheduler.close()
    with pytest.raises(SchedulerClosed):
        scheduler.check_room(1.0)
    assert scheduler.stats().rejected == {"queue_full": 1, "closed": 1}


def test_retry_after_follows_batch_durations_and_queue_depth():
    scheduler = make(max_batch_size=1, max_wait_ms=0.0, max_queue_size=2)
    scheduler.add(req("warm"), 0.0)
    run_one(scheduler, 0.0, done=10.0)  # code 0 batches take 10 s
    assert scheduler.stats().avg_batch_seconds[0] == pytest.approx(10.0)

    add_all(scheduler, [req("a", at=20.0), req("b", at=20.0)])
    scheduler.schedule(20.0)  # "a" runs until about 30.0; the single slot is busy
    scheduler.add(req("c", at=20.0), 20.0)
    with pytest.raises(QueueFull) as caught:
        scheduler.add(req("d", at=24.0), 24.0)
    assert caught.value.retry_after_s == pytest.approx(6.0)  # the running batch ends in 6 s, then "b" is taken

    scheduler.add(req("x", code=1, at=19.0), 24.0)  # an older head on code 1 goes before code 0's next batch
    with pytest.raises(QueueFull) as caught:
        scheduler.add(req("e", at=24.0), 24.0)
    assert caught.value.retry_after_s == pytest.approx(16.0)  # 6 s + one code-1 batch (the mean over codes, 10 s)


# ------------------------------------------------------------------------------------------------ close / drain
def test_close_rejects_new_requests_and_drains_queued_work():
    scheduler = make(max_batch_size=4, max_wait_ms=10_000.0)
    add_all(scheduler, [req("a", code=0), req("b", code=1)])
    running = scheduler.schedule(0.0)
    assert running is None  # not ready: small batches, long max_wait
    scheduler.close()
    assert scheduler.closed
    with pytest.raises(SchedulerClosed):
        scheduler.add(req("late", code=0), 0.0)
    assert scheduler.stats().rejected == {"queue_full": 0, "closed": 1}

    assert not scheduler.is_idle
    assert scheduler.next_deadline(0.0) == 0.0  # draining: nothing will come to fill the batches
    assert run_one(scheduler, 0.0) == ["a"]
    assert not scheduler.is_idle
    assert run_one(scheduler, 0.0) == ["b"]
    assert scheduler.is_idle


def test_is_idle_waits_for_running_batches():
    scheduler = make(max_wait_ms=0.0)
    scheduler.add(req("a"), 0.0)
    scheduler.close()
    batch = scheduler.schedule(0.0)
    assert not scheduler.is_idle  # queue empty but "a" still running
    scheduler.finish(batch.batch_id, 1.0)
    assert scheduler.is_idle


# ------------------------------------------------------------------------------------------------------- abort
def test_abort_of_a_queued_request_removes_it():
    scheduler = make(max_batch_size=4)
    add_all(scheduler, [req("a", images=2), req("b", images=2)])
    assert scheduler.abort("a") == AbortOutcome.QUEUED
    assert scheduler.stats().queued_images == {0: 2, 1: 0}
    assert scheduler.schedule(0.0) is None  # only 2 images left: no longer full
    assert ids(scheduler.schedule(0.1)) == ["b"]
    assert scheduler.abort("a") == AbortOutcome.UNKNOWN
    assert scheduler.stats().aborted == 1


def test_abort_of_a_running_request_discards_its_result():
    scheduler = make(max_batch_size=2)
    add_all(scheduler, [req("a"), req("b")])
    batch = scheduler.schedule(0.0)
    assert scheduler.abort("a") == AbortOutcome.RUNNING
    assert scheduler.abort("a") == AbortOutcome.RUNNING  # idempotent, counted once
    assert scheduler.is_aborted("a") and not scheduler.is_aborted("b")

    result = scheduler.update_from_output(batch.batch_id, ["image-a", "image-b"], 2.0)
    assert [r.request_id for r in result.completed] == ["b"]
    assert [r.request_id for r in result.discarded] == ["a"]
    assert result.outputs == {"b": "image-b"}
    assert result.failed == [] and result.duration == pytest.approx(2.0)
    stats = scheduler.stats()
    assert (stats.aborted, stats.completed) == (1, 1)
    assert scheduler.abort("a") == AbortOutcome.UNKNOWN  # finished: nothing left to abort
    assert not scheduler.is_aborted("a")


# ------------------------------------------------------------------------------------------------------ expire
def test_expire_drops_timed_out_requests_and_returns_them():
    scheduler = make(num_codes=2, max_wait_ms=10_000.0)
    add_all(
        scheduler,
        [req("a", code=0, deadline=5.0), req("b", code=0), req("c", code=1, at=0.5, deadline=3.0)],
        now=0.5,
    )
    assert scheduler.expire(2.9) == []
    assert [r.request_id for r in scheduler.expire(4.0)] == ["c"]
    assert [r.request_id for r in scheduler.expire(5.0)] == ["a"]  # at the deadline counts as passed
    stats = scheduler.stats()
    assert stats.expired == 2
    assert stats.queued_requests == {0: 1, 1: 0}
    assert scheduler.abort("a") == AbortOutcome.UNKNOWN


def test_running_requests_do_not_expire_and_deadlines_wake_the_worker():
    scheduler = make(max_wait_ms=10_000.0, max_batch_size=2)
    scheduler.add(req("soon", deadline=2.0), 0.0)
    assert scheduler.next_deadline(0.0) == pytest.approx(2.0)  # before max_wait (10 s)
    scheduler.add(req("mate"), 0.0)
    batch = scheduler.schedule(0.0)  # full by size
    assert ids(batch) == ["soon", "mate"]
    assert scheduler.expire(3.0) == []
    assert scheduler.finish(batch.batch_id, 4.0).completed == batch.requests


def test_next_expiry_counts_only_queued_deadlines_not_readiness():
    """A step-level worker whose codes are all claimed sleeps until a deadline, not until a batch would be ready."""
    scheduler = make(max_wait_ms=0.0)
    assert scheduler.next_expiry(0.0) is None
    scheduler.add(req("ready"), 0.0)
    assert scheduler.next_deadline(0.0) == 0.0 and scheduler.next_expiry(0.0) is None
    scheduler.add(req("timed", deadline=2.5), 0.0)
    assert scheduler.next_expiry(1.0) == pytest.approx(1.5)
    assert scheduler.next_expiry(3.0) == 0.0


def test_queued_since_is_the_arrival_of_a_codes_oldest_queued_request():
    scheduler = make(num_codes=2)
    add_all(scheduler, [req("a", code=1, at=0.5), req("b", code=1, at=0.7)], now=0.7)
    assert (scheduler.queued_since(0), scheduler.queued_since(1)) == (None, 0.5)
    scheduler.abort("a")
    assert scheduler.queued_since(1) == 0.7


# ---------------------------------------------------------------------------------------- running-batch limit
def test_max_running_batches_is_respected_until_a_batch_finishes():
    scheduler = make(max_batch_size=1, max_wait_ms=0.0, max_running_batches=2)
    add_all(scheduler, [req(name) for name in "abcd"])
    first, second = scheduler.schedule(0.0), scheduler.schedule(0.0)
    assert ids(first) == ["a"] and ids(second) == ["b"]
    assert scheduler.schedule(0.0) is None
    assert scheduler.next_deadline(0.0) is None  # only a finish can make room
    assert scheduler.stats().running_batches == 2

    scheduler.update_from_output(first.batch_id, ["A"], 1.0)
    assert ids(scheduler.schedule(1.0)) == ["c"]
    assert scheduler.schedule(1.0) is None
    scheduler.finish(second.batch_id, 1.0)
    assert ids(scheduler.schedule(1.0)) == ["d"]


def test_finish_rejects_unknown_or_finished_batches_and_bad_outputs():
    scheduler = make(max_wait_ms=0.0, max_batch_size=2)
    add_all(scheduler, [req("a"), req("b")])
    batch = scheduler.schedule(0.0)
    with pytest.raises(ValueError, match="2 requests but got 1"):
        scheduler.update_from_output(batch.batch_id, ["only one"], 1.0)
    assert scheduler.stats().running_batches == 1  # the bad report changed nothing
    scheduler.finish(batch.batch_id, 1.0)
    with pytest.raises(KeyError, match="not running"):
        scheduler.finish(batch.batch_id, 1.0)
    with pytest.raises(KeyError, match="not running"):
        scheduler.finish(12345, 1.0)


def test_failed_batch_counts_failures_and_keeps_the_average():
    scheduler = make(max_wait_ms=0.0, max_batch_size=2)
    add_all(scheduler, [req("a"), req("b")])
    run_one(scheduler, 0.0, done=2.0)
    add_all(scheduler, [req("c"), req("d")])
    batch = scheduler.schedule(3.0)
    scheduler.abort("d")
    error = RuntimeError("out of memory")
    result = scheduler.finish(batch.batch_id, 3.01, error=error)
    assert [r.request_id for r in result.failed] == ["c"]
    assert [r.request_id for r in result.discarded] == ["d"]
    assert result.completed == [] and result.error is error
    stats = scheduler.stats()
    assert (stats.completed, stats.failed, stats.aborted, stats.completed_batches) == (2, 1, 1, 1)
    assert stats.avg_batch_seconds[0] == pytest.approx(2.0)  # the instant failure is not a batch duration


# ------------------------------------------------------------------------------------------------------- stats
def test_stats_after_a_scripted_sequence():
    scheduler = make(num_codes=3, max_batch_size=2, max_wait_ms=100.0, max_queue_size=3, duration_ema_alpha=0.5)
    add_all(scheduler, [req("a0", code=0), req("a1", code=0, images=2), req("a2", code=0)])
    with pytest.raises(QueueFull):
        scheduler.add(req("a3", code=0), 0.0)
    add_all(scheduler, [req("b0", code=1, images=3, deadline=0.5), req("c0", code=2), req("c1", code=2)])

    assert run_one(scheduler, 0.0, done=2.0) == ["a0"]  # every code full; equal arrivals: a0 was admitted first
    assert run_one(scheduler, 2.0, done=6.0) == ["a1"]
    assert [r.request_id for r in scheduler.expire(2.0)] == ["b0"]
    assert scheduler.abort("c1") == AbortOutcome.QUEUED
    running = scheduler.schedule(6.0)
    assert ids(running) == ["a2"]  # codes 0 and 2 ready by wait; a2 and c0 arrived together, a2 admitted first
    scheduler.close()
    with pytest.raises(SchedulerClosed):
        scheduler.add(req("late", code=1), 6.0)

    stats = scheduler.stats()
    assert stats.queued_requests == {0: 0, 1: 0, 2: 1}
    assert stats.queued_images == {0: 0, 1: 0, 2: 1}
    assert (stats.running_batches, stats.running_requests) == (1, 1)
    assert stats.admitted == 6
    assert stats.rejected == {"queue_full": 1, "closed": 1} and stats.total_rejected == 2
    assert (stats.expired, stats.aborted, stats.completed, stats.failed) == (1, 1, 2, 0)
    assert stats.completed_batches == 2
    assert stats.avg_batch_seconds == {0: pytest.approx(3.0), 1: None, 2: None}  # 0.5 * 4 + 0.5 * 2
    assert stats.closed is True


def test_stats_are_a_snapshot():
    scheduler = make()
    stats = scheduler.stats()
    scheduler.add(req("a"), 0.0)
    assert stats.queued_requests[0] == 0 and stats.admitted == 0
    assert scheduler.stats().queued_requests[0] == 1


# ----------------------------------------------------------------------------------------------- thread safety
def test_concurrent_adds_and_a_worker_lose_no_request():
    scheduler = make(num_codes=3, max_batch_size=3, max_wait_ms=0.0, max_queue_size=5)
    producers, per_producer = 4, 1000
    rejected: list[list[str]] = [[] for _ in range(producers)]
    start = threading.Barrier(producers + 1)

    def produce(worker: int) -> None:
        start.wait()
        for i in range(per_producer):
            request = req(f"p{worker}-{i}", code=(worker + i) % 3, images=1 + i % 2)
            try:
                scheduler.add(request, 0.0)
            except QueueFull:
                rejected[worker].append(request.request_id)

    threads = [threading.Thread(target=produce, args=(w,), daemon=True) for w in range(producers)]
    completed: list[str] = []
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to surface races
    try:
        for thread in threads:
            thread.start()
        start.wait()
        for _ in range(1_000_000):
            batch = scheduler.schedule(0.0)
            if batch is not None:
                completed += [r.request_id for r in scheduler.finish(batch.batch_id, 0.0).completed]
            elif not any(thread.is_alive() for thread in threads) and scheduler.is_idle:
                break
        else:
            pytest.fail("the worker loop did not drain the scheduler")
    finally:
        sys.setswitchinterval(interval)
        for thread in threads:
            thread.join(timeout=10)

    refused = [request_id for lost in rejected for request_id in lost]
    everything = {f"p{w}-{i}" for w in range(producers) for i in range(per_producer)}
    assert len(completed) == len(set(completed)), "a request completed twice"
    assert set(completed).isdisjoint(refused)
    assert set(completed) | set(refused) == everything
    stats = scheduler.stats()
    assert stats.admitted == stats.completed == len(completed) > 0
    assert stats.rejected["queue_full"] == len(refused)


# ------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_codes", 0),
        ("max_batch_size", 0),
        ("max_batch_size", {0: 2, 1: 0}),
        ("max_batch_size", {0: 2}),  # code 1 missing
        ("max_batch_size", {0: 2, 1: 2, 5: 2}),  # no code 5
        ("max_wait_ms", -1.0),
        ("max_queue_size", 0),
        ("max_running_batches", 0),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValidationError) as caught:
        SchedulerConfig(**{"num_codes": 2, field: value})
    errors = caught.value.errors()
    assert [error["loc"][0] for error in errors] == [field]
    assert field in str(caught.value)


def test_config_accepts_per_code_batch_sizes_and_round_trips_json():
    config = SchedulerConfig(num_codes=2, max_batch_size={0: 1, 1: 8}, max_wait_ms=0)
    assert (config.batch_size(0), config.batch_size(1)) == (1, 8)
    assert SchedulerConfig.model_validate_json(config.model_dump_json()) == config
    assert SchedulerConfig(num_codes=3, max_batch_size=5).batch_size(2) == 5


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (QueuedRequest("x", 2, 1, 0.0), "code must be in 0..1"),
        (QueuedRequest("x", -1, 1, 0.0), "code must be in 0..1"),
        (QueuedRequest("x", 0, 0, 0.0), "num_images must be >= 1"),
    ],
)
def test_add_rejects_invalid_requests(request_, message):
    scheduler = make()
    with pytest.raises(ValueError, match=message):
        scheduler.add(request_, 0.0)
    assert scheduler.stats().admitted == 0


def test_add_rejects_a_duplicate_live_request_id():
    scheduler = make(max_wait_ms=0.0)
    scheduler.add(req("a"), 0.0)
    with pytest.raises(ValueError, match="already queued or running"):
        scheduler.add(req("a", code=1), 0.0)
    batch = scheduler.schedule(0.0)
    with pytest.raises(ValueError, match="already queued or running"):
        scheduler.add(req("a"), 0.0)
    scheduler.finish(batch.batch_id, 0.0)
    scheduler.add(req("a"), 0.0)  # finished ids may be reused


def test_check_room_counts_the_requests_still_being_routed():
    """Requests admitted but not yet routed will take queue places: a burst is refused at once, not after routing."""
    scheduler = make(max_queue_size=2)  # 2 codes x 2 places
    scheduler.add(req("a", code=0), 0.0)
    scheduler.check_room(0.0, incoming=2)  # 1 queued + 2 routing < 4
    with pytest.raises(QueueFull):
        scheduler.check_room(0.0, incoming=3)  # 1 queued + 3 routing: every place is spoken for
    scheduler.check_room(0.0)  # with nothing in routing there is room


def test_a_burst_into_empty_queues_is_refused_with_a_retry_after():
    scheduler = make(max_queue_size=2)
    with pytest.raises(QueueFull) as caught:
        scheduler.check_room(0.0, incoming=4)  # nothing queued yet, every place taken by requests being routed
    assert caught.value.retry_after_s == MIN_RETRY_SECONDS


def test_an_admitted_request_is_queued_past_its_codes_share():
    """`check_room` let it in while its code was unknown: `add(admitted=True)` never refuses it for its code."""
    scheduler = make(max_queue_size=1)  # 2 codes x 1 place
    scheduler.add(req("a", code=0), 0.0)
    assert not scheduler.has_room(0) and scheduler.has_room(1)
    with pytest.raises(QueueFull):
        scheduler.add(req("b", code=0), 0.0)
    scheduler.check_room(0.0)  # one place of two is free
    scheduler.add(req("b", code=0), 0.0, admitted=True)
    assert scheduler.stats().queued_requests[0] == 2
    with pytest.raises(QueueFull):
        scheduler.check_room(0.0)  # the places are all taken now, whichever code held them
