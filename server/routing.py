"""The routing stage: encoding and routing of the API's prompts on one worker thread, in batches, behind a bounded
queue.

A request that cannot wait for routing is refused at once (`RoutingFull`, HTTP 429) instead of every request of a
burst being encoded in its own thread beside the engine. Requests that arrive while a batch is being routed are
encoded and routed together as the next batch (one encoder call, one router call), which is what a burst needs; a
lone request is routed as soon as it arrives. A prompt's code never depends on its batch: routing is per prompt,
and the encoder pads by length bucket (`aptp.conditioning.encoder`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from aptp.conditioning.prompts import Conditioning
from aptp.pipeline import RoutedPipeline

from .priority import settle_compute_thread

logger = logging.getLogger("aptp.routing")


class RoutingFull(Exception):
    """The routing stage holds `max_pending` requests already."""


@dataclass
class Routed:
    """One request, encoded and routed: its conditioning (the prompt, then the negative prompt if any), the codes in
    the router's order of preference for its prompt (`ranking[0]` is the router's choice) with its score for each,
    the seconds its batch took, and of those the seconds spent encoding the prompts (which the U-Net's conditioning
    needs whether or not a router reads them; the rest chose the codes)."""

    encoded: Conditioning
    ranking: list[int]
    scores: list[float]
    seconds: float
    batch_prompts: int
    encode_seconds: float

    @property
    def code(self) -> int:
        """The router's choice."""
        return self.ranking[0]


class RoutingStage:
    """Parameters:
    pipeline (`RoutedPipeline`): what encodes and routes.
    max_pending (`int`): requests waiting for routing at most; more are refused.
    max_batch (`int`): requests routed together at most.
    niceness (`int`): how much lower the routing thread's CPU priority is than the event loop's (`server.priority`).
    threads (`int`, *optional*): the routing thread's torch intra-op threads; None: torch's default.
    """

    def __init__(
        self,
        pipeline: RoutedPipeline,
        max_pending: int = 64,
        max_batch: int = 32,
        niceness: int = 0,
        threads: int | None = None,
    ):
        self.pipeline, self.max_batch, self.niceness, self.threads = pipeline, max_batch, niceness, threads
        self._queue: queue.Queue[tuple[list[str], Future] | None] = queue.Queue(maxsize=max_pending)
        self._in_flight, self._count_lock = 0, threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="aptp-routing", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str]) -> Future:
        """Queue one request's texts (prompt, then optional negative prompt); its `Future` resolves to `Routed`."""
        future: Future = Future()
        with self._count_lock:
            try:
                self._queue.put_nowait((texts, future))
            except queue.Full:
                raise RoutingFull("the routing stage is full") from None
            self._in_flight += 1
        future.add_done_callback(self._left)
        return future

    def _left(self, _: Future) -> None:
        with self._count_lock:
            self._in_flight -= 1

    @property
    def full(self) -> bool:
        """Whether `submit` would refuse a request now."""
        return self._queue.full()

    @property
    def pending(self) -> int:
        """Requests waiting for a routing batch."""
        return self._queue.qsize()

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet routed (waiting or in the batch being routed)."""
        return self._in_flight

    def warm_up(self) -> None:
        """Route one prompt alone, then a full batch of short and long ones, through this stage's own thread, so the
        first requests of a burst do not pay for the encoder's and router's lazy initialisation."""
        texts = ["a warm-up prompt", " ".join(["a long warm-up prompt with many words"] * 8)]
        for count in (1, min(self.max_batch, self._queue.maxsize)):
            for future in [self.submit([texts[i % 2]]) for i in range(count)]:
                future.result()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        settle_compute_thread(self.niceness, self.threads)
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            while len(jobs) < self.max_batch:  # whatever arrived meanwhile joins this batch
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._run(jobs)
                    return
                jobs.append(job)
            self._run(jobs)

    def _run(self, jobs: list[tuple[list[str], Future]]) -> None:
        jobs = [(texts, future) for texts, future in jobs if future.set_running_or_notify_cancel()]
        if not jobs:
            return
        began = time.monotonic()
        try:
            texts = [text for request, _ in jobs for text in request]
            encoded = self.pipeline.encode(texts)
            encode_seconds = time.monotonic() - began
            routed = self.pipeline.route(encoded)
        except Exception as error:  # noqa: BLE001 - the batch's requests get the error; the stage keeps going
            logger.exception("routing a batch of %d request(s) failed", len(jobs))
            for _, future in jobs:
                future.set_exception(error)
            return
        seconds = time.monotonic() - began
        row = 0
        for request, future in jobs:
            rows = list(range(row, row + len(request)))
            ranking, scores = routed.rankings[row], routed.all_scores[row]
            future.set_result(Routed(encoded.select(rows), ranking, scores, seconds, len(texts), encode_seconds))
            row += len(request)
