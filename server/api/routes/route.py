"""`POST /route`: which code each prompt would get, and at what cost, without generating."""

from __future__ import annotations

import time

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ...schemas import RouteDecision, RouteRequest, RouteResponse
from ..contract import error_responses
from ..deps import Authorized, State, require_loaded
from ..errors import invalid

router = APIRouter(tags=["routing"], dependencies=[Authorized])


@router.post(
    "/route",
    response_model=RouteResponse,
    summary="Explain routing",
    responses=error_responses(400, 401, 413, 422, 503),
)
async def route_prompts(body: RouteRequest, state: State) -> RouteResponse:
    """Codes, similarity scores and MACs per U-Net call for each prompt (a prompt's code does not depend on the
    other prompts in the request)."""
    require_loaded(state)
    pipeline = state.pipeline
    for index, prompt in enumerate(body.prompts):
        if len(prompt) > state.settings.max_prompt_chars:
            raise invalid(f"prompts.{index}", f"at most {state.settings.max_prompt_chars} characters")

    def route():
        began = time.monotonic()
        routed = pipeline.route(pipeline.encode(body.prompts))
        return routed, time.monotonic() - began

    routed, seconds = await run_in_threadpool(route)
    teacher = pipeline.teacher_macs
    decisions = [
        RouteDecision(
            prompt_index=i,
            code=code,
            score=score,
            macs_per_call=pipeline.codes[code].macs,
            macs_ratio=pipeline.codes[code].macs / teacher,
        )
        for i, (code, score) in enumerate(zip(routed.codes, routed.scores, strict=True))
    ]
    return RouteResponse(routes=decisions, teacher_macs_per_call=teacher, router_seconds=seconds)
