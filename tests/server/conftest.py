"""Server fixtures: a real small bundle (random codes cut from a tiny random-weight teacher), loaded once per
session, and apps built around it with per-test settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.helpers import save_tiny_teacher

NUM_CODES = 2


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from training.export import random_bundle

    root = tmp_path_factory.mktemp("serving")
    teacher = save_tiny_teacher(root / "teacher")
    return random_bundle(teacher, root / "bundle", num_codes=NUM_CODES, keeps=[1.0, 0.5], seed=0)


@pytest.fixture(scope="session")
def pipeline(tiny_bundle):
    """The tiny bundle as the server loads it (`Settings.load_pipeline`: device, dtype and layout included)."""
    return server_settings(tiny_bundle).load_pipeline()


def server_settings(bundle: Path, **overrides: Any):
    from server.settings import Settings

    values: dict[str, Any] = {"bundle": bundle, "warmup": False, "default_steps": 2, "max_wait_ms": 20.0}
    # `_env_file=None`: a developer's .env must not change what the tests run.
    values.update(overrides)
    return Settings(**values, _env_file=None)


@pytest.fixture
def make_client(tiny_bundle, pipeline):
    """`with make_client(**settings) as client:` an app on the shared pipeline, started and stopped (drained)."""
    from server.app import create_app

    @contextmanager
    def factory(**overrides: Any) -> Iterator[TestClient]:
        app = create_app(server_settings(tiny_bundle, **overrides), pipeline)
        with TestClient(app) as client:
            yield client

    return factory


@pytest.fixture
def client(make_client) -> Iterator[TestClient]:
    with make_client() as client:
        yield client
