"""The server as a Ray Serve application, for more than one device or machine (`pip install .[ray]`).

Two deployments:
- **the ingress**: the same FastAPI app as the single-process server (`server.app.create_app`): validation,
  admission, prompt encoding and routing (the routing stage batches concurrent prompts), metrics. Only its engine
  differs: a `ClusterEngine` sends each admitted request to the expert replicas instead of a local worker.
- **the experts** (`ExpertReplica`): each replica holds every code of the bundle resident on its device and runs
  the single-process `Engine`, so a batch is what it is in one process: one code's requests, batched by the same
  scheduler. A request travels with its code as Ray Serve's multiplexed model id, so Serve routes it to a replica
  that already serves that code.

What a 429 means is the single process's: every queue place is held. The cluster has `max_queue_size` places per
code per expert replica, plus the images one batch per replica computes; the ingress counts the requests it has
sent and not had answered, and refuses (before encoding) when they hold every place.

Each expert replica serves its own `aptp_` metrics (batch sizes, compute and queue seconds, images, MACs per code)
on a port of its own; the ingress lists them at `/metrics/targets` in Prometheus's HTTP service-discovery format,
so Prometheus scrapes every replica and the dashboard's `sum by (code)` adds them up.

    aptp serve --ray                                   # a local Ray cluster (or APTP_RAY_ADDRESS)
    serve run server.cluster:build_app                 # the same application, started by Ray's own CLI
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from functools import partial
from typing import Any

import ray
import torch
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from aptp.pipeline import RoutedPipeline

from .app import create_app
from .engine import BatchFailed, Engine, EngineStopped, GenerationJob, GenerationResult, QueueTimeout
from .metrics import ServerMetrics
from .scheduler import MIN_RETRY_SECONDS, QueueFull, SchedulerClosed, SchedulerStats
from .settings import ClusterSettings, Settings

logger = logging.getLogger("aptp.cluster")

EXPERTS = "aptp-experts"
INGRESS = "aptp-ingress"
TARGETS_ACTOR = "aptp-metrics-targets"
NAMESPACE = "aptp"
# A replica that died mid-request: the request is sent once more (to a live replica) before it fails with 503.
ATTEMPTS = 2


def expert_options(cluster: ClusterSettings, settings: Settings, num_codes: int) -> dict[str, Any]:
    """`serve.deployment` options of the expert replicas."""
    options: dict[str, Any] = {
        "name": EXPERTS,
        "ray_actor_options": {"num_cpus": cluster.cpus_per_replica, "num_gpus": cluster.gpus_per_replica},
        # a replica takes every request it is sent into its engine's queues: admission bounds them at the ingress
        "max_ongoing_requests": places_per_replica(settings, num_codes),
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
    }
    if cluster.max_expert_replicas is not None and cluster.max_expert_replicas > cluster.expert_replicas:
        options["autoscaling_config"] = {
            "min_replicas": cluster.expert_replicas,
            "max_replicas": cluster.max_expert_replicas,
            "target_ongoing_requests": cluster.target_requests_per_replica,
        }
    else:
        options["num_replicas"] = cluster.expert_replicas
    return options


def largest_batch(settings: Settings, num_codes: int) -> int:
    """The most images one batch of an expert replica holds (with per-code batch sizes, the largest)."""
    config = settings.scheduler_config(num_codes)
    return max(config.batch_size(code) for code in range(num_codes))


def places_per_replica(settings: Settings, num_codes: int) -> int:
    """Requests one expert replica holds: `max_queue_size` queued per code, and one batch computing."""
    return settings.max_queue_size * num_codes + largest_batch(settings, num_codes)


# -------------------------------------------------------------------------------------------------- the experts
@ray.remote(num_cpus=0)
class MetricsTargets:
    """Where each live expert replica serves its metrics (`host:port`), for Prometheus's service discovery."""

    def __init__(self):
        self._targets: dict[str, str] = {}

    def add(self, replica: str, target: str) -> None:
        self._targets[replica] = target

    def remove(self, replica: str) -> None:
        self._targets.pop(replica, None)

    def targets(self) -> list[str]:
        return sorted(self._targets.values())

    def by_replica(self) -> dict[str, str]:
        return dict(self._targets)


def metrics_targets() -> ray.actor.ActorHandle:
    """The directory of replicas' metrics endpoints. Detached: an actor owned by the replica that first asked for
    it would die with that replica, and take every other replica's entry with it."""
    options = {"name": TARGETS_ACTOR, "namespace": NAMESPACE, "get_if_exists": True, "lifetime": "detached"}
    return MetricsTargets.options(**options).remote()


class ExpertReplica:
    """One expert replica: the bundle loaded, every code resident and warmed up, and the single-process `Engine`
    batching per code (its scheduler: per-code queues, batch sizes, `max_wait_ms`, step-level batching when set).
    The multiplexed model id (the code) only steers Serve's routing, so a code's requests gather on the replicas
    already serving it: Serve's own `@serve.batch` forms a batch first and splits it by model id after, so mixed
    traffic left it with batches of 1.7 images where this engine filled 7.2 of 8 (benchmarks/cluster.py)."""

    def __init__(self, settings: Settings, cluster: ClusterSettings):
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        self.pipeline = settings.load_pipeline()
        self.metrics = ServerMetrics([code.macs for code in self.pipeline.codes])
        self.engine = Engine.from_settings(self.pipeline, settings, self.metrics)
        self.engine.start()
        self.engine.warm_up()  # before Serve counts the replica as running
        self.metrics.ready.set(1)
        self._replica = serve.get_replica_context().replica_id.unique_id
        self._metrics_server, _ = _serve_metrics(self.metrics, cluster.metrics_host)
        host, port = self._metrics_server.server_address[:2]
        if host in ("0.0.0.0", "::"):  # listening on every interface: advertise the node's own address
            host = ray.util.get_node_ip_address()
        self._targets = metrics_targets()
        ray.get(self._targets.add.remote(self._replica, f"{host}:{port}"))

    @serve.multiplexed(max_num_models_per_replica=256)
    async def serving_code(self, model_id: str) -> int:
        """The code a multiplexed model id names (every code is resident: nothing to load)."""
        code = int(model_id)
        if not 0 <= code < self.pipeline.num_codes:
            raise ValueError(f"no code {code} in this bundle ({self.pipeline.num_codes} codes)")
        return code

    async def generate(self, job: GenerationJob) -> GenerationResult:
        code = await self.serving_code(serve.get_multiplexed_model_id())
        request_id = uuid.uuid4().hex
        # admitted: the ingress counted the cluster's places already, so the replica queues what it is sent
        future = self.engine.submit(request_id, code, job, admitted=True)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the ingress gave up on it (its client left): drop the work
            self.engine.abort(request_id)
            raise

    def __del__(self):
        targets, replica = getattr(self, "_targets", None), getattr(self, "_replica", None)
        if targets is not None:
            targets.remove.remote(replica)
        if getattr(self, "_metrics_server", None) is not None:
            self._metrics_server.shutdown()
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown(drain_timeout=0)


async def _listening(target: str, timeout_s: float = 0.5) -> bool:
    """Whether something accepts connections at `host:port`."""
    host, _, port = target.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _serve_metrics(metrics: ServerMetrics, host: str):
    from prometheus_client import start_http_server

    with socket.socket() as probe:  # a free port on `host`
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    return start_http_server(port, addr=host, registry=metrics.registry)


# ----------------------------------------------------------------------------------------------------- the ingress
class ClusterEngine:
    """The engine interface of `server.engine.Engine`, over the expert replicas: admission counts the requests sent
    and not answered against the cluster's places; `submit` sends a request with its code as multiplexed model id.

    Parameters:
        experts (`DeploymentHandle`): the expert deployment.
        cluster (`ClusterSettings`): replicas (the places scale with the most there may be).
        pipeline (`RoutedPipeline`), settings (`Settings`), metrics (`ServerMetrics`): as `Engine.from_settings`
            takes them (the ingress's pipeline encodes and routes; the replicas batch).
    """

    def __init__(
        self,
        experts: DeploymentHandle,
        cluster: ClusterSettings,
        pipeline: RoutedPipeline,
        settings: Settings,
        metrics: ServerMetrics | None = None,
    ):
        self.experts = experts
        self.pipeline = pipeline
        self.num_codes = pipeline.num_codes
        replicas = cluster.most_expert_replicas
        self.places = replicas * places_per_replica(settings, self.num_codes)
        self.code_places = replicas * settings.max_queue_size
        self.metrics = metrics
        self._in_flight = [0] * self.num_codes
        self._tasks: dict[str, asyncio.Task] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._started = False
        self._completed = 0
        if metrics is not None:
            metrics.watch_scheduler(self.stats)

    # lifecycle, as `Engine`'s
    def start(self) -> None:
        self._started = True

    @property
    def running(self) -> bool:
        return self._started

    @property
    def draining(self) -> bool:
        return self._closed

    def warm_up(self, steps: int = 2) -> None:
        """One image of every code through the replicas, so the first requests find them answering."""
        for code in range(self.num_codes):
            job = GenerationJob(prompt=self.pipeline.empty_prompt, seeds=[0], steps=steps, guidance_scale=2.0)
            self.experts.options(multiplexed_model_id=str(code)).generate.remote(job).result()

    def begin_drain(self) -> None:
        self._closed = True

    def wait_drained(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while sum(self._in_flight) > 0:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def shutdown(self, drain_timeout: float | None = 0.0) -> bool:
        self.begin_drain()
        return self.wait_drained(drain_timeout)

    def stats(self) -> SchedulerStats:
        with self._lock:
            in_flight = list(self._in_flight)
        return SchedulerStats(
            queued_requests=dict(enumerate(in_flight)),  # sent and not answered: waiting or computing
            queued_images={code: 0 for code in range(self.num_codes)},
            running_batches=0,
            running_requests=0,
            admitted=0,
            rejected={},
            expired=0,
            aborted=0,
            completed=self._completed,
            failed=0,
            completed_batches=0,
            avg_batch_seconds={code: None for code in range(self.num_codes)},
            closed=self._closed,
        )

    # requests
    def check_room(self, incoming: int = 0) -> None:
        if self._closed:
            raise SchedulerClosed()
        with self._lock:
            if sum(self._in_flight) + incoming >= self.places:
                raise QueueFull(None, MIN_RETRY_SECONDS)

    def has_room(self, code: int) -> bool:
        with self._lock:
            return self._in_flight[code] < self.code_places

    def submit(
        self,
        request_id: str,
        code: int,
        job: GenerationJob,
        timeout_s: float | None = None,
        admitted: bool = False,
    ) -> Future:
        """Send the request to the replicas (call on the ingress's event loop); its future is the answer."""
        if self._closed:
            raise SchedulerClosed()
        with self._lock:
            if not admitted and sum(self._in_flight) >= self.places:
                raise QueueFull(code, MIN_RETRY_SECONDS)
            self._in_flight[code] += 1
        task = asyncio.get_running_loop().create_task(self._send(request_id, code, job, timeout_s))
        self._tasks[request_id] = task
        return task

    def abort(self, request_id: str) -> None:
        task = self._tasks.pop(request_id, None)
        if task is not None:
            task.cancel()

    async def _send(self, request_id: str, code: int, job: GenerationJob, timeout_s: float | None):
        experts = self.experts.options(multiplexed_model_id=str(code))
        try:
            for attempt in range(1, ATTEMPTS + 1):
                response = experts.generate.remote(job)
                try:
                    result = await asyncio.wait_for(response, timeout_s)
                except (ActorDiedError, ActorUnavailableError, RayActorError) as error:
                    if attempt == ATTEMPTS:
                        message = f"the expert replicas serving code {code} failed {ATTEMPTS} times ({error})"
                        raise EngineStopped(message) from None
                    logger.warning("request %s: its expert replica failed (%s); sending it again", request_id, error)
                    continue
                except BackPressureError:
                    raise QueueFull(code, MIN_RETRY_SECONDS) from None
                except TimeoutError:
                    response.cancel()
                    raise QueueTimeout("the request was not answered in time") from None
                except asyncio.CancelledError:
                    response.cancel()
                    raise
                except RayTaskError as error:
                    cause = error.cause if error.cause is not None else error
                    raise BatchFailed(f"generation failed: {type(cause).__name__}: {cause}") from None
                self._completed += 1
                return result
        finally:
            with self._lock:
                self._in_flight[code] -= 1
            self._tasks.pop(request_id, None)


@serve.ingress()
class Ingress:
    """The FastAPI app of `server.app.create_app`, with its engine sending work to the expert deployment."""

    def __init__(self, experts: DeploymentHandle, settings: Settings, cluster: ClusterSettings):
        self._experts, self._settings, self._cluster = experts, settings, cluster

    def __serve_build_asgi_app__(self):
        engine = partial(ClusterEngine, self._experts, self._cluster)
        # the ingress encodes and routes; the codes' U-Nets live on the expert replicas only
        app = self._app = create_app(self._settings, engine_factory=engine, load_experts=False)

        @app.get("/metrics/targets", include_in_schema=False)
        async def metrics_targets_sd() -> list[dict[str, Any]]:
            """The live expert replicas' metrics endpoints, as Prometheus's `http_sd_configs` reads them."""
            directory = metrics_targets()
            registered = await directory.by_replica.remote()
            live = await asyncio.gather(*(_listening(target) for target in registered.values()))
            for (replica, _), alive in zip(registered.items(), live, strict=True):
                if not alive:  # a replica that died without saying so (killed, its node lost)
                    directory.remove.remote(replica)
            targets = sorted(target for target, alive in zip(registered.values(), live, strict=True) if alive)
            return [{"targets": targets, "labels": {"role": "expert"}}]

        return app

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting (503, `/readyz` 503) and wait until every request sent to the experts is answered; False
        when `timeout_s` passed first. Called before Serve shuts down, which would drop open HTTP requests."""
        state = self._app.state.aptp
        state.begin_drain()
        if state.engine is None:
            return True
        return await asyncio.to_thread(state.engine.wait_drained, timeout_s)


def application(settings: Settings | None = None, cluster: ClusterSettings | None = None) -> serve.Application:
    """The Ray Serve application: the ingress bound to the expert deployment."""
    from aptp.formats.bundle import read_manifest
    from aptp.formats.kinds import folder_kind

    settings = settings or Settings()
    cluster = cluster or ClusterSettings()
    num_codes = read_manifest(settings.bundle).num_codes if folder_kind(settings.bundle) == "bundle" else 1
    experts = serve.deployment(ExpertReplica).options(**expert_options(cluster, settings, num_codes))
    ingress = serve.deployment(Ingress).options(
        name=INGRESS,
        num_replicas=cluster.ingress_replicas,
        # the ingress answers 429 itself: Serve must hand it every request (and health checks) at once
        max_ongoing_requests=10_000,
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
    )
    return ingress.bind(experts.bind(settings, cluster), settings, cluster)


def build_app(args: dict[str, str] | None = None) -> serve.Application:
    """`serve run server.cluster:build_app [key=value ...]`: `Settings` fields as arguments (else `APTP_*`)."""
    return application(Settings(**(args or {})))


def serve_cluster(settings: Settings | None = None, cluster: ClusterSettings | None = None) -> int:
    """`aptp serve --ray`: deploy the application on the Ray cluster at `cluster.address` (or a local one), serve
    HTTP on `settings.host:port` until SIGTERM/SIGINT, then shut Serve down, which drains every replica first.
    Returns the exit status: 0, or 2 when the application could not be deployed."""
    import signal

    from ray.serve.config import HTTPOptions

    settings = settings or Settings()
    cluster = cluster or ClusterSettings()
    stop = threading.Event()
    ray.init(address=cluster.address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options=HTTPOptions(host=settings.host, port=settings.port))
        try:
            serve.run(application(settings, cluster), name="aptp", route_prefix="/", blocking=False)
        except Exception as error:  # noqa: BLE001 - a deployment that cannot start is reported, then exit
            print(f"aptp serve: error: the Ray Serve application did not start: {error}", flush=True)
            return 2
        for sig in (signal.SIGTERM, signal.SIGINT):  # after Ray's start-up, which sets handlers of its own
            signal.signal(sig, lambda *_: stop.set())
        url = f"http://{settings.host}:{settings.port}"
        replicas = cluster.expert_replicas
        print(f"aptp-serve (Ray Serve): serving {settings.bundle} on {url}, {replicas} expert replica(s)", flush=True)
        stop.wait()
        print("aptp-serve: draining: admission stopped, answering the requests held", flush=True)
        ingress = serve.get_app_handle("aptp")
        drained = all(ingress.drain.remote(settings.drain_timeout_s).result() for _ in range(cluster.ingress_replicas))
        print("aptp-serve: drained" if drained else "aptp-serve: drain timeout: stopping with work left", flush=True)
        serve.shutdown()
        ray.kill(metrics_targets())  # detached: it would outlive the application
        return 0
    finally:
        ray.shutdown()
