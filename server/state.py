"""What one running server holds: settings, the loaded pipeline, the engine, metrics, readiness."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from aptp.formats.files import ModelFileError
from aptp.pipeline import RoutedPipeline

from .engine import Engine
from .metrics import ServerMetrics
from .routing import RoutingStage
from .settings import Settings

logger = logging.getLogger("aptp.server")

# (pipeline, settings, metrics) -> an engine: `Engine.from_settings`, or one with its interface.
EngineFactory = Callable[[RoutedPipeline, Settings, ServerMetrics], Engine]


class ServerState:
    """Parameters:
    settings (`Settings`): the operator's settings.
    pipeline (`RoutedPipeline`, *optional*): an already loaded pipeline (tests share one); else `settings.bundle`
        is loaded by `start`.
    engine_factory (`EngineFactory`, *optional*): what runs the admitted requests, built once the pipeline is
        loaded (default: `Engine.from_settings`, every expert in this process; `server.cluster` passes one that
        sends them to Ray Serve expert replicas).
    load_experts (`bool`): load the codes' U-Nets with the bundle (False: encode and route only, for an engine that
        runs them elsewhere).
    """

    def __init__(
        self,
        settings: Settings,
        pipeline: RoutedPipeline | None = None,
        engine_factory: EngineFactory | None = None,
        load_experts: bool = True,
    ):
        self.settings = settings
        self.pipeline = pipeline
        self.engine_factory = engine_factory or Engine.from_settings
        self.load_experts = load_experts
        self.engine: Engine | None = None
        self.routing: RoutingStage | None = None
        self.metrics: ServerMetrics | None = None
        self.warmed_up = False
        self._warming: threading.Thread | None = None
        self._loading: threading.Thread | None = None
        self.load_error: str | None = None
        # Called (from the loading thread) with the error when the bundle cannot be served: the server exits.
        self.on_load_failure: Callable[[str], None] | None = None
        self.started_at = time.time()

    @property
    def loaded(self) -> bool:
        """The bundle is loaded and the engine and routing stage are built (they may still be warming up)."""
        return self.routing is not None

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, worker running, and not draining."""
        engine = self.engine
        return self.warmed_up and engine is not None and engine.running and not engine.draining

    def start(self) -> None:
        """Build the engine and start its worker, then warm every expert up in the background when
        `settings.warmup` (ready once it is done). Without a pipeline given, the bundle is loaded first, in the
        background too: the server listens at once (`/healthz` 200, `/readyz` 503 "loading") and a bundle that
        cannot be served is reported through `on_load_failure`."""
        if self.settings.threads is not None:
            torch.set_num_threads(self.settings.threads)
        if self.pipeline is None:
            self._loading = threading.Thread(target=self._load_then_start, name="aptp-load", daemon=True)
            self._loading.start()
        else:
            self._start_engine()

    def _load_then_start(self) -> None:
        settings, began = self.settings, time.monotonic()
        try:
            pipeline = settings.load_pipeline(load_experts=self.load_experts)
        except Exception as error:  # noqa: BLE001 - whatever stops the bundle from loading is reported, then exit
            message = str(error) if isinstance(error, ModelFileError) else f"{type(error).__name__}: {error}"
            logger.error("cannot serve %s: %s", settings.bundle, message)
            self.load_error = message
            if self.on_load_failure is not None:
                self.on_load_failure(message)
            return
        logger.info(
            "loaded %s %s: %d code(s) in %.1f s",
            pipeline.source,
            settings.bundle,
            pipeline.num_codes,
            time.monotonic() - began,
        )
        self.pipeline = pipeline
        self._start_engine()

    def _start_engine(self) -> None:
        settings = self.settings
        self.metrics = ServerMetrics([code.macs for code in self.pipeline.codes])
        self.engine = self.engine_factory(self.pipeline, settings, self.metrics)
        self.engine.start()
        self.routing = RoutingStage(
            self.pipeline,
            settings.max_routing_queue,
            settings.max_routing_batch,
            niceness=settings.routing_niceness,
            threads=settings.routing_threads,
        )
        if settings.warmup:  # in the background: the server listens (503 on /readyz) while the experts warm up
            self._warming = threading.Thread(target=self._warm_up, name="aptp-warm-up", daemon=True)
            self._warming.start()
        else:
            self._mark_ready()

    def _warm_up(self) -> None:
        began = time.monotonic()
        try:
            self.engine.warm_up()
            self.routing.warm_up()
        except Exception:  # noqa: BLE001 - an expert that cannot run must not be reported ready
            logger.exception("warm-up failed: the server stays not ready")
            return
        logger.info(
            "warmed up %d expert(s) and the router in %.1f s", self.pipeline.num_codes, time.monotonic() - began
        )
        self._mark_ready()

    def _mark_ready(self) -> None:
        self.warmed_up = True
        self.metrics.ready.set(1)

    def begin_drain(self) -> None:
        """Stop admission and report not-ready; queued work keeps running."""
        if self.engine is not None:
            self.engine.begin_drain()
        if self.metrics is not None:
            self.metrics.ready.set(0)

    def stop(self, drain_timeout: float) -> None:
        if self._loading is not None:
            self._loading.join()
        if self._warming is not None:
            self._warming.join()
        self.begin_drain()
        if self.engine is not None:
            drained = self.engine.shutdown(drain_timeout)
            if not drained:
                logger.warning("stopped before all queued work finished (drain timeout %.0f s)", drain_timeout)
        if self.routing is not None:
            self.routing.stop()
