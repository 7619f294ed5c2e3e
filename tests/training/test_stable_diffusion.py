"""APTP on a user's own Stable Diffusion folder and image-caption data: search, fine-tuning and the baseline run in
latent space with the pipeline's CLIP conditioning, resume exactly, and export bundles that carry the pipeline's
VAE and text encoder and serve over HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import training.data.captions as captions_module
from aptp.formats.bundle import read_manifest
from aptp.pipeline import RoutedPipeline
from router.model import Router
from tests.helpers import search_settings
from tests.server.conftest import server_settings
from tests.server.test_api import decode_png
from training.baseline import BaselineConfig, run_baseline
from training.finetune import FinetuneConfig, run_finetune
from training.search import SearchConfig, run_search


class Killed(Exception):
    pass


def _search_config(tiny_sd, tiny_captions, out, **overrides) -> SearchConfig:
    return SearchConfig.model_validate(search_settings(tiny_sd, tiny_captions, out, **overrides))


def _finetune_config(tiny_sd, router, tiny_captions, tmp_path, **overrides) -> FinetuneConfig:
    data = {
        "teacher": str(tiny_sd),
        "router": str(router),
        "data": {"folder": str(tiny_captions)},
        "out": str(tmp_path / "run"),
        "export": str(tmp_path / "bundle"),
        "routing_prompts": 12,
        "expert": {"steps": 2, "batch_size": 2, "warmup_steps": 1},
        "log_every": 1,
        "export_dtype": "float32",
        **overrides,
    }
    return FinetuneConfig.model_validate(data)


@pytest.fixture(scope="module")
def searched(tiny_sd, tiny_captions, tmp_path_factory):
    return run_search(_search_config(tiny_sd, tiny_captions, tmp_path_factory.mktemp("search") / "run"))


def test_search_prunes_the_pipelines_unet_in_latent_space(searched, tiny_sd):
    router = Router.load(searched)
    reference = RoutedPipeline.from_pretrained(tiny_sd)
    assert router.resolution == 8 and router.space.text_len == 16  # latent size, CLIP's key length
    assert router.space.total_macs(8) == reference.teacher_macs
    assert router.config.encoder.name == "all-MiniLM-L6-v2" and router.config.embed_dim == 384  # routes on MiniLM
    assert len(router.route(["a red bicycle", "a tree in the snow"]).codes) == 2


def test_search_resumes_exactly_after_a_kill(tiny_sd, tiny_captions, searched, tmp_path, monkeypatch):
    class DyingFolder(captions_module.CaptionFolder):
        def take(self, positions):
            if positions[0] == 2 * 4:
                raise Killed("killed at step 2")
            return super().take(positions)

    config = _search_config(tiny_sd, tiny_captions, tmp_path / "killed", checkpoint_minutes=1e-9)
    healthy = captions_module.CaptionFolder
    monkeypatch.setattr(captions_module, "CaptionFolder", DyingFolder)
    with pytest.raises(Killed):
        run_search(config)
    monkeypatch.setattr(captions_module, "CaptionFolder", healthy)
    resumed, straight = Router.load(run_search(config)), Router.load(searched)
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


def test_finetune_exports_a_bundle_that_carries_the_pipeline_and_serves(searched, tiny_sd, tiny_captions, tmp_path):
    config = _finetune_config(tiny_sd, searched, tiny_captions, tmp_path)
    bundle = run_finetune(config)
    manifest = read_manifest(bundle)
    assert manifest.latent is not None and manifest.latent.source == str(tiny_sd) and manifest.num_codes == 2
    assert sum(c.training_share for c in manifest.codes) == pytest.approx(1.0)
    pipeline = RoutedPipeline.from_pretrained(bundle)
    from server.app import create_app

    with TestClient(create_app(server_settings(bundle), pipeline)) as client:
        routed = client.post("/route", json={"prompts": ["a red bicycle", "a house at night"]})
        assert routed.status_code == 200 and len(routed.json()["routes"]) == 2
        response = client.post("/generate", json={"prompt": "a red bicycle", "seed": 1, "steps": 2})
        assert response.status_code == 200, response.text
        image = decode_png(response.json()["images"][0]["b64_png"])
    assert image.shape == (32, 32, 3) and np.ptp(image) > 0  # decoded pixels, not a latent


def test_baseline_prunes_the_pipeline_statically_and_exports_it(tiny_sd, tiny_captions, tmp_path):
    config = BaselineConfig.model_validate(
        {
            "teacher": str(tiny_sd),
            "data": {"folder": str(tiny_captions)},
            "out": str(tmp_path / "run"),
            "export": str(tmp_path / "bundle"),
            "budget": 0.6,
            "training_prompts": 12,
            "expert": {"steps": 2, "batch_size": 2, "warmup_steps": 1},
            "export_dtype": "float32",
        }
    )
    manifest = read_manifest(run_baseline(config))
    assert manifest.latent is not None and manifest.num_codes == 1
    assert manifest.codes[0].macs <= 0.6 * manifest.teacher_macs
    out = RoutedPipeline.from_pretrained(tmp_path / "bundle")("a red bicycle", seed=0, num_inference_steps=2)
    assert out.images[0].size == (32, 32)


def test_the_readme_worked_example_runs_from_its_configs(tiny_sd, tiny_captions, tmp_path, capsys):
    """search -> finetune -> export -> serve -> image with configs/tiny-sd/*.yaml, as the README runs them."""
    from aptp.cli.main import main
    from tests.helpers import REPO

    configs, data = REPO / "configs" / "tiny-sd", f"data.folder={tiny_captions}"
    router = tmp_path / "search"
    search = ["train", "search", "--config", str(configs / "search.yaml"), "--teacher", str(tiny_sd)]
    assert main([*search, "--out", str(router), "--set", data]) == 0
    finetune = ["train", "finetune", "--config", str(configs / "finetune.yaml"), "--teacher", str(tiny_sd)]
    bundle = tmp_path / "bundle"
    paths = ["--router", str(router / "router"), "--out", str(tmp_path / "finetune"), "--export", str(bundle)]
    assert main([*finetune, *paths, "--set", data]) == 0
    from server.app import create_app

    with TestClient(create_app(server_settings(bundle), RoutedPipeline.from_pretrained(bundle))) as client:
        response = client.post("/v1/images/generations", json={"prompt": "a red bicycle", "size": "32x32"})
    assert response.status_code == 200, response.text
    assert decode_png(response.json()["data"][0]["b64_json"]).shape == (32, 32, 3)


def test_mixed_precision_and_gradient_checkpointing_run_and_stay_close(tiny_sd, tiny_captions, searched, tmp_path):
    config = _search_config(tiny_sd, tiny_captions, tmp_path / "run", gradient_checkpointing=True)
    checkpointed = Router.load(run_search(config))
    # Recomputing the gated forward in backward gives the gradients of the plain run (gates held through backward).
    for name, tensor in Router.load(searched).state_dict().items():
        torch.testing.assert_close(checkpointed.state_dict()[name], tensor, rtol=0, atol=1e-5, msg=name)
    for precision in ("bf16", "fp16"):
        config = _search_config(tiny_sd, tiny_captions, tmp_path / precision, mixed_precision=precision)
        router = Router.load(run_search(config))
        assert all(torch.isfinite(t).all() for t in router.state_dict().values())
    # fp16's loss scale is part of the checkpoint, so a resumed run scales as the straight one would.
    state = json.loads((tmp_path / "fp16" / "checkpoint" / "state.json").read_text())
    assert state["state"]["grad_scaler"]["scale"] > 0


@pytest.mark.parametrize(
    "teacher_dtype, precision", [("bfloat16", "no"), ("float32", "fp16")], ids=["bf16-teacher", "fp16-autocast"]
)
def test_students_train_in_float32_beside_a_half_teacher_or_under_fp16(
    searched, tiny_sd, tiny_captions, tmp_path, teacher_dtype, precision
):
    config = _finetune_config(
        tiny_sd, searched, tiny_captions, tmp_path, teacher_dtype=teacher_dtype, mixed_precision=precision
    )
    pipeline = RoutedPipeline.from_pretrained(run_finetune(config))
    assert {next(expert.parameters()).dtype for expert in pipeline.experts} == {torch.float32}
    logs = [json.loads(line) for log in (tmp_path / "run").glob("log-*.jsonl") for line in log.read_text().splitlines()]
    assert logs and all(np.isfinite(record["loss"]) for record in logs)


def test_a_latent_cache_is_built_once_and_trains_as_the_images_do(tiny_sd, tiny_captions, searched, tmp_path):
    from training.data.latents import INDEX

    cache = tmp_path / "latents"
    data = {"folder": str(tiny_captions), "latent_cache": str(cache)}
    cached = Router.load(run_search(_search_config(tiny_sd, tiny_captions, tmp_path / "cached", data=data)))
    index = json.loads((cache / INDEX).read_text())
    assert index["entries"] == 12 and index["resolution"] == 32 and (cache / index["shards"][0]).is_file()
    # The posterior is cached, not a draw: the run draws the same latents as the uncached one.
    for name, tensor in Router.load(searched).state_dict().items():
        torch.testing.assert_close(cached.state_dict()[name], tensor, rtol=0, atol=1e-5, msg=name)
    built = (cache / index["shards"][0]).stat().st_mtime_ns
    run_search(_search_config(tiny_sd, tiny_captions, tmp_path / "again", data=data))
    assert (cache / index["shards"][0]).stat().st_mtime_ns == built  # reused, not rebuilt
    with pytest.raises(ValueError, match="center_crop: true and random_flip: false"):
        run_search(_search_config(tiny_sd, tiny_captions, tmp_path / "flip", data={**data, "random_flip": True}))


def test_gradient_accumulation_trains_what_one_pass_does(tiny_sd, tiny_captions, searched, tmp_path):
    accumulated = run_search(_search_config(tiny_sd, tiny_captions, tmp_path / "search", gradient_accumulation_steps=2))
    for name, tensor in Router.load(searched).state_dict().items():
        torch.testing.assert_close(Router.load(accumulated).state_dict()[name], tensor, rtol=0, atol=1e-5, msg=name)
    experts = []
    for accumulation in (1, 2):
        settings = {"gradient_accumulation_steps": accumulation, "expert": {"steps": 2, "batch_size": 4}}
        config = _finetune_config(tiny_sd, searched, tiny_captions, tmp_path / str(accumulation), **settings)
        experts.append(RoutedPipeline.from_pretrained(run_finetune(config)).experts)
    for one, two in zip(*experts, strict=True):
        for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="gradient_accumulation_steps: 3 does not divide"):
        run_search(_search_config(tiny_sd, tiny_captions, tmp_path / "odd", gradient_accumulation_steps=3))
