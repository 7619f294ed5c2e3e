"""`POST /v1/images/generations` in the OpenAI images API shape, so existing OpenAI clients work unchanged."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ...schemas import OPENAI_QUALITY, OpenAIImage, OpenAIImageRequest, OpenAIImageResponse
from ..contract import OPENAI_ERRORS
from ..deps import Authorized, State, require_loaded
from ..errors import invalid
from ..generation import GenerationParameters, check_limits, generate

router = APIRouter(tags=["openai"], dependencies=[Authorized])


@router.post(
    "/v1/images/generations",
    response_model=OpenAIImageResponse,
    summary="OpenAI-compatible generation",
    responses=OPENAI_ERRORS,
)
async def images_generations(body: OpenAIImageRequest, request: Request, state: State) -> OpenAIImageResponse:
    """`prompt`, `n`, `size` (the model's own only) and `response_format` `b64_json`; extras `seed`, `steps`,
    `guidance_scale`, `negative_prompt` are accepted and echoed. The full report is under `aptp`."""
    require_loaded(state)
    resolution = state.pipeline.resolution
    size = f"{resolution}x{resolution}"
    if body.size is not None and body.size != size:
        raise invalid("size", f"this model makes {size} images only (got {body.size!r})")
    params = GenerationParameters(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        num_images=body.n,
        steps=body.steps,
        guidance_scale=body.guidance_scale,
        seed=body.seed,
        max_macs_ratio=body.max_macs_ratio,
        quality=OPENAI_QUALITY[body.quality] if body.quality is not None else None,
    )
    check_limits(state, params, images_field="n")
    result = await generate(state, request, params)
    report = result.report
    return OpenAIImageResponse(
        created=int(time.time()),
        data=[OpenAIImage(b64_json=png, seed=seed) for png, seed in result.images],
        seed=report.seeds[0],
        steps=report.steps,
        guidance_scale=report.guidance_scale,
        negative_prompt=body.negative_prompt,
        size=size,
        aptp=report,
    )
