"""Bounded load test of `aptp serve` on loopback: N requests per round with at most C in flight, R rounds.

    .venv/bin/python benchmarks/load.py                       # what `make serve` serves: the shipped APTP bundle
    .venv/bin/python benchmarks/load.py --bundle bundles/shapes/teacher   # the teacher, served as one code
    .venv/bin/python benchmarks/load.py --codes 4             # a random 4-code bundle built from the teacher
    .venv/bin/python benchmarks/load.py --url http://127.0.0.1:8000 --requests 32   # an already running server

The script starts the server itself (a subprocess, warm-up on), waits for `/readyz`, and fires each round's
`POST /generate` requests concurrently while a process of its own probes `/readyz` and `/healthz`. By default a
round sends 4x the server's total queue capacity (max_queue_size x codes) all at once, so most requests must be
turned away: the test passes when every request is answered, with an image (200) or a 429 carrying `Retry-After`,
none is lost (transport error, timeout, any other status), the server stays ready throughout, and refusals (on the
wire) and health checks are answered within `LATENCY_TARGET_S`. Between rounds it records the server's resident
memory (VmRSS) to show whether memory stays flat. At the end it stops the server with SIGTERM and times the drain.

Prints one table row per round and a verdict; writes `<out>.json` and `<out>.md`. Exit code 1 when a request was
lost or readiness failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from aptp.formats.kinds import DEFAULT_BUNDLE
from aptp.formats.report import Provenance, collect_provenance

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEACHER = Path("bundles/shapes/teacher")  # what --codes K builds its random bundle from by default
DEFAULT_OUT = Path("benchmarks/results/load/load")
READY_TIMEOUT_S = 180.0
# Generous: an admitted request waits for every batch queued ahead of it, which takes minutes on a busy CPU.
REQUEST_TIMEOUT_S = 600.0
# A readiness probe that takes longer than this counts as failed (a load balancer would give up sooner).
PROBE_TIMEOUT_S = 1.0
# The reliability issue's bars: a refusal answered, and /healthz answering, within this (429 p95, /healthz p99).
LATENCY_TARGET_S = 0.1
PROBE_INTERVAL_S = 0.5
LAG_TICK_S = 0.005
# RSS growth over the reading after round 1 still called "flat" (the highest later reading counts), and the most
# the second half of the rounds may add for memory that grew to be called "settled". Round 1 is the reference, not
# the idle server: the first round fills allocator caches and thread pools once.
DEFAULT_RSS_TOLERANCE_MB = 32.0
# Prompts routed to pick a balanced mix from (`POST /route` takes at most 256 prompts per call).
MAX_CANDIDATE_PROMPTS = 256


# ---------------------------------------------------------------------------------------------------- records
@dataclass
class Outcome:
    """One request's answer as the client saw it."""

    index: int
    prompt_index: int
    status: int | None  # None: no HTTP answer at all (transport error or client timeout)
    latency_s: float  # from the client's call to the answer, the client's own queueing and connecting included
    # From the request's first byte on the wire to the answer's headers: the server's part (the client's event loop,
    # busy starting the rest of a burst on the same cores, still adds its delay in noticing the answer).
    wire_s: float | None = None
    retry_after: str | None = None
    code: int | None = None  # the code the server routed a 200 to
    images: int = 0
    error: str | None = None

    @property
    def lost(self) -> bool:
        """Anything but an image or a well-formed refusal: the client was left without a usable answer."""
        if self.status == 200:
            return self.images < 1
        if self.status == 429:
            return not self.retry_after
        return True


@dataclass
class Probes:
    """`/readyz` answers during one round, and how long `/healthz` took beside each."""

    statuses: list[int | None] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    health_latencies_s: list[float] = field(default_factory=list)
    health_failed: int = 0

    @property
    def failed(self) -> int:
        return sum(status != 200 for status in self.statuses)


@dataclass
class RoundResult:
    round: int
    requests: int
    wall_s: float
    statuses: dict[str, int]
    lost: int
    lost_examples: list[str]
    latency_200_p50_s: float | None
    latency_200_p95_s: float | None
    latency_429_p50_s: float | None
    latency_429_p95_s: float | None
    wire_429_p50_s: float | None
    wire_429_p95_s: float | None
    client_lag_max_s: float
    retry_after_values: list[str]
    images_per_s: float
    ok_per_code: dict[str, int]
    mean_batch_per_code: dict[str, float | None]
    probes: int
    probes_failed: int
    probe_max_s: float | None
    healthz_p99_s: float | None
    healthz_failed: int
    ready_after: bool
    rss_mb: float | None


# ------------------------------------------------------------------------------------------------------ helpers
def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (no interpolation: every reported latency is one a client actually saw)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def retry_after_values(values: Iterable[str]) -> list[str]:
    """Distinct values, numbers in numeric order."""
    return sorted(set(values), key=lambda v: (len(v), v))


def free_port() -> int:
    """A port free right now. The server is given a concrete port rather than 0 because it would not tell us which
    one it got; the race with another process taking it in between is harmless on a test machine."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_memory_mb(pid: int) -> dict[str, float] | None:
    """VmRSS (now) and VmHWM (peak) of a process, in MB; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024  # kB -> MB
    return values


def _stat_cpu_seconds(stat: Path) -> float:
    """utime + stime of a /proc `stat` file (a process's or a thread's), in seconds; OSError when it is gone."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # clock ticks


def proc_cpu_seconds(pid: int) -> float | None:
    """CPU time a process has used so far, all its threads together; None once it is gone (or without /proc)."""
    try:
        return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
    except OSError:
        return None


def thread_cpu_seconds(pid: int) -> dict[str, float] | None:
    """CPU time each OS thread name of a process has used so far (threads of one name together: an engine thread
    and the OpenMP workers that took its name), counting the threads alive now; None once the process is gone (or
    without /proc)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    seconds: dict[str, float] = {}
    for task in tasks:
        folder = Path(f"/proc/{pid}/task/{task}")
        try:
            name, used = (folder / "comm").read_text().strip(), _stat_cpu_seconds(folder / "stat")
        except OSError:  # the thread ended meanwhile
            continue
        seconds[name] = seconds.get(name, 0.0) + used
    return seconds


def shapes_captions(count: int) -> list[str]:
    from training.data.shapes import ShapesDomain

    # The test split: same distribution as training, other scenes; captions vary in length, objects and wording.
    return [sample.caption for sample in ShapesDomain(seed=0, split="test").batch(0, count)]


def balanced_mix(prompts: list[str], codes: list[int], count: int) -> list[int]:
    """Indices of `count` prompts taken round-robin over the codes they route to, so every code the candidates
    reach gets traffic (an untrained router may send most prompts to one code)."""
    by_code: dict[int, list[int]] = {}
    for index, code in enumerate(codes):
        by_code.setdefault(code, []).append(index)
    chosen: list[int] = []
    queues = [list(indices) for _, indices in sorted(by_code.items())]
    while len(chosen) < count and any(queues):
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop(0))
    return chosen


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """The figures this report uses from `/metrics`."""
    out: dict[str, dict[str, float]] = {"batch_sum": {}, "batch_count": {}, "rejections": {}, "requests_ok": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "aptp_batch_size_sum":
                out["batch_sum"][sample.labels["code"]] = sample.value
            elif sample.name == "aptp_batch_size_count":
                out["batch_count"][sample.labels["code"]] = sample.value
            elif sample.name == "aptp_rejections_total":
                out["rejections"][sample.labels["reason"]] = sample.value
            elif sample.name == "aptp_requests_total" and sample.labels.get("status") == "ok":
                out["requests_ok"][sample.labels["code"]] = sample.value
    return out


def metrics_delta(after: dict, before: dict) -> dict[str, dict[str, float]]:
    return {k: {label: v - before.get(k, {}).get(label, 0.0) for label, v in after[k].items()} for k in after}


def mean_batches(metrics: dict) -> dict[str, float | None]:
    return {
        code: (metrics["batch_sum"].get(code, 0.0) / count if count else None)
        for code, count in sorted(metrics["batch_count"].items(), key=lambda kv: int(kv[0]))
    }


# ------------------------------------------------------------------------------------------------- the server
class ServerProcess:
    """`python -m aptp.cli.main serve` as a child process, configured through APTP_* variables, its log in a file
    (`serve_args`: more options, e.g. `--ray`)."""

    def __init__(
        self,
        bundle: Path,
        port: int,
        settings: dict[str, str],
        log_path: Path,
        device: str,
        serve_args: tuple[str, ...] = (),
    ):
        env = dict(os.environ)
        env.update(settings)
        # The load test talks to its own server without keys, whatever an operator's environment or .env says.
        env["APTP_API_KEYS"] = ""
        command = [sys.executable, "-m", "aptp.cli.main", "serve", "--bundle", str(bundle), "--port", str(port)]
        command += ["--host", "127.0.0.1", "--device", device, *serve_args]
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float) -> dict:
        """SIGTERM (the server drains, then exits): seconds until it exited, its exit code (None: it hung and was
        killed) and whether it shut down gracefully."""
        began = time.monotonic()
        code = self.process.poll()
        if code is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        seconds = time.monotonic() - began
        self._log.close()
        # After a drain that finished, `aptp serve` exits 0; a second signal or a drain timeout dies of the signal.
        graceful = "Application shutdown complete" in self.log_tail(lines=200)
        clean = graceful and code == 0
        return {"seconds": seconds, "exit_code": code, "graceful": graceful, "clean": clean}


async def wait_ready(client: httpx.AsyncClient, url: str, server: ServerProcess | None) -> dict:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server is not None and server.process.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.process.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):  # not listening yet: poll again
            response = await client.get(f"{url}/readyz", timeout=PROBE_TIMEOUT_S)
            if response.status_code == 200:
                return response.json()
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{url}/readyz did not answer 200 within {READY_TIMEOUT_S:.0f} s")


# -------------------------------------------------------------------------------------------------- one round
async def send(
    client: httpx.AsyncClient, url: str, limit: asyncio.Semaphore, index: int, prompt_index: int, body: dict
) -> Outcome:
    marks: dict[str, float] = {}

    async def trace(event: str, info: dict) -> None:  # httpcore's request events
        if event.endswith("send_request_headers.started"):
            marks["sent"] = time.perf_counter()
        elif event.endswith("receive_response_headers.complete"):
            marks["answered"] = time.perf_counter()

    async with limit:
        began = time.perf_counter()
        try:
            response = await client.post(f"{url}/generate", json=body, extensions={"trace": trace})
        except httpx.HTTPError as e:  # connection refused/reset, client timeout, broken response
            return Outcome(index, prompt_index, None, time.perf_counter() - began, error=f"{type(e).__name__}: {e}")
        latency = time.perf_counter() - began
    wire = marks["answered"] - marks["sent"] if {"sent", "answered"} <= marks.keys() else None
    outcome = Outcome(index, prompt_index, response.status_code, latency, wire_s=wire)
    if response.status_code == 200:
        try:
            payload = response.json()
            outcome.images = len(payload["images"])
            outcome.code = int(payload["report"]["code"])
        except (ValueError, KeyError, TypeError) as e:
            outcome.error = f"malformed 200 body: {e}"
    elif response.status_code == 429:
        outcome.retry_after = response.headers.get("Retry-After")
        if not outcome.retry_after:
            outcome.error = "429 without Retry-After"
    else:
        outcome.error = f"HTTP {response.status_code}: {response.text[:200]}"
    return outcome


def _probe(client: httpx.Client, url: str, probes: Probes) -> None:
    began = time.perf_counter()
    try:
        probes.statuses.append(client.get(f"{url}/readyz").status_code)
    except httpx.HTTPError as e:
        probes.statuses.append(None)
        probes.errors.append(f"{type(e).__name__}: {e}")
    probes.latencies_s.append(time.perf_counter() - began)
    began = time.perf_counter()
    try:
        probes.health_failed += client.get(f"{url}/healthz").status_code != 200
    except httpx.HTTPError:
        probes.health_failed += 1
    probes.health_latencies_s.append(time.perf_counter() - began)


def probe_until_told(url: str) -> None:
    """The prober (`load.py --probe URL`, a process of its own, like a load balancer's health checker): poll
    `/readyz` and `/healthz` every `PROBE_INTERVAL_S`, each probe with a `PROBE_TIMEOUT_S` timeout, until stdin is
    closed; probe once more, then print the `Probes` as one JSON line. A process of its own, because the load's
    client saturates its own interpreter sending a burst: probes sharing it would time the client, not the server."""
    probes = Probes()
    with httpx.Client(timeout=PROBE_TIMEOUT_S) as client:
        print("probing", flush=True)
        while True:
            _probe(client, url, probes)
            told, _, _ = select.select([sys.stdin], [], [], PROBE_INTERVAL_S)
            if told:  # the round is over: one more probe, so a short round still gets two
                _probe(client, url, probes)
                break
    print(json.dumps(asdict(probes)), flush=True)


async def start_prober(url: str) -> asyncio.subprocess.Process:
    prober = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--probe", url, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    await prober.stdout.readline()  # "probing": the round starts once the prober runs
    return prober


async def stop_prober(prober: asyncio.subprocess.Process) -> Probes:
    prober.stdin.close()
    output, _ = await prober.communicate()
    return Probes(**json.loads(output.decode().splitlines()[-1]))


async def client_lag(done: asyncio.Event) -> float:
    """The longest the load's own event loop was late to wake a `LAG_TICK_S` sleep during the round: how long an
    answer could sit unread by the client (its wire times include it)."""
    worst = 0.0
    while not done.is_set():
        began = time.perf_counter()
        await asyncio.sleep(LAG_TICK_S)
        worst = max(worst, time.perf_counter() - began - LAG_TICK_S)
    return worst


async def run_round(
    client: httpx.AsyncClient, url: str, prompts: list[str], args: argparse.Namespace, number: int
) -> tuple[list[Outcome], Probes, float, float]:
    limit = asyncio.Semaphore(args.concurrency)
    done = asyncio.Event()
    prober = await start_prober(url)
    lag = asyncio.create_task(client_lag(done))
    began = time.perf_counter()
    tasks = []
    for i in range(args.requests):
        prompt_index = i % len(prompts)
        # A different seed per request and round: no two requests are the same work.
        body = {"prompt": prompts[prompt_index], "steps": args.steps, "seed": number * args.requests + i}
        tasks.append(send(client, url, limit, i, prompt_index, body))
    outcomes = await asyncio.gather(*tasks)
    wall = time.perf_counter() - began
    done.set()
    return list(outcomes), await stop_prober(prober), wall, await lag


def summarise(
    number: int,
    outcomes: list[Outcome],
    probes: Probes,
    wall: float,
    lag: float,
    ready_after: bool,
    rss_mb: float | None,
    metrics: dict,
) -> RoundResult:
    statuses = Counter("error" if o.status is None else str(o.status) for o in outcomes)
    ok = [o for o in outcomes if o.status == 200 and not o.lost]
    lost = [o for o in outcomes if o.lost]
    return RoundResult(
        round=number,
        requests=len(outcomes),
        wall_s=wall,
        statuses=dict(sorted(statuses.items())),
        lost=len(lost),
        lost_examples=[f"#{o.index}: {o.error}" for o in lost[:5]],
        latency_200_p50_s=percentile([o.latency_s for o in ok], 50),
        latency_200_p95_s=percentile([o.latency_s for o in ok], 95),
        latency_429_p50_s=percentile([o.latency_s for o in outcomes if o.status == 429], 50),
        latency_429_p95_s=percentile([o.latency_s for o in outcomes if o.status == 429], 95),
        wire_429_p50_s=percentile([o.wire_s for o in outcomes if o.status == 429 and o.wire_s is not None], 50),
        wire_429_p95_s=percentile([o.wire_s for o in outcomes if o.status == 429 and o.wire_s is not None], 95),
        client_lag_max_s=lag,
        retry_after_values=retry_after_values(o.retry_after for o in outcomes if o.retry_after),
        images_per_s=sum(o.images for o in ok) / wall,
        ok_per_code={str(code): n for code, n in sorted(Counter(o.code for o in ok).items())},
        mean_batch_per_code=mean_batches(metrics),
        probes=len(probes.statuses),
        probes_failed=probes.failed,
        probe_max_s=max(probes.latencies_s) if probes.latencies_s else None,
        healthz_p99_s=percentile(probes.health_latencies_s, 99),
        healthz_failed=probes.health_failed,
        ready_after=ready_after,
        rss_mb=rss_mb,
    )


# ---------------------------------------------------------------------------------------------------- the run
def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _batches(per_code: dict[str, float | None]) -> str:
    return " ".join(f"{code}:{'-' if v is None else f'{v:.1f}'}" for code, v in per_code.items())


TABLE_HEADER = (
    "round",
    "200",
    "429",
    "other",
    "lost",
    "p50 s",
    "p95 s",
    "429 p50/p95 s",
    "429 wire p50/p95 s",
    "client lag max s",
    "healthz p99 s",
    "img/s",
    "mean batch by code",
    "readyz ok",
    "RSS MB",
)


def table_row(r: RoundResult) -> tuple[str, ...]:
    other = sum(n for status, n in r.statuses.items() if status not in ("200", "429"))
    return (
        str(r.round),
        str(r.statuses.get("200", 0)),
        str(r.statuses.get("429", 0)),
        str(other),
        str(r.lost),
        _seconds(r.latency_200_p50_s),
        _seconds(r.latency_200_p95_s),
        f"{_seconds(r.latency_429_p50_s)}/{_seconds(r.latency_429_p95_s)}",
        f"{_seconds(r.wire_429_p50_s)}/{_seconds(r.wire_429_p95_s)}",
        _seconds(r.client_lag_max_s),
        _seconds(r.healthz_p99_s) + (f" ({r.healthz_failed} failed)" if r.healthz_failed else ""),
        f"{r.images_per_s:.2f}",
        _batches(r.mean_batch_per_code),
        f"{r.probes - r.probes_failed}/{r.probes}" + ("" if r.ready_after else " (not after)"),
        "-" if r.rss_mb is None else f"{r.rss_mb:.0f}",
    )


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)), flush=True)


async def drive(args: argparse.Namespace, url: str, server: ServerProcess | None) -> dict:
    """Wait for readiness, pick the prompt mix, run the rounds; everything the report needs."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0)) as control:
        began = time.monotonic()
        ready = await wait_ready(control, url, server)
        startup_s = time.monotonic() - began
        num_codes = int(ready.get("codes", 1))

        # The prompt mix: a file's prompts as they are, or shapes captions chosen to reach every code they can.
        if args.prompts_file is not None:
            candidates = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
        else:
            candidates = shapes_captions(min(MAX_CANDIDATE_PROMPTS, max(50, 5 * args.num_prompts)))
        routed = await control.post(f"{url}/route", json={"prompts": candidates[:MAX_CANDIDATE_PROMPTS]})
        routed.raise_for_status()
        codes: list[int | None] = [decision["code"] for decision in routed.json()["routes"]]
        if args.prompts_file is None:
            chosen = balanced_mix(candidates, codes, args.num_prompts)
            prompts, prompt_codes = [candidates[i] for i in chosen], [codes[i] for i in chosen]
        else:
            prompts, prompt_codes = candidates, codes + [None] * (len(candidates) - len(codes))

        capacity = args.max_queue_size * num_codes
        if args.requests is None:
            args.requests = args.load * capacity  # the reliability issue's loads: 4x and 16x the total capacity
        if args.concurrency is None:
            args.concurrency = args.requests  # all at once
        print(
            f"ready after {startup_s:.1f} s: {num_codes} code(s), queue capacity {args.max_queue_size} x {num_codes} = "
            f"{capacity}; {args.requests} requests per round ({args.requests / capacity:.1f}x capacity), "
            f"concurrency {args.concurrency}, steps {args.steps}, {len(prompts)} prompts "
            f"(by code: {dict(sorted(Counter(c for c in prompt_codes if c is not None).items()))})",
            flush=True,
        )
        reached = len({c for c in prompt_codes if c is not None})
        routing_note = None
        if reached < num_codes:
            # Then only the reached codes' queues take the load: each is loaded well past its share. A bundle from
            # `random_bundle` does this: its untrained router gives every prompt the same code.
            per_queue = args.requests / (args.max_queue_size * max(1, reached))
            routing_note = (
                f"the prompts reach only {reached} of {num_codes} codes, so each reached queue takes "
                f"{per_queue:.1f}x its capacity"
            )
            print(f"note: {routing_note}", flush=True)

        async def scrape() -> dict:
            return parse_metrics((await control.get(f"{url}/metrics")).text)

        memory_start = proc_memory_mb(server.pid) if server is not None else None
        metrics_start = metrics_before = await scrape()
        rounds: list[RoundResult] = []
        # The load's own client: one connection per request in flight, so the client never queues requests itself.
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=30.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            if args.connect_first:  # open every connection before round 1: its burst then costs no TCP set-up
                await asyncio.gather(*(client.get(f"{url}/healthz") for _ in range(args.concurrency)))
            for number in range(1, args.rounds + 1):
                outcomes, probes, wall, lag = await run_round(client, url, prompts, args, number)
                try:
                    ready_after = (await control.get(f"{url}/readyz", timeout=PROBE_TIMEOUT_S)).status_code == 200
                except httpx.HTTPError:
                    ready_after = False
                memory = proc_memory_mb(server.pid) if server is not None else None
                metrics_after = await scrape()
                result = summarise(
                    number,
                    outcomes,
                    probes,
                    wall,
                    lag,
                    ready_after,
                    memory["VmRSS"] if memory else None,
                    metrics_delta(metrics_after, metrics_before),
                )
                metrics_before = metrics_after
                rounds.append(result)
                print(f"round {number}/{args.rounds} done in {wall:.1f} s", flush=True)
                for example in result.lost_examples:
                    print(f"  lost {example}", flush=True)
                for error in probes.errors[:3]:
                    print(f"  readiness probe failed: {error}", flush=True)
        print_table([TABLE_HEADER, *(table_row(r) for r in rounds)])
        totals = metrics_delta(metrics_before, metrics_start)
        return {
            "startup_s": startup_s,
            "num_codes": num_codes,
            "queue_capacity": capacity,
            "codes_reached": reached,
            "routing_note": routing_note,
            "prompts": [{"prompt": p, "code": c} for p, c in zip(prompts, prompt_codes, strict=True)],
            "rounds": rounds,
            "memory_start_mb": memory_start,
            "memory_peak_mb": (proc_memory_mb(server.pid) or {}).get("VmHWM") if server is not None else None,
            "metrics": {
                "mean_batch_per_code": mean_batches(totals),
                "batches_per_code": {k: int(v) for k, v in totals["batch_count"].items()},
                "rejections": {k: int(v) for k, v in totals["rejections"].items()},
                "requests_ok_per_code": {k: int(v) for k, v in totals["requests_ok"].items()},
            },
        }


def describe_shutdown(shutdown: dict) -> str:
    code, seconds = shutdown["exit_code"], shutdown["seconds"]
    if code is None:
        return f"no exit within {seconds:.0f} s, killed"
    how = "exited after a graceful shutdown" if shutdown["graceful"] else "exited WITHOUT a graceful shutdown"
    return f"{how} in {seconds:.1f} s, exit code {code}" + (" (killed by the signal)" if code == -15 else "")


def memory_trend(rss: list[float], tolerance_mb: float) -> dict:
    """Judge the server's RSS after each round: "flat" when no reading exceeds round 1's by more than the
    tolerance; "settles" when it does, but the second half of the rounds adds no more than the tolerance (caches
    and allocator arenas filling up to a bound, measured here over 40 rounds); "GROWING" otherwise (a leak)."""
    if len(rss) < 2:
        return {"rss_after_rounds_mb": rss, "flat": None, "summary": f"RSS {rss[0]:.0f} MB (one round: not judged)"}
    growth = max(rss[1:]) - rss[0]
    half = len(rss) // 2
    late_growth = max(rss[half:]) - rss[half - 1]
    if growth <= tolerance_mb:
        state, detail = "flat", "flat"
    else:
        state = "settles" if len(rss) >= 4 and late_growth <= tolerance_mb else "GROWING"
        detail = f"{state}: {late_growth:+.0f} MB over rounds {half + 1}..{len(rss)}"
    readings = ", ".join(f"{v:.0f}" for v in rss)
    return {
        "rss_after_rounds_mb": rss,
        "growth_mb": growth,
        "second_half_growth_mb": late_growth,
        "tolerance_mb": tolerance_mb,
        "flat": growth <= tolerance_mb,
        "state": state,
        "summary": f"RSS after rounds 1..{len(rss)}: {readings} MB (max growth {growth:+.0f} MB, {detail}; "
        f"tolerance {tolerance_mb:g} MB)",
    }


def verdict(report: dict, rss_tolerance_mb: float) -> tuple[bool, str, dict]:
    rounds: list[RoundResult] = report["rounds"]
    total = sum(r.requests for r in rounds)
    ok = sum(r.statuses.get("200", 0) for r in rounds)
    refused = sum(r.statuses.get("429", 0) for r in rounds)
    lost = sum(r.lost for r in rounds)
    ready = all(r.probes_failed == 0 and r.ready_after for r in rounds)
    load = rounds[0].requests / report["queue_capacity"] if rounds else 0.0
    parts = [
        f"{len(rounds)} round(s) at {load:.1f}x the queue capacity: {total - lost}/{total} answered "
        f"({ok} x 200, {refused} x 429 with Retry-After), {lost} lost"
    ]
    probes = sum(r.probes for r in rounds)
    failed = sum(r.probes_failed for r in rounds)
    parts.append("ready throughout" if ready else f"NOT READY ({failed}/{probes} probes failed or not ready after)")
    refusal_p95 = max((r.latency_429_p95_s for r in rounds if r.latency_429_p95_s is not None), default=None)
    # judged on the wire: a burst's last requests wait for the client itself, on the same cores, before they are sent
    wire_p95 = max((r.wire_429_p95_s for r in rounds if r.wire_429_p95_s is not None), default=None)
    health_p99 = max((r.healthz_p99_s for r in rounds if r.healthz_p99_s is not None), default=None)
    fast = all(v is None or v <= LATENCY_TARGET_S for v in (wire_p95, health_p99))

    def judged(value: float | None) -> str:
        return f"{_seconds(value)} s ({'within' if value is None or value <= LATENCY_TARGET_S else 'OVER'})"

    parts.append(
        f"worst round against {LATENCY_TARGET_S} s: 429 p95 {judged(wire_p95)} from request sent to answer "
        f"({_seconds(refusal_p95)} s from the client's call), /healthz p99 {judged(health_p99)}"
    )
    rss = [r.rss_mb for r in rounds if r.rss_mb is not None]
    memory = memory_trend(rss, rss_tolerance_mb) if rss else {}
    if memory:
        parts.append(memory["summary"])
    # Cross-check the client's counts against the server's own: a mismatch means answers were miscounted somewhere.
    server_ok = sum(report["metrics"]["requests_ok_per_code"].values())
    rejections = report["metrics"]["rejections"]
    server_refused = rejections.get("queue_full", 0) + rejections.get("routing_full", 0)
    if (server_ok, server_refused) != (ok, refused):
        parts.append(f"server counted {server_ok} ok / {server_refused} refused (client: {ok} / {refused})")
    shutdown = report.get("shutdown")
    if shutdown is not None:
        parts.append(f"SIGTERM: {describe_shutdown(shutdown)}")
    passed = lost == 0 and ready and fast
    return passed, ("PASS: " if passed else "FAIL: ") + "; ".join(parts), memory


def write_reports(out: Path, report: dict, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    serialisable = dict(report, rounds=[asdict(r) for r in report["rounds"]])
    Path(f"{out}.json").write_text(json.dumps(serialisable, indent=1) + "\n")

    rounds: list[RoundResult] = report["rounds"]
    s = report["settings"]
    lines = [
        f"# Load test: {s['bundle']} ({report['num_codes']} code(s))",
        "",
        f"{report['date']}, {report['machine']}. Command: `{command}`",
        "",
        f"Settings: max_queue_size {s['max_queue_size']} per code x {report['num_codes']} code(s) = "
        f"{report['queue_capacity']} queued requests in total; {s['requests']} requests per round "
        f"({s['requests'] / report['queue_capacity']:.1f}x capacity) with at most {s['concurrency']} in flight; "
        f"{s['rounds']} round(s); steps {s['steps']}; max_batch_size {s['max_batch_size']}; "
        f"max_wait_ms {s['max_wait_ms']:g}; engine threads {s.get('threads') or 'torch default'}; "
        f"{len(report['prompts'])} prompts.",
        "",
        # the printed table's columns: p50/p95 of the 200s, of the 429s, /healthz p99, /readyz probes answered 200
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
        *("| " + " | ".join(table_row(r)) + " |" for r in rounds),
    ]
    metrics = report["metrics"]
    lines += [
        "",
        f"**{report['verdict']}**",
        "",
        *([f"- Note: {report['routing_note']}."] if report["routing_note"] else []),
        f"- Startup (process start to `/readyz` 200, with warm-up): {report['startup_s']:.1f} s."
        if report["memory_start_mb"]
        else f"- Waited {report['startup_s']:.1f} s for `/readyz` 200.",
    ]
    if report["memory_start_mb"]:
        lines.append(
            f"- Server memory: RSS {report['memory_start_mb']['VmRSS']:.0f} MB when ready, "
            + ", ".join(f"{r.rss_mb:.0f}" for r in rounds)
            + f" MB after each round; peak (VmHWM) {report['memory_peak_mb']:.0f} MB."
        )
    lines += [
        f"- Server metrics over the rounds: mean batch size by code {_batches(metrics['mean_batch_per_code'])} "
        f"(batches {metrics['batches_per_code']}); rejections {metrics['rejections']}.",
        f"- Retry-After values seen: {retry_after_values(v for r in rounds for v in r.retry_after_values)}.",
    ]
    if report.get("shutdown"):
        lines.append(f"- Shutdown: SIGTERM -> {describe_shutdown(report['shutdown'])}.")
    if report.get("provenance"):
        lines += ["", Provenance.model_validate(report["provenance"]).line()]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, default=DEFAULT_BUNDLE, help=f"bundle or teacher folder ({DEFAULT_BUNDLE})"
    )
    parser.add_argument(
        "--codes", type=int, default=1, help=f"> 1: a random K-code bundle of a teacher ({DEFAULT_TEACHER})"
    )
    parser.add_argument("--requests", type=int, help="requests per round (default: --load x the total queue capacity)")
    parser.add_argument("--load", type=int, default=4, help="requests per round as a multiple of the total capacity")
    parser.add_argument("--concurrency", type=int, help="requests in flight at most (default: all of them)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="sampling steps per request")
    parser.add_argument("--max-queue-size", type=int, default=4, help="APTP_MAX_QUEUE_SIZE (queued requests per code)")
    parser.add_argument("--max-batch-size", type=int, default=4, help="APTP_MAX_BATCH_SIZE")
    parser.add_argument("--max-wait-ms", type=float, default=50.0, help="APTP_MAX_WAIT_MS")
    parser.add_argument("--threads", type=int, help="APTP_THREADS: the engine's torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument(
        "--connect-first",
        action="store_true",
        help="open the client's connections before round 1 (separates TCP set-up from the first burst)",
    )
    parser.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)  # the prober process (probe_until_told)
    parser.add_argument("--url", help="load an already running server instead (memory is then not measured)")
    parser.add_argument(
        "--prompts", default="20", help="N shapes captions spread over the codes (default 20), or a file of prompts"
    )
    parser.add_argument("--rss-tolerance-mb", type=float, default=DEFAULT_RSS_TOLERANCE_MB)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"writes OUT.json and OUT.md ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for name in ("requests", "load", "concurrency", "rounds", "steps", "max_queue_size", "max_batch_size", "codes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.url is not None and args.codes > 1:
        parser.error("--codes builds a bundle for a server this script starts; it cannot apply with --url")
    # The defaults name repository paths, so they hold from any working directory; given paths are the caller's.
    if args.bundle == DEFAULT_BUNDLE:
        args.bundle = REPO / (DEFAULT_TEACHER if args.codes > 1 else DEFAULT_BUNDLE)
    if args.out == DEFAULT_OUT:
        args.out = REPO / DEFAULT_OUT
    if args.prompts.isdigit():
        args.num_prompts, args.prompts_file = int(args.prompts), None
    else:
        args.num_prompts, args.prompts_file = None, Path(args.prompts)
        if not args.prompts_file.is_file():
            parser.error(f"--prompts: neither a number nor a file: {args.prompts}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        probe_until_told(args.probe)
        return 0
    command = shlex.join(["python", "benchmarks/load.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="aptp-load-") as scratch:
        server = None
        bundle = args.bundle.resolve()
        shown = bundle.relative_to(REPO) if bundle.is_relative_to(REPO) else bundle
        bundle_label = str(shown) if args.codes == 1 else f"random {args.codes}-code bundle of {shown}"
        if args.url is not None:
            url = args.url.rstrip("/")
            bundle_label = f"the server at {url}"
        else:
            if args.codes > 1:
                from training.export import random_bundle

                print(f"building a random {args.codes}-code bundle from {shown} ...", flush=True)
                bundle = random_bundle(bundle, Path(scratch) / "bundle", num_codes=args.codes)
            port = args.port or free_port()
            url = f"http://127.0.0.1:{port}"
            settings = {
                "APTP_MAX_QUEUE_SIZE": str(args.max_queue_size),
                "APTP_MAX_BATCH_SIZE": str(args.max_batch_size),
                "APTP_MAX_WAIT_MS": str(args.max_wait_ms),
                "APTP_WARMUP": "true",
            }
            if args.threads is not None:
                settings["APTP_THREADS"] = str(args.threads)
            server = ServerProcess(bundle, port, settings, Path(scratch) / "server.log", args.device)
            print(f"started the server (pid {server.pid}) on {url}", flush=True)

        shutdown = None
        try:
            report = asyncio.run(drive(args, url, server))
        except Exception as e:
            print(f"load test aborted: {type(e).__name__}: {e}", file=sys.stderr)
            if server is not None:
                print(f"--- server log (last lines) ---\n{server.log_tail()}", file=sys.stderr)
            return 1
        finally:
            if server is not None:
                # The server's own drain timeout is 300 s by default; the rounds are over, so it should exit at once.
                shutdown = server.stop(timeout_s=330.0)
                print(f"SIGTERM: {describe_shutdown(shutdown)}", flush=True)
                if not shutdown["clean"]:
                    print(f"--- server log (last lines) ---\n{server.log_tail()}", file=sys.stderr)

    report["shutdown"] = shutdown
    report["date"] = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    report["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs, {args.device}"
    report["command"] = command
    report["settings"] = {
        "bundle": bundle_label,
        "url": url,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "steps": args.steps,
        "max_queue_size": args.max_queue_size,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "threads": args.threads,
    }
    measured = [bundle_label] if Path(bundle_label).is_dir() else []
    provenance = collect_provenance(measured, config=report["settings"], command=command)
    report["provenance"] = provenance.model_dump(mode="json")
    passed, line, memory = verdict(report, args.rss_tolerance_mb)
    report["verdict"], report["memory"] = line, memory
    print(line, flush=True)
    write_reports(args.out, report, command)
    print(f"wrote {args.out}.json and {args.out}.md", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
