"""The FastAPI app factory and `aptp serve` (uvicorn with a draining shutdown).

uvicorn --factory server.app:create_app      # settings from APTP_* environment variables
aptp serve                                   # the same, plus drain-on-SIGTERM
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from aptp.pipeline import RoutedPipeline

from .api.contract import install_contract
from .api.docs import install_docs
from .api.errors import install_error_handlers
from .api.limits import AdmissionDoor, BodySizeLimit
from .api.routes import codes, generate, health, openai, route
from .settings import Settings
from .state import EngineFactory, ServerState

logger = logging.getLogger("aptp.server")


def create_app(
    settings: Settings | None = None,
    pipeline: RoutedPipeline | None = None,
    engine_factory: EngineFactory | None = None,
    load_experts: bool = True,
) -> FastAPI:
    """An app serving `settings.bundle` (or an already loaded `pipeline`). Loading, warm-up and the engine worker
    start with the app's lifespan; shutdown drains queued work for up to `settings.drain_timeout_s`.
    `engine_factory` replaces the in-process engine, and `load_experts=False` loads the bundle to encode and route
    only (see `ServerState`)."""
    settings = settings or Settings()
    state = ServerState(settings, pipeline, engine_factory, load_experts)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(state.start)
        try:
            yield
        finally:
            await run_in_threadpool(state.stop, settings.drain_timeout_s)

    app = FastAPI(
        title="aptp-serve",
        summary="Prompt-routed, dynamic-capacity text-to-image inference (APTP).",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served offline by install_docs
        redoc_url=None,
    )
    app.state.aptp = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AdmissionDoor)  # outermost: a full server refuses before even the body limit reads
    install_contract(app, settings)
    install_docs(app)
    for module in (generate, openai, route, codes, health):
        app.include_router(module.router)
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains before exiting: admission stops (503), `/readyz` turns 503 so
    load balancers stop sending traffic, queued and running requests finish and are answered, then uvicorn shuts
    down. A second signal exits at once (queued requests are answered 503)."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._draining = False
        self._drained = False

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn re-raises the signal it shut down on, so the process dies of it; after a clean drain the
        signal has been handled in full, and the process exits 0 instead."""
        with super().capture_signals():
            yield
            if self._drained:
                self._captured_signals.clear()

    def handle_exit(self, sig, frame) -> None:
        if self._draining or self.state.engine is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        logger.info("draining: admission stopped; finishing queued work (signal again to exit now)")
        self.state.begin_drain()

        def exit_when_drained() -> None:
            drained = self.state.engine.wait_drained(self.state.settings.drain_timeout_s)
            logger.info("drained" if drained else "drain timeout: exiting with work left")
            self._drained = drained
            super(DrainingServer, self).handle_exit(sig, frame)

        threading.Thread(target=exit_when_drained, name="aptp-drain", daemon=True).start()


def _log_like_uvicorn() -> None:
    """Show the server's own INFO messages (loading, warm-up, draining) next to uvicorn's."""
    aptp = logging.getLogger("aptp")
    if not aptp.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        aptp.addHandler(handler)
        aptp.setLevel(logging.INFO)
        aptp.propagate = False


def serve(settings: Settings | None = None, pipeline: RoutedPipeline | None = None) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT (drains first). Without `pipeline`, it listens at once
    and loads `settings.bundle` meanwhile. Returns the exit status: 0, or 2 when the bundle could not be loaded."""
    settings = settings or Settings()
    _log_like_uvicorn()
    app = create_app(settings, pipeline)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=False)
    state = app.state.aptp
    server = DrainingServer(config, state)
    state.on_load_failure = lambda _: setattr(server, "should_exit", True)
    print(f"aptp-serve: serving {settings.bundle} on http://{settings.host}:{settings.port}", flush=True)
    print(
        f"  curl -s http://{settings.host}:{settings.port}/generate -H 'Content-Type: application/json' "
        '-d \'{"prompt": "a red circle", "seed": 0}\'',
        flush=True,
    )
    server.run()
    if state.load_error is not None:
        print(f"aptp serve: error: {state.load_error}", file=sys.stderr, flush=True)
        return 2
    return 0
