"""The deployment files (compose.yaml, docker/): they parse, point at each other, and the dashboard only queries
metrics the server really exports. Docker itself is not needed: nothing here builds or starts a container."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from server.metrics import ServerMetrics
from server.scheduler import SchedulerStats
from tests.docker.dashboard import METRIC, query_panels

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
BY_CLAUSE = re.compile(r"\bby\s*\(([^)]*)\)")
# Labels Prometheus adds to every scraped series, and the bucket label of histograms.
TARGET_LABELS = {"instance", "job"}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(REPO / "compose.yaml")


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of the service's bind mounts; named volumes are skipped."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def exported_samples() -> dict[str, set[str]]:
    """Sample name -> label names, of a fresh server registry after one event of each kind and with the
    scheduler gauges attached."""
    metrics = ServerMetrics([100, 200])
    metrics.requests.labels(code="0", status="ok").inc()
    metrics.rejections.labels(reason="queue_full").inc()
    metrics.batch_size.labels(code="0").observe(2)
    metrics.queue_wait.labels(code="0").observe(0.3)
    metrics.compute.labels(code="0").observe(4.0)
    metrics.end_to_end.labels(code="0").observe(4.5)
    metrics.macs.labels(code="0").inc(100 * 2 * 20)
    metrics.images.labels(code="0").inc(2)
    metrics.router.observe(0.004)
    metrics.ready.set(1)
    stats = SchedulerStats(
        queued_requests={0: 1, 1: 0},
        queued_images={0: 2, 1: 0},
        running_batches=1,
        running_requests=1,
        admitted=2,
        rejected={},
        expired=0,
        aborted=0,
        completed=1,
        failed=0,
        completed_batches=1,
        avg_batch_seconds={0: 4.0, 1: None},
        closed=False,
    )
    metrics.watch_scheduler(lambda: stats)
    metrics.render()  # raises if a sample cannot be written out (Prometheus would get a 500 from /metrics)
    samples: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def test_exported_metrics_render():
    # what Prometheus scrapes: an exposition that fails to render leaves every panel empty
    samples = exported_samples()
    assert samples["aptp_queue_images"] == {"code"}
    assert samples["aptp_queue_depth"] == {"code"}


# ---------------------------------------------------------------------------------------------------- compose.yaml
def test_compose_services_and_server_port(compose):
    services = compose["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)
    server = services["server"]
    assert "8000:8000" in server["ports"]
    assert server["environment"]["APTP_HOST"] == "0.0.0.0"
    assert "healthcheck" in server
    # the drain must finish before Docker's SIGKILL
    assert float(server["environment"]["APTP_DRAIN_TIMEOUT_S"]) < float(server["stop_grace_period"].removesuffix("s"))
    # the default profile must not need a GPU: the CUDA server is opt-in
    assert services["server-cuda"]["profiles"] == ["cuda"]


def test_compose_builds_and_mounts_exist(compose):
    for name, service in compose["services"].items():
        if "build" in service:
            context = REPO / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for source, _ in bind_mounts(service):
            assert (REPO / source).exists(), f"{name} mounts {source}, which is not in the repository"


def test_grafana_provisioning_matches_mounts(compose):
    mounts = {
        Path(source).resolve().relative_to(REPO): target
        for source, target in bind_mounts(compose["services"]["grafana"])
    }
    dashboards_dir = mounts[Path("docker/grafana/dashboards")]
    providers = load_yaml(DOCKER / "grafana" / "provisioning" / "dashboards" / "aptp.yml")["providers"]
    assert [provider["options"]["path"] for provider in providers] == [dashboards_dir]
    datasources = load_yaml(DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert [(source["uid"], source["url"]) for source in datasources] == [("prometheus", "http://prometheus:9090")]


# ------------------------------------------------------------------------------------------------------ Prometheus
def test_prometheus_scrapes_the_server_metrics(compose):
    config = load_yaml(DOCKER / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    aptp = jobs["aptp"]
    assert aptp.get("metrics_path", "/metrics") == "/metrics"
    targets = [target for group in aptp["static_configs"] for target in group["targets"]]
    assert "server:8000" in targets
    for target in targets:
        assert target.split(":")[0] in compose["services"], f"{target} is not a compose service"
    assert aptp.get("scrape_interval", config["global"]["scrape_interval"]) == "5s"


# ------------------------------------------------------------------------------------------------------- dashboard
def test_dashboard_metrics_are_exported(dashboard):
    samples = exported_samples()
    used = set()
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(METRIC.findall(expr))
            assert names, f"panel {panel['title']!r} queries no aptp_ metric: {expr}"
            missing = names - set(samples)
            assert not missing, f"panel {panel['title']!r} queries {sorted(missing)}, which the server does not export"
            # grouping labels must exist on the queried series (`le` only on the _bucket samples)
            labels = set().union(*(samples[name] for name in names)) | TARGET_LABELS
            for clause in BY_CLAUSE.findall(expr):
                grouped = {label.strip() for label in clause.split(",") if label.strip()}
                assert grouped <= labels, f"panel {panel['title']!r} groups by {sorted(grouped - labels)}: {expr}"
            used |= names
    # every family the server exports has a panel
    families = {METRIC.match(name).group(0) for name in samples if not name.endswith("_created")}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in families}
    unused = {family for family in families if not any(name.startswith(family) for name in used)}
    assert not unused, f"exported but on no panel: {sorted(unused)}"


def test_dashboard_panels(dashboard):
    assert dashboard["title"] == "APTP serving"
    assert dashboard["schemaVersion"] == 39
    ids = [panel["id"] for panel in dashboard["panels"]]
    ids += [nested["id"] for panel in dashboard["panels"] for nested in panel.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in query_panels(dashboard):
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == "prometheus", panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == "prometheus", variable["name"]


# ----------------------------------------------------------------------------------------------------- Dockerfiles
def logical_lines(dockerfile: Path) -> list[str]:
    """Instructions with their `\\` continuations joined, comments dropped."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dockerfile_pins_torch_before_installing_the_project(dockerfile):
    lines = logical_lines(dockerfile)
    torch = [i for i, line in enumerate(lines) if re.search(r"pip install .*torch==2\.13\.0 .*--index-url", line)]
    project = [i for i, line in enumerate(lines) if re.search(r"pip install (--?[\w-]+( [\w./-]+)? )*\.(\s|$)", line)]
    assert torch, "torch==2.13.0 is not installed from a wheel index"
    assert project, "the project is not installed"
    assert all("-c constraints.txt" in lines[i] for i in project), "install under the tested versions"
    assert any(line.startswith("COPY ") and "constraints.txt" in line for line in lines[: min(project)])
    assert max(torch) < min(project), "torch must be installed before `pip install .` (or pip pulls a CUDA build)"
    assert lines[-1] == 'CMD ["aptp", "serve"]'
    assert any(line.startswith("USER ") and "root" not in line for line in lines), "the server must not run as root"
    assert any(line.startswith("HEALTHCHECK") and "/healthz" in line for line in lines)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_the_serving_image_holds_every_package_serving_imports_and_no_training_code(dockerfile):
    from tests.test_architecture import import_graph

    copied = {line.split()[1].rstrip("/") for line in logical_lines(dockerfile) if line.startswith("COPY ")}
    everything, at_import = import_graph(), import_graph(module_level=True)
    reached, todo = set(), ["aptp.cli.main", "aptp.cli.serve"]
    while todo:
        module = todo.pop()
        if module in reached:
            continue
        reached.add(module)
        # `aptp serve` imports every subcommand's module, but the others import their subsystems only when run.
        other_command = module.startswith("aptp.cli.") and module != "aptp.cli.serve"
        todo += (at_import if other_command else everything)[module]
    needed = {module.split(".")[0] for module in reached}
    assert needed <= copied, f"the image misses {needed - copied}"
    assert "training" not in copied


# ------------------------------------------------------------------------------------------ Ray Serve config file
def test_the_ray_serve_config_runs_the_application_with_valid_settings():
    """`serve deploy configs/ray-serve.yaml`: its import path names the application builder, its arguments are
    server settings and its environment the cluster layout, all valid (Ray itself is not needed to check this)."""
    import ast

    from server.settings import ClusterSettings, Settings

    config = load_yaml(REPO / "configs" / "ray-serve.yaml")
    (app,) = config["applications"]
    module, _, builder = app["import_path"].partition(":")
    tree = ast.parse((REPO / Path(*module.split("."))).with_suffix(".py").read_text())
    assert builder in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    settings = Settings(**app["args"])
    assert settings.device == "cuda" and settings.dtype == "float16"
    env = app["runtime_env"]["env_vars"]
    assert all(name.startswith("APTP_RAY_") and isinstance(value, str) for name, value in env.items())
    layout = ClusterSettings(**{name.removeprefix("APTP_RAY_").lower(): value for name, value in env.items()})
    assert layout.gpus_per_replica == 1 and layout.max_expert_replicas > layout.expert_replicas
