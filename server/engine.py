"""The engine: every expert resident, worker threads that turn the scheduler's batches into images.

The API layer (event loop) encodes and routes a prompt, then calls `submit`, which queues the request and returns a
`concurrent.futures.Future`; a worker thread resolves it. Workers never wait on the event loop and the event loop
never waits on a U-Net, so slow batches cannot stall health checks or admission.

Several workers run batches side by side, each on its own intra-op threads. On a CPU that beats one batch spread
over every core: a U-Net of this size is thousands of small operators, and a team of OpenMP threads meets at a
barrier after each one, waiting for its slowest member (and for any member another thread took the core from).
Two batches on one thread each never wait for each other.

Per-image seeds make an image depend only on its prompt, seed, steps and guidance, not on the batch it shares: the
noise of each image comes from its own generator and the denoiser treats rows independently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from aptp.conditioning.prompts import Conditioning
from aptp.pipeline import RoutedPipeline
from aptp.sampling import Trajectory, advance, unet_calls

from .metrics import ServerMetrics
from .priority import on_passing_thread, settle_compute_thread, use_intra_op_threads
from .scheduler import (
    AbortOutcome,
    FinishedBatch,
    QueuedRequest,
    ScheduledBatch,
    Scheduler,
    SchedulerConfig,
    SchedulerStats,
)
from .settings import Settings

logger = logging.getLogger("aptp.engine")


# ------------------------------------------------------------------------------------------------------- outcomes
class GenerationError(Exception):
    """Why a queued request produced no images (the API layer maps each kind to an HTTP status)."""


class QueueTimeout(GenerationError):
    """The request waited in the queue longer than its timeout and was dropped (HTTP 504)."""


class BatchFailed(GenerationError):
    """The batch holding the request raised; the message says what went wrong (HTTP 500)."""


class EngineStopped(GenerationError):
    """The server stopped before the request ran (HTTP 503)."""


@dataclass
class GenerationJob:
    """What the engine needs to run one request (the scheduler's payload).

    Parameters:
        prompt (`Conditioning`): the prompt, one row.
        seeds (`list[int]`): one per image.
        steps (`int`): sampling steps.
        guidance_scale (`float`): classifier-free guidance scale (1.0: no unconditional branch).
        negative (`Conditioning`, *optional*): the negative prompt, one row (default: the empty prompt).
    """

    prompt: Conditioning
    seeds: list[int]
    steps: int
    guidance_scale: float
    negative: Conditioning | None = None


@dataclass
class GenerationResult:
    """A finished request.

    Parameters:
        images (`torch.Tensor`): `(N, 3, H, W)` uint8.
        code (`int`): the expert that made them.
        unet_calls (`int`): U-Net evaluations per image (steps, doubled under guidance).
        batch_images (`int`): images in the batch the request ran in.
        queue_seconds (`float`): arrival to batch start.
        compute_seconds (`float`): duration of the batch.
    """

    images: torch.Tensor
    code: int
    unet_calls: int
    batch_images: int
    queue_seconds: float
    compute_seconds: float


def run_jobs(pipeline: RoutedPipeline, code: int, jobs: list[GenerationJob]) -> list[tuple[torch.Tensor, int]]:
    """Run one batch of `code`'s jobs: per job, its `(n, 3, H, W)` uint8 images and the U-Net calls each image cost.
    Jobs with equal step counts share U-Net calls; rows carry their own seed, guidance scale and negative prompt.
    What a batch is, wherever it runs (this engine's worker, or a Ray Serve expert replica)."""
    outputs: list[tuple[torch.Tensor, int] | None] = [None] * len(jobs)
    by_steps: dict[int, list[int]] = {}
    for index, job in enumerate(jobs):
        by_steps.setdefault(job.steps, []).append(index)
    empty = pipeline.empty_prompt
    for steps, indices in by_steps.items():
        group = [jobs[i] for i in indices]
        counts = [len(job.seeds) for job in group]
        cond = Conditioning.cat([job.prompt.repeat(n) for job, n in zip(group, counts, strict=True)])
        negative = None
        if any(job.negative is not None for job in group):
            # A job without a negative prompt is guided against the empty prompt.
            own = [empty if job.negative is None else job.negative for job in group]
            negative = Conditioning.cat([row.repeat(n) for row, n in zip(own, counts, strict=True)])
        scales = [job.guidance_scale for job, n in zip(group, counts, strict=True) for _ in range(n)]
        images = pipeline.generate(
            code,
            cond,
            seeds=[seed for job in group for seed in job.seeds],
            steps=steps,
            guidance_scales=scales,
            negative=negative,
        )
        calls = unet_calls(steps, scales)  # a guided batch runs both branches for every row
        for index, chunk in zip(indices, images.split(counts), strict=True):
            outputs[index] = (chunk, calls)
    return outputs


@dataclass
class _RunningRequest:
    """A request in its code's running rows (step-level batching): its denoising so far, and what it cost."""

    batch: ScheduledBatch
    request: QueuedRequest
    trajectory: Trajectory
    joined_at: float
    unet_calls: int = 0
    largest_call: int = 0


def _images(rows: list[_RunningRequest]) -> int:
    return sum(row.request.num_images for row in rows)


# --------------------------------------------------------------------------------------------------------- engine
class Engine:
    """Resident experts + scheduler + worker threads.

    Parameters:
        pipeline (`RoutedPipeline`): encoder, router and experts.
        scheduler_config (`SchedulerConfig`): batching and admission policy (`num_codes` must match the pipeline).
        metrics (`ServerMetrics`, *optional*): where batch and request events are recorded.
        clock (`Callable[[], float]`): monotonic seconds (tests may pass their own).
        step_level (`bool`): step-level batching (requests join and leave a code's running rows between denoising
            steps) instead of whole batches run from first step to last.
        niceness (`int`): how much lower the workers' CPU priority is than the event loop's (`server.priority`).
        threads (`int`, *optional*): torch intra-op threads of each worker (and of warm-up); None: torch's default.
        workers (`int`): worker threads side by side, each running one whole batch at a time (any codes; the
            scheduler hands out at most this many batches at once) or, with step-level batching, one step of one
            lane at a time (a code's running rows sit in up to `workers` lanes; no two workers step the same lane).
    """

    def __init__(
        self,
        pipeline: RoutedPipeline,
        scheduler_config: SchedulerConfig,
        metrics: ServerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        step_level: bool = False,
        niceness: int = 0,
        threads: int | None = None,
        workers: int = 1,
    ):
        if scheduler_config.num_codes != pipeline.num_codes:
            raise ValueError(f"scheduler has {scheduler_config.num_codes} codes, the bundle {pipeline.num_codes}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1 (got {workers})")
        self.pipeline = pipeline
        if step_level:  # every running request is a batch of its own; a lane holds at most its code's batch size
            codes = range(scheduler_config.num_codes)
            limit = workers * sum(scheduler_config.batch_size(code) for code in codes)
            scheduler_config = scheduler_config.model_copy(update={"max_running_batches": limit})
        else:  # each worker holds one batch
            scheduler_config = scheduler_config.model_copy(update={"max_running_batches": workers})
        self.scheduler = Scheduler(scheduler_config)
        self.metrics = metrics
        self.clock = clock
        self.step_level = step_level
        self.niceness, self.threads, self.workers = niceness, threads, workers
        # Step-level batching: each code's lanes of running requests, and the lanes (code, index) being stepped now.
        self._lanes: dict[int, list[list[_RunningRequest]]] = {
            code: [[] for _ in range(workers)] for code in range(pipeline.num_codes)
        }
        self._claimed: set[tuple[int, int]] = set()
        self._futures: dict[str, Future] = {}
        self._futures_lock = threading.Lock()
        # Guards "schedule, else sleep" against "add, then notify": no wake-up is lost between the two.
        self._wakeup = threading.Condition()
        self._stop = False
        self._threads: list[threading.Thread] = []
        if metrics is not None:
            metrics.watch_scheduler(self.stats)

    @classmethod
    def from_settings(
        cls, pipeline: RoutedPipeline, settings: Settings, metrics: ServerMetrics | None = None
    ) -> Engine:
        """The engine an operator's settings describe: their batching and admission policy, batching mode and
        compute priority."""
        return cls(
            pipeline,
            settings.scheduler_config(pipeline.num_codes),
            metrics,
            step_level=settings.batching == "step",
            niceness=settings.compute_niceness,
            threads=settings.worker_threads,
            workers=settings.workers,
        )

    # ------------------------------------------------------------------------------------------------ lifecycle
    def warm_up(self, steps: int = 2) -> None:
        """Run every expert once (guided, one image) so first requests do not pay for lazy initialisation. On a
        thread that ends with it, so the caller's thread keeps no OpenMP workers (`server.priority.on_passing_thread`).
        """

        def run() -> None:
            use_intra_op_threads(self.threads)
            for code in range(self.pipeline.num_codes):
                empty = self.pipeline.empty_prompt
                for scale in (2.0, 1.0):
                    self.pipeline.generate(code, empty, [0], steps, [scale])

        on_passing_thread(run, "aptp-engine-warm-up")

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("engine already started")
        self._threads = [
            threading.Thread(target=self._loop, name=f"aptp-engine-{i}", daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        threads = "torch's default" if self.threads is None else self.threads
        logger.info("engine: %d worker(s), %s intra-op thread(s) each", self.workers, threads)

    @property
    def running(self) -> bool:
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    @property
    def draining(self) -> bool:
        return self.scheduler.closed

    def begin_drain(self) -> None:
        """Stop admitting; queued requests still run (partial batches go at once)."""
        with self._wakeup:
            self.scheduler.close()
            self._wakeup.notify_all()

    def wait_drained(self, timeout: float | None = None) -> bool:
        """After `begin_drain`: wait until queued and running work is done; False if `timeout` passed first."""
        deadline = None if timeout is None else self.clock() + timeout
        while not self.scheduler.is_idle:
            if not self.running:
                return False
            if deadline is not None and self.clock() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def shutdown(self, drain_timeout: float | None = 0.0) -> bool:
        """Drain for up to `drain_timeout` seconds, then stop the workers; requests still queued get `EngineStopped`.
        Returns whether everything was drained."""
        self.begin_drain()
        drained = self.wait_drained(drain_timeout) if self.running else self.scheduler.is_idle
        with self._wakeup:
            self._stop = True
            self._wakeup.notify_all()
        for thread in self._threads:
            thread.join()
        with self._futures_lock:
            unanswered = list(self._futures)
        for request_id in unanswered:  # still queued: the worker is gone, so answer them here
            self.scheduler.abort(request_id)
            self._fail(request_id, EngineStopped("the server stopped before this request ran"))
        return drained

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    # ------------------------------------------------------------------------------------------------- requests
    def check_room(self, incoming: int = 0) -> None:
        """Raise the scheduler's `QueueFull` / `SchedulerClosed` now if no code could take a request, counting the
        `incoming` requests admitted and still being routed (see `Scheduler.check_room`): call before spending work
        on a request."""
        self.scheduler.check_room(self.clock(), incoming)

    def has_room(self, code: int) -> bool:
        """Whether `code`'s queue is below its share of the places (`Scheduler.has_room`)."""
        return self.scheduler.has_room(code)

    def submit(
        self,
        request_id: str,
        code: int,
        job: GenerationJob,
        timeout_s: float | None = None,
        admitted: bool = False,
    ) -> Future:
        """Queue a request; raises the scheduler's `QueueFull` / `SchedulerClosed` (nothing is queued then). An
        `admitted` request (let in by `check_room`) is queued whatever its code's queue holds."""
        now = self.clock()
        request = QueuedRequest(
            request_id=request_id,
            code=code,
            num_images=len(job.seeds),
            arrival=now,
            deadline=None if timeout_s is None else now + timeout_s,
            payload=job,
        )
        future: Future = Future()
        with self._futures_lock:
            self._futures[request_id] = future
        try:
            with self._wakeup:
                self.scheduler.add(request, now, admitted=admitted)
                self._wakeup.notify()
        except BaseException:
            with self._futures_lock:
                del self._futures[request_id]
            raise
        return future

    def abort(self, request_id: str) -> AbortOutcome:
        """The client went away: drop its queued work (or discard its running batch's output for it)."""
        outcome = self.scheduler.abort(request_id)
        if outcome is AbortOutcome.QUEUED:
            future = self._pop_future(request_id)
            if future is not None:
                future.cancel()
        return outcome

    # ---------------------------------------------------------------------------------------------- worker loop
    def _loop(self) -> None:
        settle_compute_thread(self.niceness, self.threads)
        if self.step_level:
            self._step_loop()
            return
        while True:
            now = self._expire()
            with self._wakeup:
                if self._stop:
                    return
                batch = self.scheduler.schedule(now)
                if batch is None:
                    self._wakeup.wait(timeout=self.scheduler.next_deadline(now))
                    continue
            self._run(batch)

    def _expire(self) -> float:
        """Answer the queued requests whose timeout passed (504); returns the time it checked at."""
        now = self.clock()
        for request in self.scheduler.expire(now):
            if self.metrics is not None:
                self.metrics.rejections.labels(reason="queue_timeout").inc()
            self._fail(request.request_id, QueueTimeout("the request waited too long in the queue"))
        return now

    def _step_loop(self) -> None:
        """Step-level batching. A code's running requests sit in lanes (up to one per worker), each stepped as one
        U-Net call. A worker claims one lane at a time, the unclaimed lane holding the oldest request (running, or
        queued for its code: first come, first served, step by step, so no code starves); its code's queued requests
        join it (up to the code's batch size), it takes one denoising step, and rows whose steps are done leave and
        are answered at once; then the claim is let go. Queued requests join a lane that already runs rows of their
        code when one is free and has room, so a code's rows stay in as few U-Net calls as the workers allow; a
        second lane opens only while every running lane of the code is claimed or full, which is how a second worker
        shares the work of a code that has all of it instead of idling. A lane's rows are only ever touched by the
        worker holding its claim."""
        while True:
            now = self._expire()
            with self._wakeup:
                if self._stop:
                    return
                lane = self._oldest_unclaimed_lane()
                if lane is None:  # work of claimed lanes only, or none: a claim let go or an `add` wakes us
                    self._wakeup.wait(timeout=self.scheduler.next_expiry(now))
                    continue
                self._claimed.add(lane)
                joined = self._join(lane, now)
            try:
                for batch in joined:  # outside the lock: `submit` never waits for noise to be drawn
                    self._start_or_fail(batch, lane, now)
                if self._rows(lane):
                    self._step(lane)
            finally:
                with self._wakeup:
                    self._claimed.discard(lane)
                    self._wakeup.notify_all()

    def _rows(self, lane: tuple[int, int]) -> list[_RunningRequest]:
        code, index = lane
        return self._lanes[code][index]

    def _oldest_unclaimed_lane(self) -> tuple[int, int] | None:
        """The lane no worker holds whose oldest request, running or queued for it, arrived first (None: no such
        work). A code's queued requests count for the lane they would join (`_lane_to_join`)."""
        oldest: dict[tuple[int, int], float] = {}
        for code, lanes in self._lanes.items():
            for index, rows in enumerate(lanes):
                if rows and (code, index) not in self._claimed:
                    oldest[(code, index)] = min(row.request.arrival for row in rows)
            queued = self.scheduler.queued_since(code)
            lane = None if queued is None else self._lane_to_join(code)
            if lane is not None:
                oldest[lane] = min(oldest.get(lane, queued), queued)
        return min(oldest, key=oldest.__getitem__, default=None)

    def _lane_to_join(self, code: int) -> tuple[int, int] | None:
        """Where `code`'s queued requests go: its unclaimed lane with running rows and the most of them while room
        is left, else an unclaimed empty lane (a new U-Net call beside the running ones), else none for now."""
        batch_size = self.scheduler.config.batch_size(code)
        free = [index for index in range(self.workers) if (code, index) not in self._claimed]
        running = [index for index in free if 0 < _images(self._lanes[code][index]) < batch_size]
        if running:
            return code, max(running, key=lambda index: _images(self._lanes[code][index]))
        empty = [index for index in free if not self._lanes[code][index]]
        return (code, empty[0]) if empty else None

    def _start_or_fail(self, batch: ScheduledBatch, lane: tuple[int, int], now: float) -> None:
        try:
            self._start(batch, lane, now)
        except Exception as error:  # noqa: BLE001 - a request that cannot start fails alone
            logger.exception("starting request %s failed", batch.requests[0].request_id)
            finished = self.scheduler.finish(batch.batch_id, self.clock(), error=error)
            for request in finished.failed:
                self._fail(request.request_id, BatchFailed(f"generation failed: {type(error).__name__}: {error}"))
            self._drop(finished)

    def _join(self, lane: tuple[int, int], now: float) -> list[ScheduledBatch]:
        """The queued requests of the lane's code that join its running rows now (`Scheduler.join`)."""
        code = lane[0]
        room = self.scheduler.config.batch_size(code) - _images(self._rows(lane))
        return self.scheduler.join(code, room, now)

    def _start(self, batch: ScheduledBatch, lane: tuple[int, int], now: float) -> None:
        (request,) = batch.requests
        job: GenerationJob = request.payload
        count = len(job.seeds)
        negative = None if job.negative is None else job.negative.repeat(count)
        trajectory = self.pipeline.trajectory(
            batch.code, job.prompt.repeat(count), job.seeds, job.steps, [job.guidance_scale] * count, negative
        )
        self._rows(lane).append(_RunningRequest(batch, request, trajectory, now))

    def _step(self, lane: tuple[int, int]) -> None:
        code, rows = lane[0], self._rows(lane)
        for row in [r for r in rows if self.scheduler.is_aborted(r.request.request_id)]:
            rows.remove(row)  # its client left: no more steps for it
            self._drop(self.scheduler.finish(row.batch.batch_id, self.clock()))
        if not rows:
            return
        started = self.clock()
        guided = any(row.trajectory.guided for row in rows)
        try:
            advance(self.pipeline.experts[code], [row.trajectory for row in rows])
        except Exception as error:  # noqa: BLE001 - a failing step fails this lane's running requests only
            logger.exception("a denoising step of code %d failed", code)
            message = f"generation failed: {type(error).__name__}: {error}"
            for row in rows:
                finished = self.scheduler.finish(row.batch.batch_id, self.clock(), error=error)
                for request in finished.failed:
                    self._fail(request.request_id, BatchFailed(message))
                self._drop(finished)
            rows.clear()
            return
        images_in_call = sum(len(row.trajectory) for row in rows)
        if self.metrics is not None:
            self.metrics.batch_size.labels(code=str(code)).observe(images_in_call)
            self.metrics.compute.labels(code=str(code)).observe(self.clock() - started)
        for row in rows:
            row.unet_calls += 2 if guided else 1  # a guided call runs both branches for every row
            row.largest_call = max(row.largest_call, images_in_call)
        for row in [r for r in rows if r.trajectory.done]:
            rows.remove(row)
            self._answer(code, row)

    def _answer(self, code: int, row: _RunningRequest) -> None:
        """Decode a finished request's images and deliver them."""
        request = row.request
        try:
            images = self.pipeline.decode(row.trajectory.x)
        except Exception as error:  # noqa: BLE001
            logger.exception("decoding request %s failed", request.request_id)
            finished = self.scheduler.finish(row.batch.batch_id, self.clock(), error=error)
            for failed in finished.failed:
                self._fail(failed.request_id, BatchFailed(f"generation failed: {type(error).__name__}: {error}"))
            self._drop(finished)
            return
        calls = row.unet_calls
        finished = self.scheduler.update_from_output(row.batch.batch_id, [(images, calls)], self.clock())
        if self.metrics is not None:
            label = str(code)
            self.metrics.queue_wait.labels(code=label).observe(row.batch.queue_wait(request))
            self.metrics.images.labels(code=label).inc(request.num_images)
            self.metrics.macs.labels(code=label).inc(calls * request.num_images * self.pipeline.codes[code].macs)
        result = GenerationResult(
            images=images,
            code=code,
            unet_calls=calls,
            batch_images=row.largest_call,
            queue_seconds=row.batch.queue_wait(request),
            compute_seconds=finished.finished_at - row.joined_at,
        )
        if finished.completed:
            self._deliver(request.request_id, result)
        self._drop(finished)

    def _deliver(self, request_id: str, result: GenerationResult) -> None:
        future = self._pop_future(request_id)
        if future is not None and future.set_running_or_notify_cancel():
            future.set_result(result)

    def _run(self, batch: ScheduledBatch) -> None:
        started = self.clock()
        try:
            outputs = run_jobs(self.pipeline, batch.code, [request.payload for request in batch.requests])
        except Exception as error:  # noqa: BLE001 - any failure fails this batch only; the server keeps serving
            logger.exception("batch %d (code %d) failed", batch.batch_id, batch.code)
            finished = self.scheduler.finish(batch.batch_id, self.clock(), error=error)
            message = f"generation failed: {type(error).__name__}: {error}"
            for request in finished.failed:
                self._fail(request.request_id, BatchFailed(message))
            self._drop(finished)
            return
        finished = self.scheduler.update_from_output(batch.batch_id, outputs, self.clock())
        compute_seconds = finished.finished_at - started
        macs_per_call = self.pipeline.codes[batch.code].macs
        if self.metrics is not None:
            code = str(batch.code)
            self.metrics.batch_size.labels(code=code).observe(batch.num_images)
            self.metrics.compute.labels(code=code).observe(compute_seconds)
            for request, (_, calls) in zip(batch.requests, outputs, strict=True):
                self.metrics.queue_wait.labels(code=code).observe(batch.queue_wait(request))
                self.metrics.images.labels(code=code).inc(request.num_images)
                self.metrics.macs.labels(code=code).inc(calls * request.num_images * macs_per_call)
        for request in finished.completed:
            images, calls = finished.outputs[request.request_id]
            result = GenerationResult(
                images=images,
                code=batch.code,
                unet_calls=calls,
                batch_images=batch.num_images,
                queue_seconds=batch.queue_wait(request),
                compute_seconds=compute_seconds,
            )
            self._deliver(request.request_id, result)
        self._drop(finished)

    # ---------------------------------------------------------------------------------------------------- helpers
    def _pop_future(self, request_id: str) -> Future | None:
        with self._futures_lock:
            return self._futures.pop(request_id, None)

    def _fail(self, request_id: str, error: GenerationError) -> None:
        future = self._pop_future(request_id)
        if future is not None and future.set_running_or_notify_cancel():
            future.set_exception(error)

    def _drop(self, finished: FinishedBatch) -> None:
        """Forget the futures of requests whose client left while their batch ran."""
        for request in finished.discarded:
            future = self._pop_future(request.request_id)
            if future is not None:
                future.cancel()
