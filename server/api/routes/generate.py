"""`POST /generate`: the native endpoint, with the full per-request report."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...schemas import GeneratedImage, GenerateRequest, GenerateResponse
from ..contract import GENERATION_ERRORS
from ..deps import Authorized, State
from ..generation import GenerationParameters, check_limits, generate

router = APIRouter(tags=["generation"], dependencies=[Authorized])


@router.post(
    "/generate", response_model=GenerateResponse, summary="Generate images for a prompt", responses=GENERATION_ERRORS
)
async def generate_images(body: GenerateRequest, request: Request, state: State) -> GenerateResponse:
    """Route the prompt to a code, queue it with other requests of that code, and return base64 PNGs with a report
    of the code, its MACs and the time spent queued and computing."""
    params = GenerationParameters(**body.model_dump())  # the native request has exactly these fields
    check_limits(state, params)
    result = await generate(state, request, params)
    images = [GeneratedImage(b64_png=png, seed=seed) for png, seed in result.images]
    return GenerateResponse(images=images, report=result.report)
