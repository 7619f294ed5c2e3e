"""`GET /v1/codes`: every code with its cost, training share and observed batch latency."""

from __future__ import annotations

from fastapi import APIRouter

from ...schemas import CodeDescription, CodesResponse
from ..contract import error_responses
from ..deps import Authorized, State, require_loaded

router = APIRouter(tags=["routing"], dependencies=[Authorized])


@router.get(
    "/v1/codes", response_model=CodesResponse, summary="List architecture codes", responses=error_responses(401, 503)
)
async def list_codes(state: State) -> CodesResponse:
    require_loaded(state)
    pipeline = state.pipeline
    stats = state.engine.stats()
    teacher = pipeline.teacher_macs
    codes = [
        CodeDescription(
            code=info.code,
            macs_per_call=info.macs,
            macs_ratio=info.macs / teacher,
            params=info.params,
            training_share=info.training_share,
            completed_batches_avg_seconds=stats.avg_batch_seconds[info.code],
            queued_requests=stats.queued_requests[info.code],
        )
        for info in pipeline.codes
    ]
    return CodesResponse(
        source=pipeline.source,
        resolution=pipeline.resolution,
        latent_size=pipeline.latent_size,
        teacher_macs_per_call=teacher,
        text_adapter_macs_per_prompt=pipeline.adapter_macs_per_prompt,
        text_encoder_macs_per_prompt=pipeline.text_encoder_macs_per_prompt,
        decoder_macs_per_image=pipeline.decoder_macs_per_image,
        default_steps=state.settings.default_steps or pipeline.default_steps,
        default_guidance_scale=pipeline.default_guidance_scale,
        codes=codes,
    )
