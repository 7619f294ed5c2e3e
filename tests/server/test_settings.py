"""How the server's settings lay its compute out: engine workers and each one's intra-op threads."""

from __future__ import annotations

import pydantic
import pytest

import server.settings as settings_module
from server.settings import Settings


def _settings(**values) -> Settings:
    return Settings(**values, _env_file=None)


@pytest.fixture
def cpus(monkeypatch):
    def set_cpus(count: int) -> None:
        monkeypatch.setattr(settings_module, "available_cpus", lambda: count)

    return set_cpus


def test_on_a_cpu_two_workers_share_the_cpus_out(cpus):
    cpus(4)
    settings = _settings()
    assert (settings.workers, settings.worker_threads) == (2, 2)
    cpus(3)
    assert (settings.workers, settings.worker_threads) == (2, 1)
    assert (_settings(batching="step").workers, _settings(batching="step").worker_threads) == (2, 1)


def test_one_cpu_or_one_gpu_run_one_worker_on_torchs_threads(cpus):
    cpus(1)
    assert (_settings().workers, _settings().worker_threads) == (1, None)
    cpus(8)
    assert (_settings(device="cuda").workers, _settings(device="cuda").worker_threads) == (1, None)


def test_what_the_operator_sets_is_kept(cpus):
    cpus(8)
    settings = _settings(engine_workers=3, threads=2)
    assert (settings.workers, settings.worker_threads) == (3, 2)
    assert _settings(engine_workers=1).worker_threads is None


def test_a_compile_mode_compiles_every_expert_it_loads_and_an_unknown_one_is_refused(monkeypatch, tmp_path):
    """Compiling is lazy (the experts compile on their first call, in warm-up), so loading stays fast either way."""
    import torch._dynamo.eval_frame

    from tests.helpers import save_tiny_teacher
    from training.export import random_bundle

    bundle = random_bundle(save_tiny_teacher(tmp_path / "teacher"), tmp_path / "bundle", num_codes=2, keeps=[1.0, 0.5])
    compiled = _settings(bundle=bundle, compile_mode="default").load_pipeline()
    assert all(isinstance(e, torch._dynamo.eval_frame.OptimizedModule) for e in compiled.experts)
    assert not any(
        isinstance(e, torch._dynamo.eval_frame.OptimizedModule)
        for e in _settings(bundle=bundle).load_pipeline().experts
    )
    monkeypatch.setenv("APTP_COMPILE_MODE", "fastest")
    with pytest.raises(pydantic.ValidationError, match="compile_mode"):
        Settings(_env_file=None)
