"""Liveness, readiness and metrics: open to anyone, API keys or not (probes and scrapers carry no keys)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from ...metrics import CONTENT_TYPE, LOADING_METRICS
from ..deps import State

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    """The process answers HTTP (it may still be loading)."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness", responses={503: {"description": "Loading or draining"}})
async def readyz(state: State) -> Response:
    """200 once the bundle is loaded and warmed up and the engine runs; 503 while loading, when the bundle could not
    be loaded (`failed`, with the error; the server then exits), and while draining on shutdown."""
    engine = state.engine
    if state.ready:
        return JSONResponse({"status": "ready", "codes": state.pipeline.num_codes})
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": state.load_error}, status_code=503)
    status = "draining" if engine is not None and engine.draining else "loading"
    return JSONResponse({"status": status}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: State) -> Response:
    if state.metrics is None:  # still loading the bundle: not ready, and nothing else to report yet
        return Response(LOADING_METRICS, media_type=CONTENT_TYPE)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
