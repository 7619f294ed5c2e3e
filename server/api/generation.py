"""One generation request from arrival to answer, shared by `/generate` and `/v1/images/generations`: check the
operator's limits, encode and route the prompt off the event loop, queue it, wait for the engine while watching
for the client leaving, and build the report."""

from __future__ import annotations

import asyncio
import base64
import io
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from fastapi import Request
from PIL import Image

from aptp.pipeline import BudgetError, ComputeBudget

from ..engine import BatchFailed, EngineStopped, GenerationJob, GenerationResult, QueueTimeout
from ..routing import RoutingFull
from ..scheduler import MIN_RETRY_SECONDS, QueueFull, SchedulerClosed
from ..schemas import GenerationReport, seed_problem
from ..state import ServerState
from .errors import NOT_READY_RETRY_SECONDS, ApiError, invalid, retry_headers

# How often a waiting request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.1
# Statuses answered to clients that left (nginx's convention; nobody reads it).
CLIENT_CLOSED_REQUEST = 499


@dataclass
class GenerationParameters:
    prompt: str
    negative_prompt: str | None
    num_images: int
    steps: int | None
    guidance_scale: float | None
    seed: int | None
    max_macs_ratio: float | None = None
    quality: str | None = None

    def budget(self) -> ComputeBudget | None:
        """The request's compute budget (422 naming the field when malformed)."""
        if self.max_macs_ratio is None and self.quality is None:
            return None
        try:
            return ComputeBudget(self.max_macs_ratio, self.quality)
        except BudgetError as e:
            raise invalid(e.field, e.message) from None


@dataclass
class Generation:
    images: list[tuple[str, int]]  # (base64 PNG, seed)
    report: GenerationReport


def png_base64(image: torch.Tensor) -> str:
    """`(3, H, W)` uint8 -> base64 PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def check_limits(state: ServerState, params: GenerationParameters, images_field: str = "num_images") -> None:
    settings = state.settings
    if len(params.prompt) > settings.max_prompt_chars:
        raise invalid("prompt", f"at most {settings.max_prompt_chars} characters (got {len(params.prompt)})")
    if params.negative_prompt is not None and len(params.negative_prompt) > settings.max_prompt_chars:
        raise invalid("negative_prompt", f"at most {settings.max_prompt_chars} characters")
    if params.num_images > settings.max_images_per_request:
        raise invalid(images_field, f"at most {settings.max_images_per_request} images per request")
    if params.steps is not None and params.steps > settings.max_steps:
        raise invalid("steps", f"at most {settings.max_steps} steps (got {params.steps})")
    if (problem := seed_problem(params.seed, params.num_images)) is not None:
        raise invalid("seed", problem)
    if state.pipeline is not None:  # a cap below the cheapest code is refused before the prompt is routed
        try:
            state.pipeline.check_budget(params.budget())
        except BudgetError as e:
            raise invalid(e.field, e.message) from None


def check_admission(state: ServerState) -> None:
    """Raise the `ApiError` a generation request gets now whatever it asks for: 503 while not ready, 429 with
    Retry-After when the queues hold all their places (counting requests being routed) or the routing stage is
    full. Cheap, and asked twice: at the door before the body is read (`server.api.limits.AdmissionDoor`) and by
    the route before the prompt is encoded."""
    if state.engine is None or state.pipeline is None or not state.ready:
        message = "the server is not ready (loading or shutting down)"
        raise ApiError(503, message, headers=retry_headers(NOT_READY_RETRY_SECONDS), reason="draining")
    with _admission_errors(state):
        state.engine.check_room(incoming=state.routing.in_flight)
        if state.routing.full:
            raise RoutingFull("the routing stage is full")


async def generate(state: ServerState, request: Request, params: GenerationParameters) -> Generation:
    arrival = time.monotonic()
    check_admission(state)
    pipeline, settings = state.pipeline, state.settings
    steps = params.steps or settings.default_steps or pipeline.default_steps
    guidance = pipeline.default_guidance_scale if params.guidance_scale is None else params.guidance_scale
    first_seed = secrets.randbelow(2**31) if params.seed is None else params.seed
    seeds = [first_seed + i for i in range(params.num_images)]

    texts = [params.prompt] if params.negative_prompt is None else [params.prompt, params.negative_prompt]
    with _admission_errors(state):  # admitted above; nothing awaited since, so the place is still there
        routing = state.routing.submit(texts)
    routed = await asyncio.wrap_future(routing)
    encoded, router_seconds = routed.encoded, routed.seconds
    requested = pipeline.choose(routed.ranking, params.budget())
    state.metrics.router.observe(router_seconds)
    negative = encoded.select(1) if params.negative_prompt is not None else None  # row 1 of `encoded`
    job = GenerationJob(prompt=encoded.select(0), seeds=seeds, steps=steps, guidance_scale=guidance, negative=negative)
    request_id = uuid.uuid4().hex
    code, future = _submit(state, request_id, job, requested, routed.ranking)
    score = routed.scores[code]

    result = await _wait(state, request, request_id, code, asyncio.wrap_future(future))
    macs = pipeline.codes[code].macs
    adapter_macs = pipeline.adapter_macs_per_prompt * len(encoded)
    text_encoder_macs = pipeline.text_encoder_macs_per_prompt * len(encoded)
    decoder_macs = pipeline.decoder_macs_per_image * len(seeds)
    total = time.monotonic() - arrival
    state.metrics.end_to_end.labels(code=str(code)).observe(total)
    state.metrics.requests.labels(code=str(code), status="ok").inc()
    report = GenerationReport(
        code=code,
        requested_code=requested,
        degraded=code != requested,
        router_score=score,
        macs_per_call=macs,
        teacher_macs_per_call=pipeline.teacher_macs,
        unet_calls_per_image=result.unet_calls,
        text_adapter_macs=adapter_macs,
        text_encoder_macs=text_encoder_macs,
        decoder_macs=decoder_macs,
        total_macs=macs * result.unet_calls * len(seeds) + adapter_macs + text_encoder_macs + decoder_macs,
        steps=steps,
        guidance_scale=guidance,
        seeds=seeds,
        batch_images=result.batch_images,
        router_seconds=router_seconds,
        encode_seconds=routed.encode_seconds,
        queue_seconds=result.queue_seconds,
        compute_seconds=result.compute_seconds,
        total_seconds=total,
    )
    # PNG encoding is CPU work: off the event loop, so /healthz and new admissions never wait behind it.
    encoded_images = await asyncio.to_thread(lambda: [png_base64(image) for image in result.images])
    return Generation(images=list(zip(encoded_images, seeds, strict=True)), report=report)


def _submit(state: ServerState, request_id: str, job: GenerationJob, code: int, ranking: list[int]):
    """Queue the admitted job for `code`; `(code served, its future)`. Admission held a place for it, so it is
    queued even when its code's queue is past its share; but when the server degrades rather than lengthen a full
    code's queue (`degrade_when_full`), the cheaper codes are tried first in the router's order for the prompt,
    and the first with room serves it."""
    engine, timeout = state.engine, state.settings.request_timeout_s
    with _admission_errors(state, code):
        if state.settings.degrade_when_full and not engine.has_room(code):
            for cheaper in state.pipeline.cheaper(ranking, code):
                if engine.has_room(cheaper):
                    future = engine.submit(request_id, cheaper, job, timeout_s=timeout, admitted=True)
                    state.metrics.degraded.labels(requested_code=str(code), code=str(cheaper)).inc()
                    return cheaper, future
        return code, engine.submit(request_id, code, job, timeout_s=timeout, admitted=True)


@contextmanager
def _admission_errors(state: ServerState, code: int | None = None) -> Iterator[None]:
    """The scheduler's refusals as HTTP errors: full queues are 429 with Retry-After, closed ones 503. A 429 counts
    in `aptp_requests_total` as `rejected`, under `code="none"`: refusals happen at admission, before routing."""
    try:
        yield
    except QueueFull as full:
        state.metrics.requests.labels(code="none" if code is None else str(code), status="rejected").inc()
        raise ApiError(429, f"{full}", headers=retry_headers(full.retry_after_s), reason="queue_full") from None
    except RoutingFull as full:
        state.metrics.requests.labels(code="none", status="rejected").inc()
        raise ApiError(429, f"{full}", headers=retry_headers(MIN_RETRY_SECONDS), reason="routing_full") from None
    except SchedulerClosed:
        headers = retry_headers(NOT_READY_RETRY_SECONDS)
        raise ApiError(503, "the server is shutting down", headers=headers, reason="draining") from None


async def _wait(
    state: ServerState, request: Request, request_id: str, code: int, result: asyncio.Future
) -> GenerationResult:
    """The engine's result; a client that leaves meanwhile has its request dropped."""
    count = state.metrics.requests
    while True:
        done, _ = await asyncio.wait({result}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            break
        if await request.is_disconnected():
            state.engine.abort(request_id)
            count.labels(code=str(code), status="cancelled").inc()
            raise ApiError(CLIENT_CLOSED_REQUEST, "client closed the request")
    try:
        # an engine may learn of a full queue only once the request is sent (Ray Serve): refused as at admission
        with _admission_errors(state, code):
            return result.result()
    except QueueTimeout as e:
        count.labels(code=str(code), status="timeout").inc()
        raise ApiError(504, f"{e} (limit {state.settings.request_timeout_s:g} s)") from None
    except EngineStopped as e:
        count.labels(code=str(code), status="cancelled").inc()
        raise ApiError(503, str(e), reason="draining") from None
    except BatchFailed as e:
        count.labels(code=str(code), status="error").inc()
        raise ApiError(500, str(e)) from None
    except asyncio.CancelledError:
        # The engine cancelled the future: the request was aborted elsewhere.
        count.labels(code=str(code), status="cancelled").inc()
        raise ApiError(CLIENT_CLOSED_REQUEST, "request cancelled") from None
