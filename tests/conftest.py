"""Shared fixtures for the test suite (the helpers they build on are in `tests/helpers.py`).

The session-scoped model fixtures are shared by many tests: treat them as read-only (gate them with hooks that are
removed again, or `slice_unet` them, which copies). A test that must change a model builds its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from pruning import ArchitectureSpace
from tests.helpers import (
    ENCODER_MAX_LENGTH,
    TEXT_LEN,
    build_unet,
    save_tiny_teacher,
    sd15_like_config,
    sd21_like_config,
    small_unet_config,
)

# The test models are tiny: intra-op threads buy nothing, and on a busy 2-core machine two OpenMP threads waiting on
# each other turn a 20 ms forward into 2 s. One thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _autograd_left_as_found():
    """Fails the test that leaves autograd switched off (as a `main()` calling `torch.set_grad_enabled(False)`
    would), instead of every later test that trains."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("the test left autograd disabled (torch.set_grad_enabled(False) outside a context manager)")


@pytest.fixture(scope="session")
def small_unet() -> UNet2DConditionModel:
    return build_unet(small_unet_config())


@pytest.fixture(scope="session")
def small_space(small_unet) -> ArchitectureSpace:
    return ArchitectureSpace.from_unet(small_unet, text_len=TEXT_LEN)


@pytest.fixture(scope="session")
def sd15_unet() -> UNet2DConditionModel:
    return build_unet(sd15_like_config())


@pytest.fixture(scope="session")
def sd15_space(sd15_unet) -> ArchitectureSpace:
    return ArchitectureSpace.from_unet(sd15_unet, text_len=TEXT_LEN)


@pytest.fixture(scope="session")
def sd21_unet() -> UNet2DConditionModel:
    return build_unet(sd21_like_config())


@pytest.fixture(scope="session")
def sd21_space(sd21_unet) -> ArchitectureSpace:
    return ArchitectureSpace.from_unet(sd21_unet, text_len=TEXT_LEN)


@pytest.fixture(scope="session")
def prompt_encoder():
    """all-MiniLM-L6-v2 with the teacher's 40-token length, loaded once per session (~1-3 s). Read-only."""
    from aptp.conditioning.encoder import EncoderConfig, PromptEncoder

    return PromptEncoder(EncoderConfig(max_length=ENCODER_MAX_LENGTH))


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    """A saved tiny teacher folder (random weights), one per test module."""
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "teacher")


@pytest.fixture(scope="module")
def teacher(teacher_folder):
    """The tiny teacher loaded back: (unet, spec, its architecture space)."""
    from aptp.formats.teacher import load_teacher

    unet, spec = load_teacher(teacher_folder)
    return unet, spec, ArchitectureSpace.from_unet(unet, text_len=ENCODER_MAX_LENGTH)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random-weight Stable Diffusion pipeline folder saved by diffusers (epsilon prediction). Read-only."""
    from scripts.tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture(scope="session")
def tiny_captions(tmp_path_factory) -> Path:
    """A tiny image-caption folder (12 random images with captions). Read-only."""
    from scripts.tiny_sd import build_tiny_captions

    return build_tiny_captions(tmp_path_factory.mktemp("captions") / "data")


# ---------------------------------------------------------------------------------------- dashboard and Prometheus
@pytest.fixture(scope="module")
def dashboard() -> dict:
    """The Grafana dashboard (docker/grafana/dashboards/aptp.json)."""
    from tests.docker.dashboard import load_dashboard

    return load_dashboard()


@pytest.fixture()
def prometheus_binary() -> str:
    """The `prometheus` binary; the test is skipped without it."""
    import shutil

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("needs the prometheus binary (Debian: apt-get install prometheus)")
    return binary
