"""The server's settings: one object, read from `APTP_*` environment variables (and an optional `.env` file).

Examples:
    APTP_BUNDLE=bundles/shapes/teacher APTP_PORT=8080 aptp serve
    APTP_MAX_BATCH_SIZE='{"0": 8, "1": 4}'    # per code; a plain number applies to every code
    APTP_API_KEYS=key-one,key-two              # generation endpoints then need `Authorization: Bearer <key>`
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import torch
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from aptp.formats.kinds import DEFAULT_BUNDLE

from .priority import available_cpus, on_passing_thread
from .scheduler import SchedulerConfig

if TYPE_CHECKING:
    from aptp.pipeline import RoutedPipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# "off", or a `torch.compile` mode (`Settings.compile_mode`).
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]


class Settings(BaseSettings):
    """Parameters:
    bundle (`Path`): a bundle folder (manifest.json), a teacher folder (teacher.json) or a diffusers Stable Diffusion
        folder (model_index.json); the last two are served as one code.
    device (`str`): torch device of every component ("cpu", "cuda", "cuda:1", ...).
    dtype (`str`): float32, float16 or bfloat16 for the experts (and a pipeline's VAE and text encoder).
    threads (`int`, *optional*): torch intra-op threads of each engine worker (default: with one worker, torch's
        choice; with more, the CPUs this process may use shared out between them: `worker_threads`).
    engine_workers (`int`, *optional*): engine threads side by side, each running one whole batch at a time or,
        with step-level batching, one denoising step of one code (`server.engine`). Default (`workers`): 2 on a CPU
        device with at least 2 CPUs, else 1. On 2 CPUs two workers of one thread each served 1.08-1.33x the images
        of one worker on both (README, serving).
    channels_last (`bool`): keep the experts' convolution weights channels-last (NHWC), the layout oneDNN and
        cuDNN run convolutions in (`RoutedPipeline.to_memory_format`).
    compile_mode (`str`): `"off"`, or the `torch.compile` mode every expert is compiled in (`"default"`,
        `"reduce-overhead"`: CUDA graphs on CUDA, `"max-autotune"`; `RoutedPipeline.compile_experts`). Off by default:
        compiling takes minutes per expert on a CPU, paid during warm-up (or by the first requests without it).
    host, port: where uvicorn listens.
    max_batch_size (`int` or `dict[int, int]`): images per batch, for every code or per code.
    max_wait_ms (`float`): with `batching="request"`, how long a code's oldest request waits for its batch to fill.
    max_queue_size (`int`): queued requests per code: the server admits while all queues together hold fewer than
        this times the codes (counting requests being routed); a request let in is queued even past its code's
        share, never refused after routing.
    max_routing_queue (`int`): requests waiting to be encoded and routed before 429.
    max_routing_batch (`int`): requests encoded and routed together at most.
    request_timeout_s (`float`): a request still queued after this long is answered 504 and dropped.
    default_steps (`int`, *optional*): sampling steps when a request names none (default: the bundle's).
    max_steps (`int`): the most steps a request may ask for.
    max_images_per_request (`int`): `num_images` / `n` limit.
    max_prompt_chars (`int`): longest accepted prompt.
    max_body_bytes (`int`): largest accepted request body (413 beyond, before it is parsed).
    api_keys (`list[str]`): when non-empty, generation and routing need `Authorization: Bearer <key>`.
    drain_timeout_s (`float`): on SIGTERM, how long to wait for queued and running work before exiting anyway.
    warmup (`bool`): run every expert once before reporting ready.
    batching (`str`): `"step"` (default): requests join and leave a code's running batch between denoising steps
        (iteration-level scheduling; `max_wait_ms` is not used: nothing waits for a batch to fill); `"request"`: a
        batch runs from its first step to its last, and requests that arrive meanwhile wait for the next one. In
        the serving benchmark's alternating rounds `step` served 0.92-1.03x the images of `request` at saturation
        (median 0.99x over twelve rounds) and answered sooner at light load (p50 0.41-0.44 s against 0.46-0.48 s in
        every round; README, serving).
    compute_niceness (`int`): how much lower the CPU priority (nice value) of the engine's thread is than the event
        loop's, so refusals and health checks are answered at once however busy the CPU (0: same).
    routing_niceness (`int`): the same for the routing thread. Between the two by default: routing a burst is
        short and every request waits for it, so it runs before denoising rather than beside it.
    routing_threads (`int`): torch intra-op threads of the routing thread. One by default: with more OpenMP
        threads in the process than CPUs, libgomp lets every waiting worker spin only briefly before it sleeps, and
        the engine then paid a wake-up per operation (`server.openmp`); with a second routing thread the server
        served about a sixth fewer images at saturation.
    degrade_when_full (`bool`): when a request's code's queue is past its share, serve it with a cheaper code below
        its share (reported as `degraded`) instead of lengthening that queue.
    """

    model_config = SettingsConfigDict(env_prefix="APTP_", env_file=".env", extra="ignore")

    bundle: Path = DEFAULT_BUNDLE
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    threads: int | None = Field(None, ge=1)
    engine_workers: int | None = Field(None, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_batch_size: int | dict[int, int] = 8
    max_wait_ms: float = Field(50.0, ge=0)
    max_queue_size: int = Field(16, ge=1)
    max_routing_queue: int = Field(64, ge=1)
    max_routing_batch: int = Field(32, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)
    default_steps: int | None = Field(None, ge=1)
    max_steps: int = Field(100, ge=1)
    max_images_per_request: int = Field(4, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(65_536, ge=1024)
    api_keys: Annotated[list[str], NoDecode] = []
    drain_timeout_s: float = Field(300.0, ge=0)
    warmup: bool = True
    degrade_when_full: bool = False
    compute_niceness: int = Field(10, ge=0, le=19)
    routing_niceness: int = Field(5, ge=0, le=19)
    routing_threads: int = Field(1, ge=1)
    channels_last: bool = True
    compile_mode: CompileMode = "off"
    batching: Literal["request", "step"] = "step"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        try:
            torch.device(value)
        except RuntimeError as e:
            raise ValueError(f"not a torch device ({e})") from None
        return value

    @model_validator(mode="after")
    def _steps_within_limit(self) -> Settings:
        if self.default_steps is not None and self.default_steps > self.max_steps:
            raise ValueError(f"default_steps ({self.default_steps}) exceeds max_steps ({self.max_steps})")
        return self

    @property
    def workers(self) -> int:
        """Engine workers: `engine_workers`, or the default it describes."""
        if self.engine_workers is not None:
            return self.engine_workers
        on_cpu = torch.device(self.device).type == "cpu"
        return 2 if on_cpu and available_cpus() >= 2 else 1

    @property
    def worker_threads(self) -> int | None:
        """Intra-op threads of each engine worker: `threads`, or the CPUs shared out between several workers (None:
        torch's choice, for one)."""
        if self.threads is not None or self.workers == 1:
            return self.threads
        return max(1, available_cpus() // self.workers)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def load_pipeline(self, load_experts: bool = True) -> RoutedPipeline:
        """The bundle as these settings serve it: on their device, in their dtype and memory layout, compiled when
        `compile_mode` says so. Loaded on a thread that ends with it, so the caller's thread (a Ray replica's
        long-lived actor thread, say) keeps no OpenMP workers from it (`server.priority.on_passing_thread`)."""
        from aptp.pipeline import RoutedPipeline

        def load() -> RoutedPipeline:
            pipeline = RoutedPipeline.load(
                self.bundle, device=self.device, dtype=self.torch_dtype, load_experts=load_experts
            )
            if self.channels_last:
                pipeline.to_memory_format(torch.channels_last)
            if self.compile_mode != "off" and load_experts:
                pipeline.compile_experts(self.compile_mode)
            return pipeline

        return on_passing_thread(load, "aptp-load")

    def scheduler_config(self, num_codes: int) -> SchedulerConfig:
        """The batching and admission policy these settings give a bundle of `num_codes` codes."""
        return SchedulerConfig(
            num_codes=num_codes,
            max_batch_size=self.max_batch_size,
            max_wait_ms=self.max_wait_ms,
            max_queue_size=self.max_queue_size,
        )


class ClusterSettings(BaseSettings):
    """How the application is laid out on the Ray cluster (`APTP_RAY_*` variables).

    Parameters:
        address (`str`, *optional*): the Ray cluster to join (`ray start --head` prints it); None starts a local one.
        expert_replicas (`int`): expert replicas when not autoscaling (each holds every code).
        max_expert_replicas (`int`, *optional*): autoscale between `expert_replicas` and this many replicas, on
            requests in flight per replica (`target_requests_per_replica`).
        target_requests_per_replica (`float`): the autoscaler's target of requests in flight per expert replica.
        gpus_per_replica (`float`): GPUs each expert replica reserves (0 on CPU; fractions share one GPU).
        cpus_per_replica (`float`): CPUs each expert replica reserves.
        ingress_replicas (`int`): ingress replicas (each encodes and routes; Serve's proxy spreads HTTP over them).
        metrics_host (`str`): the address expert replicas serve their metrics on (reachable by Prometheus).
    """

    model_config = SettingsConfigDict(env_prefix="APTP_RAY_", env_file=".env", extra="ignore")

    address: str | None = None
    expert_replicas: int = Field(1, ge=1)
    max_expert_replicas: int | None = Field(None, ge=1)
    target_requests_per_replica: float = Field(8.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    cpus_per_replica: float = Field(1.0, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    metrics_host: str = "127.0.0.1"

    @property
    def most_expert_replicas(self) -> int:
        return max(self.expert_replicas, self.max_expert_replicas or 0)
