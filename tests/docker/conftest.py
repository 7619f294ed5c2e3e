from __future__ import annotations

import pytest

from tests.docker.dashboard import load_dashboard


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return load_dashboard()
