"""The request scheduler: one bounded FIFO queue per architecture code, and the policy that turns queues into batches.

Every batch holds requests of one code only, so the engine runs it through one dense sliced expert. The scheduler is
pure Python with no clock of its own: every time-dependent call takes `now` (seconds on any monotonic clock, the same
one the caller used for `QueuedRequest.arrival` and `deadline`), which keeps it deterministic and testable without a
model. It follows vLLM's split: the engine worker asks `schedule(now)` for the next batch, runs it, and reports back
with `update_from_output(...)` (or `finish(...)` when it has no per-request outputs, e.g. after an error).

A worker loop built on it looks like this (`wakeup` is a `threading.Condition` the API layer notifies after `add`,
`abort` and `close`; the scheduler itself never blocks or signals):

    while not (scheduler.closed and scheduler.is_idle):
        now = time.monotonic()
        for request in scheduler.expire(now):
            ...  # answer: queue timeout
        batch = scheduler.schedule(now)
        if batch is None:
            with wakeup:
                wakeup.wait(timeout=scheduler.next_deadline(now))
            continue
        outputs = run(batch)  # one output per request, in `batch.requests` order
        result = scheduler.update_from_output(batch.batch_id, outputs, time.monotonic())
        ...  # answer result.completed with result.outputs; drop result.discarded

Thread safety: every public method takes the scheduler's single `threading.Lock`, never calls out to foreign code
while holding it, and returns values the caller owns (`stats()` is a snapshot), so the FastAPI event loop (`add`,
`abort`, `stats`) and engine worker threads (`schedule`, `finish`, ...) can share one instance.
"""

from __future__ import annotations

import enum
import itertools
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field, ValidationInfo, field_validator

# Float clocks make `arrival + max_wait` land a hair past `now` when the caller meant "exactly now"; a nanosecond of
# slack keeps readiness from depending on rounding.
_EPSILON = 1e-9

REJECT_QUEUE_FULL = "queue_full"
REJECT_CLOSED = "closed"
# The least wait a refusal advises: a retry storm under overload costs the event loop, and room rarely comes sooner.
MIN_RETRY_SECONDS = 1.0


# --------------------------------------------------------------------------------------------------------- config
class SchedulerConfig(BaseModel):
    """Batching and admission policy.

    Parameters:
        num_codes (`int`): K, the number of architecture codes (experts); codes are `0 .. K-1`.
        max_batch_size (`int` or `dict[int, int]`): images per batch, one value for every code or one per code (the
            dict must name every code). A single request asking for more images still runs, alone: the API layer
            caps `num_images` per request so that this stays an exception.
        max_wait_ms (`float`): how long the oldest queued request of a code may wait for its batch to fill before
            the code is scheduled with a partial batch. 0 schedules whatever is queued at once.
        max_queue_size (`int`): queued requests per code (not images): `add` answers `QueueFull` beyond it, except
            for a request admitted by `check_room` (which holds a place of the total, `num_codes` x this, for it
            while it is routed), so a request that was let in is never refused after its prompt was routed.
        max_running_batches (`int`): batches handed out and not yet finished; 1 for one engine worker.
        duration_ema_alpha (`float`): weight of the newest batch in the per-code moving average of batch durations.
        initial_batch_seconds (`float`): the batch duration assumed for `Retry-After` estimates until a batch has run.
    """

    num_codes: int = Field(ge=1)
    max_batch_size: int | dict[int, int] = 4
    max_wait_ms: float = Field(50.0, ge=0)
    max_queue_size: int = Field(64, ge=1)
    max_running_batches: int = Field(1, ge=1)
    duration_ema_alpha: float = Field(0.2, gt=0, le=1)
    initial_batch_seconds: float = Field(1.0, gt=0)

    @field_validator("max_batch_size")
    @classmethod
    def _check_batch_sizes(cls, value: int | dict[int, int], info: ValidationInfo) -> int | dict[int, int]:
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"must be >= 1 (got {value})")
            return value
        small = {code: size for code, size in value.items() if size < 1}
        if small:
            raise ValueError(f"every batch size must be >= 1 (got {small})")
        num_codes = info.data.get("num_codes")
        if num_codes is not None:  # None: num_codes failed its own validation and is reported there
            missing = sorted(set(range(num_codes)) - set(value))
            extra = sorted(set(value) - set(range(num_codes)))
            if missing or extra:
                raise ValueError(
                    f"needs exactly the codes 0..{num_codes - 1} as keys (missing {missing}, unknown {extra})"
                )
        return value

    def batch_size(self, code: int) -> int:
        """`max_batch_size` of `code`."""
        if isinstance(self.max_batch_size, int):
            return self.max_batch_size
        return self.max_batch_size[code]

    @property
    def max_wait_seconds(self) -> float:
        return self.max_wait_ms / 1000.0


# ------------------------------------------------------------------------------------------------------ exceptions
class AdmissionError(Exception):
    """A request the scheduler refuses to queue (the API layer turns it into an HTTP error)."""


class QueueFull(AdmissionError):
    """The code's queue holds `max_queue_size` requests (HTTP 429).

    Parameters:
        code (`int | None`): the code whose queue is full; None when every code's queue is (refused before routing).
        retry_after_s (`float`): estimated seconds until the queue has room, at least `MIN_RETRY_SECONDS` (the API
            sends it as `Retry-After` in whole seconds and `retry-after-ms`).
    """

    def __init__(self, code: int | None, retry_after_s: float):
        which = "every code's queue is" if code is None else f"the queue of code {code} is"
        super().__init__(f"{which} full; retry after {retry_after_s:.1f} s")
        self.code = code
        self.retry_after_s = retry_after_s


class SchedulerClosed(AdmissionError):
    """The scheduler was closed (the server is draining) and admits no new requests (HTTP 503)."""

    def __init__(self) -> None:
        super().__init__("the scheduler is closed: the server is shutting down")


# --------------------------------------------------------------------------------------------------- data classes
@dataclass
class QueuedRequest:
    """One generation request as the scheduler sees it.

    Parameters:
        request_id (`str`): unique among the requests queued or running.
        code (`int`): the architecture code the router chose.
        num_images (`int`): images asked for; a request is never split across batches.
        arrival (`float`): when the request arrived (the `now` clock); its queue wait counts from here.
        deadline (`float`, *optional*): absolute time after which a still-queued request is dropped by `expire`.
        payload (`Any`): whatever the engine needs (prompt embedding, seed, ...); the scheduler never reads it.
    """

    request_id: str
    code: int
    num_images: int
    arrival: float
    deadline: float | None = None
    payload: Any = None


@dataclass(frozen=True)
class ScheduledBatch:
    """Requests of one code that the engine runs together.

    Parameters:
        batch_id (`int`): identifies the batch in `finish` / `update_from_output`.
        code (`int`): the code (expert) every request uses.
        requests (`list[QueuedRequest]`): in queue order; outputs are reported in this order.
        scheduled_at (`float`): when `schedule` handed the batch out.
    """

    batch_id: int
    code: int
    requests: list[QueuedRequest]
    scheduled_at: float

    @property
    def num_images(self) -> int:
        return sum(request.num_images for request in self.requests)

    @property
    def request_ids(self) -> list[str]:
        return [request.request_id for request in self.requests]

    def queue_wait(self, request: QueuedRequest) -> float:
        """Seconds `request` spent queued before this batch was scheduled."""
        return self.scheduled_at - request.arrival


@dataclass(frozen=True)
class FinishedBatch:
    """What became of a batch's requests once the engine reported it.

    Parameters:
        batch (`ScheduledBatch`): the batch as it was scheduled.
        finished_at (`float`): when the engine reported it.
        completed (`list[QueuedRequest]`): requests whose results should be delivered.
        failed (`list[QueuedRequest]`): requests the engine failed on (`finish(..., error=...)`).
        discarded (`list[QueuedRequest]`): requests aborted while running: their results must be dropped.
        outputs (`dict[str, Any]`): request_id -> engine output, for `completed` requests (empty from `finish`).
        error (`BaseException`, *optional*): the engine's error, if the batch failed.
    """

    batch: ScheduledBatch
    finished_at: float
    completed: list[QueuedRequest]
    failed: list[QueuedRequest]
    discarded: list[QueuedRequest]
    outputs: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None

    @property
    def duration(self) -> float:
        return self.finished_at - self.batch.scheduled_at


class AbortOutcome(enum.StrEnum):
    """What `abort` did: removed a queued request, marked a running one for discard, or found nothing."""

    QUEUED = "queued"
    RUNNING = "running"
    UNKNOWN = "unknown"


@dataclass
class SchedulerStats:
    """A snapshot of the scheduler for metrics exporters (plain values, safe to read without any lock).

    Parameters:
        queued_requests (`dict[int, int]`): requests waiting, per code.
        queued_images (`dict[int, int]`): images those requests ask for, per code.
        running_batches (`int`): batches handed out and not finished.
        running_requests (`int`): requests in those batches.
        admitted (`int`): requests ever queued.
        rejected (`dict[str, int]`): refused requests by reason (`"queue_full"`, `"closed"`).
        expired (`int`): requests dropped by `expire` (queue deadline passed).
        aborted (`int`): requests aborted by their client (queued or running).
        completed (`int`): requests whose results were delivered.
        failed (`int`): requests in batches the engine reported as failed.
        completed_batches (`int`): batches finished without error.
        avg_batch_seconds (`dict[int, float | None]`): moving average duration of a finished batch, per code
            (None until a batch of that code has finished).
        closed (`bool`): whether admission has stopped.
    """

    queued_requests: dict[int, int]
    queued_images: dict[int, int]
    running_batches: int
    running_requests: int
    admitted: int
    rejected: dict[str, int]
    expired: int
    aborted: int
    completed: int
    failed: int
    completed_batches: int
    avg_batch_seconds: dict[int, float | None]
    closed: bool

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())


# ------------------------------------------------------------------------------------------------------ scheduler
class Scheduler:
    """Per-code FIFO queues and the batching policy (see the module docstring for the worker loop).

    Policy:
        - A code is *ready* when its queued images reach its `max_batch_size`, when its oldest request has waited
          `max_wait_ms`, or when the scheduler is closed (draining: no request will come to fill the batch).
        - Among ready codes, the one whose head-of-line request arrived first goes first. This cannot starve a code:
          each other code's FIFO queue holds at most `max_queue_size` requests older than the waiting request, so
          once ready it waits for at most `max_queue_size` batches per other code, however busy that code is.
        - A batch takes requests from the head of the queue while their images fit in `max_batch_size`, stopping
          at the first that does not (strict FIFO: skipping ahead could starve a large request). A head request
          larger than `max_batch_size` is scheduled alone.
        - At most `max_running_batches` batches are out at a time; `finish` / `update_from_output` frees a slot.

    Parameters:
        config (`SchedulerConfig`): the policy's numbers.
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self._lock = threading.Lock()
        self._queues: list[OrderedDict[str, QueuedRequest]] = [OrderedDict() for _ in range(config.num_codes)]
        self._queued_images = [0] * config.num_codes
        self._queued_code: dict[str, int] = {}  # request_id -> code, for queued requests
        # Admission order breaks ties between equal arrivals (coarse clocks), so "oldest first" stays FIFO.
        self._admission_seq: dict[str, int] = {}
        self._next_seq = itertools.count()
        self._running: dict[int, ScheduledBatch] = {}
        self._running_batch_of: dict[str, int] = {}  # request_id -> batch_id, for running requests
        self._discard: set[str] = set()  # running requests whose client went away
        self._batch_ids = itertools.count()
        self._closed = False
        self._avg_seconds: list[float | None] = [None] * config.num_codes
        self._counts: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter({REJECT_QUEUE_FULL: 0, REJECT_CLOSED: 0})

    # -------------------------------------------------------------------------------------------------- admission
    def add(self, request: QueuedRequest, now: float, admitted: bool = False) -> None:
        """Queue `request`. An `admitted` request (let in by `check_room`, whose place of the total it holds) is
        queued even when its code holds `max_queue_size` requests already: its code was not known at admission.

        Raises:
            ValueError: unknown code, `num_images < 1`, or a `request_id` already queued or running.
            SchedulerClosed: after `close()`.
            QueueFull: the code's queue is full (and the request was not admitted); carries `retry_after_s`
                estimated at `now`.
        """
        self._check_request(request)
        with self._lock:
            if request.request_id in self._queued_code or request.request_id in self._running_batch_of:
                raise ValueError(f"request_id {request.request_id!r} is already queued or running")
            if self._closed:
                self._rejected[REJECT_CLOSED] += 1
                raise SchedulerClosed()
            queue = self._queues[request.code]
            if len(queue) >= self.config.max_queue_size and not admitted:
                self._rejected[REJECT_QUEUE_FULL] += 1
                raise QueueFull(request.code, self._retry_after(request.code, now))
            queue[request.request_id] = request
            self._queued_images[request.code] += request.num_images
            self._queued_code[request.request_id] = request.code
            self._admission_seq[request.request_id] = next(self._next_seq)
            self._counts["admitted"] += 1

    def check_room(self, now: float, incoming: int = 0) -> None:
        """Admission, before a request is encoded and routed: refuse it when admission is closed or the queues
        together are full (`num_codes` x `max_queue_size` places), counting the `incoming` requests admitted and
        still being routed, which hold places already. Passing is the promise of a place: the routed request is
        queued with `add(..., admitted=True)` whatever its code's queue holds. So every refusal is answered at
        once, before any encoding, and no request is refused after it was let in.

        Raises:
            SchedulerClosed: after `close()`.
            QueueFull: no room (`code` None); `retry_after_s` is the soonest any queue has room.
        """
        with self._lock:
            if self._closed:
                self._rejected[REJECT_CLOSED] += 1
                raise SchedulerClosed()
            queued = sum(len(queue) for queue in self._queues)
            if queued + incoming >= self.config.num_codes * self.config.max_queue_size:
                self._rejected[REJECT_QUEUE_FULL] += 1
                # Room comes when a queued code's next batch leaves (with every place spoken for by requests
                # still being routed and no queue holding any, in about a second).
                waiting = [code for code in range(self.config.num_codes) if self._queues[code]]
                soonest = min((self._retry_after(code, now) for code in waiting), default=MIN_RETRY_SECONDS)
                raise QueueFull(None, soonest)

    def has_room(self, code: int) -> bool:
        """Whether `code`'s queue holds fewer than `max_queue_size` requests (its share of the places)."""
        with self._lock:
            return len(self._queues[code]) < self.config.max_queue_size

    def _check_request(self, request: QueuedRequest) -> None:
        if not 0 <= request.code < self.config.num_codes:
            raise ValueError(f"code must be in 0..{self.config.num_codes - 1} (got {request.code})")
        if request.num_images < 1:
            raise ValueError(f"num_images must be >= 1 (got {request.num_images})")

    def close(self) -> None:
        """Stop admission (SIGTERM). Queued and running work still drains: every non-empty code is ready at once,
        since no new request will arrive to fill its batch. Wait for `is_idle` before exiting."""
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        """Whether `close()` was called (admission stopped)."""
        return self._closed

    @property
    def is_idle(self) -> bool:
        """No request queued and no batch running."""
        with self._lock:
            return not self._queued_code and not self._running

    # ------------------------------------------------------------------------------------------------- scheduling
    def schedule(self, now: float) -> ScheduledBatch | None:
        """The next batch to run, or None when no code is ready or `max_running_batches` batches are out.

        Deadlines are not checked here: call `expire(now)` first so that timed-out requests are answered rather
        than run.
        """
        with self._lock:
            if len(self._running) >= self.config.max_running_batches:
                return None
            code = self._pick_code(now)
            if code is None:
                return None
            batch = ScheduledBatch(next(self._batch_ids), code, self._take_batch(code), now)
            self._running[batch.batch_id] = batch
            for request in batch.requests:
                self._running_batch_of[request.request_id] = batch.batch_id
            return batch

    def _pick_code(self, now: float) -> int | None:
        """The ready code with the oldest head-of-line request (equal arrivals: the one admitted first)."""
        ready = [code for code in range(self.config.num_codes) if self._ready_at(code) <= now + _EPSILON]
        return min(ready, key=self._head_age_key, default=None)

    def _head_age_key(self, code: int) -> tuple[float, int]:
        head = self._head(code)
        return head.arrival, self._admission_seq[head.request_id]

    def _ready_at(self, code: int) -> float:
        """When `code` becomes ready if nothing else is queued (inf for an empty queue, -inf for ready now)."""
        if not self._queues[code]:
            return math.inf
        if self._closed or self._queued_images[code] >= self.config.batch_size(code):
            return -math.inf
        return self._head(code).arrival + self.config.max_wait_seconds

    def _head(self, code: int) -> QueuedRequest:
        return next(iter(self._queues[code].values()))

    def join(self, code: int, room: int, now: float) -> list[ScheduledBatch]:
        """Step-level batching: move requests from the head of `code`'s queue into running, each a batch of its
        own (it leaves when its own steps are done), while their images fit in `room`, the images the code's
        running rows leave free of its `max_batch_size`. A head request larger than the whole batch size joins
        alone, when the code runs nothing. No waiting for a batch to fill: a later request joins at a later step.
        Bounded by `max_running_batches` like `schedule`."""
        with self._lock:
            queue, joined = self._queues[code], []
            alone = room >= self.config.batch_size(code)  # the code runs nothing
            while queue and len(self._running) < self.config.max_running_batches:
                head = self._head(code)
                if head.num_images > room and not (alone and not joined):
                    break
                self._unqueue(head)
                batch = ScheduledBatch(next(self._batch_ids), code, [head], now)
                self._running[batch.batch_id] = batch
                self._running_batch_of[head.request_id] = batch.batch_id
                room -= head.num_images
                joined.append(batch)
            return joined

    def _take_batch(self, code: int) -> list[QueuedRequest]:
        queue, limit = self._queues[code], self.config.batch_size(code)
        taken: list[QueuedRequest] = []
        images = 0
        while queue:
            head = self._head(code)
            if taken and images + head.num_images > limit:
                break
            self._unqueue(head)
            taken.append(head)
            images += head.num_images
        return taken

    def _unqueue(self, request: QueuedRequest) -> None:
        del self._queues[request.code][request.request_id]
        self._queued_images[request.code] -= request.num_images
        del self._queued_code[request.request_id]
        del self._admission_seq[request.request_id]

    def next_deadline(self, now: float) -> float | None:
        """Seconds from `now` until `schedule` or `expire` can have work without any other call: a code becoming
        ready by `max_wait_ms` (only while a running slot is free) or a queued request's deadline passing. 0.0 when
        there is work now; None when only an `add` or `finish` can create work (e.g. all queues are empty)."""
        with self._lock:
            times = list(self._queued_deadlines())
            if len(self._running) < self.config.max_running_batches:
                times += [self._ready_at(code) for code in range(self.config.num_codes)]
            soonest = min(times, default=math.inf)
            if soonest == math.inf:
                return None
            wait = soonest - now
            return 0.0 if wait <= _EPSILON else wait

    def next_expiry(self, now: float) -> float | None:
        """Seconds from `now` until a queued request's deadline passes (0.0 if one has; None when none has a
        deadline): how long a worker with nothing it may run can sleep before `expire` has work."""
        with self._lock:
            soonest = min(self._queued_deadlines(), default=None)
        return None if soonest is None else max(0.0, soonest - now)

    def queued_since(self, code: int) -> float | None:
        """The arrival of the oldest request queued for `code` (None: its queue is empty)."""
        with self._lock:
            return self._head(code).arrival if self._queues[code] else None

    def _queued_deadlines(self) -> Iterator[float]:
        for queue in self._queues:
            for request in queue.values():
                if request.deadline is not None:
                    yield request.deadline

    def expire(self, now: float) -> list[QueuedRequest]:
        """Drop and return the queued requests whose deadline is at or before `now` (oldest first). Running
        requests are never expired: their compute is already spent."""
        with self._lock:
            expired = [
                request
                for queue in self._queues
                for request in queue.values()
                if request.deadline is not None and request.deadline <= now
            ]
            for request in expired:
                self._unqueue(request)
            self._counts["expired"] += len(expired)
        return sorted(expired, key=lambda request: request.arrival)

    def abort(self, request_id: str) -> AbortOutcome:
        """The client went away: drop the request if it is queued (it will never be scheduled), or mark it so
        that its result is discarded when its batch finishes. Idempotent."""
        with self._lock:
            code = self._queued_code.get(request_id)
            if code is not None:
                self._unqueue(self._queues[code][request_id])
                self._counts["aborted"] += 1
                return AbortOutcome.QUEUED
            if request_id in self._running_batch_of:
                if request_id not in self._discard:
                    self._discard.add(request_id)
                    self._counts["aborted"] += 1
                return AbortOutcome.RUNNING
            return AbortOutcome.UNKNOWN

    def is_aborted(self, request_id: str) -> bool:
        """Whether a running request was aborted (the engine may skip work it only does for delivery)."""
        with self._lock:
            return request_id in self._discard

    # -------------------------------------------------------------------------------------------------- completion
    def update_from_output(self, batch_id: int, outputs: Sequence[Any], now: float) -> FinishedBatch:
        """Record that batch `batch_id` finished at `now` with `outputs`, one per request in `batch.requests`
        order; frees its running slot. Outputs of aborted requests are dropped (`discarded`)."""
        with self._lock:
            batch = self._running_batch(batch_id)
            if len(outputs) != len(batch.requests):
                raise ValueError(f"batch {batch_id} has {len(batch.requests)} requests but got {len(outputs)} outputs")
            by_id = {request.request_id: output for request, output in zip(batch.requests, outputs, strict=True)}
            return self._retire(batch, now, by_id, error=None)

    def finish(self, batch_id: int, now: float, error: BaseException | None = None) -> FinishedBatch:
        """Record that batch `batch_id` ended at `now` (failed if `error` is given) and free its running slot.
        Use `update_from_output` to have outputs paired with requests."""
        with self._lock:
            return self._retire(self._running_batch(batch_id), now, {}, error)

    def _running_batch(self, batch_id: int) -> ScheduledBatch:
        batch = self._running.get(batch_id)
        if batch is None:
            raise KeyError(f"batch {batch_id} is not running (unknown or already finished)")
        return batch

    def _retire(
        self, batch: ScheduledBatch, now: float, outputs: dict[str, Any], error: BaseException | None
    ) -> FinishedBatch:
        del self._running[batch.batch_id]
        kept, discarded = [], []
        for request in batch.requests:
            del self._running_batch_of[request.request_id]
            if request.request_id in self._discard:
                self._discard.discard(request.request_id)
                discarded.append(request)
            else:
                kept.append(request)
        if error is None:
            self._counts["completed"] += len(kept)
            self._counts["completed_batches"] += 1
            self._record_duration(batch.code, now - batch.scheduled_at)
            completed, failed = kept, []
        else:
            # A failed batch's duration says nothing about how long a batch takes, so it stays out of the average.
            self._counts["failed"] += len(kept)
            completed, failed = [], kept
        delivered = {r.request_id: outputs[r.request_id] for r in completed if r.request_id in outputs}
        return FinishedBatch(batch, now, completed, failed, discarded, delivered, error)

    def _record_duration(self, code: int, seconds: float) -> None:
        previous = self._avg_seconds[code]
        alpha = self.config.duration_ema_alpha
        self._avg_seconds[code] = seconds if previous is None else alpha * seconds + (1 - alpha) * previous

    # ----------------------------------------------------------------------------------------------------- estimates
    def _batch_seconds(self, code: int) -> float:
        """Expected duration of a batch of `code`: its own average, else the mean over codes, else the default."""
        own = self._avg_seconds[code]
        if own is not None:
            return own
        known = [seconds for seconds in self._avg_seconds if seconds is not None]
        return sum(known) / len(known) if known else self.config.initial_batch_seconds

    def _retry_after(self, code: int, now: float) -> float:
        """Seconds until `code`'s queue has room (at least `MIN_RETRY_SECONDS`): a full queue gets room when its next
        batch is scheduled, which happens once a running slot is free and the codes with older heads have had a batch
        each (fairness)."""
        slots = self.config.max_running_batches
        slot_wait = 0.0
        if len(self._running) >= slots:
            slot_wait = min(
                max(0.0, batch.scheduled_at + self._batch_seconds(batch.code) - now) for batch in self._running.values()
            )
        head = self._head_age_key(code)
        older = [
            other
            for other in range(self.config.num_codes)
            if other != code and self._queues[other] and self._head_age_key(other) < head
        ]
        ahead = sum(self._batch_seconds(other) for other in older) / slots
        return max(MIN_RETRY_SECONDS, slot_wait + ahead)

    # -------------------------------------------------------------------------------------------------------- stats
    def stats(self) -> SchedulerStats:
        """A consistent snapshot, taken under the lock."""
        with self._lock:
            codes = range(self.config.num_codes)
            return SchedulerStats(
                queued_requests={code: len(self._queues[code]) for code in codes},
                queued_images={code: self._queued_images[code] for code in codes},
                running_batches=len(self._running),
                running_requests=len(self._running_batch_of),
                admitted=self._counts["admitted"],
                rejected=dict(self._rejected),
                expired=self._counts["expired"],
                aborted=self._counts["aborted"],
                completed=self._counts["completed"],
                failed=self._counts["failed"],
                completed_batches=self._counts["completed_batches"],
                avg_batch_seconds={code: self._avg_seconds[code] for code in codes},
                closed=self._closed,
            )
