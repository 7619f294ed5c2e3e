"""`aptp train finetune` on a tiny teacher: the routed pool is kept, each code's expert is fine-tuned on its own
prompts and logged, the bundle holds the router's architectures and training shares, and a rerun reuses finished
experts instead of training them again."""

from __future__ import annotations

import json

import pytest
import torch

import aptp.conditioning.conditioner as conditioner_module
import training.finetune as finetune_module
from aptp.formats.bundle import load_code_experts, read_manifest
from aptp.formats.expert import load_expert
from aptp.formats.teacher import load_teacher
from router.model import Router, RouterConfig
from tests.helpers import save_tiny_teacher, shared_encoder_factory
from tests.router.test_model import nested_architectures
from training.config import ConfigError
from training.data.shapes import ShapesDomain
from training.finetune import FinetuneConfig, run_finetune

POOL = 24
SEED = 2


@pytest.fixture(autouse=True)
def shared_encoder(monkeypatch, prompt_encoder):
    monkeypatch.setattr(conditioner_module, "PromptEncoder", shared_encoder_factory(prompt_encoder))


@pytest.fixture(scope="module")
def models(tmp_path_factory, prompt_encoder):
    """A tiny teacher and a two-code router (a large and a small code) balanced on the phase-2 pool."""
    root = tmp_path_factory.mktemp("finetune")
    teacher = save_tiny_teacher(root / "teacher")
    unet, spec = load_teacher(teacher)
    torch.manual_seed(0)
    space = finetune_module.ArchitectureSpace.from_unet(unet, text_len=prompt_encoder.config.max_length)
    router = Router(RouterConfig(num_codes=2, encoder=prompt_encoder.config), space, spec.resolution)
    router.codes.set_architectures(nested_architectures(space, keeps=(0.9, 0.4)))
    captions = [ShapesDomain(seed=SEED, split="train").sample(i).caption for i in range(POOL)]
    router.balance(prompt_encoder.encode(captions).pooled)
    return teacher, router.save(root / "router")


def _config(models, tmp_path, **overrides) -> FinetuneConfig:
    teacher, router = models
    data = {
        "teacher": str(teacher),
        "router": str(router),
        "out": str(tmp_path / "run"),
        "export": str(tmp_path / "bundle"),
        "seed": SEED,
        "routing_prompts": POOL,
        "expert": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
        "log_every": 1,
        "export_dtype": "float32",
        **overrides,
    }
    return FinetuneConfig.model_validate(data)


def test_finetune_trains_each_code_on_its_prompts_and_exports_the_bundle(models, tmp_path):
    bundle = run_finetune(_config(models, tmp_path))
    run = tmp_path / "run"
    codes = json.loads((run / "routing.json").read_text())["codes"]
    assert len(codes) == POOL and set(codes) == {0, 1}  # the balanced router uses both codes

    router = Router.load(models[1])
    manifest = read_manifest(bundle)
    assert [c.code for c in manifest.codes] == [0, 1]
    for entry, arch in zip(manifest.codes, router.code_architectures(), strict=True):
        assert torch.equal(entry.architecture_tensor(), arch)
        assert entry.training_share == pytest.approx(codes.count(entry.code) / POOL)
        log = [json.loads(line) for line in (run / f"log-{entry.code}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [0, 1]
    assert manifest.codes[0].macs > manifest.codes[1].macs
    assert manifest.info["stage"] == "aptp"

    # The exported experts are the fine-tuned ones, not fresh slices of the teacher.
    teacher, _ = load_teacher(models[0])
    sliced = finetune_module.slice_unet(teacher, router.space, router.code_architectures()[0])
    exported = load_code_experts(bundle, manifest)[0]
    tuned, fresh = exported.state_dict(), sliced.state_dict()
    assert tuned.keys() == fresh.keys()
    assert any(not torch.equal(tuned[k], fresh[k]) for k in tuned)


def test_a_rerun_reuses_finished_experts(models, tmp_path):
    config = _config(models, tmp_path)
    run_finetune(config)
    first = load_expert(tmp_path / "run" / "experts" / "1")[0].state_dict()
    logs = {p.name: p.read_text() for p in (tmp_path / "run").glob("log-*.jsonl")}
    run_finetune(config)
    again = load_expert(tmp_path / "run" / "experts" / "1")[0].state_dict()
    assert all(torch.equal(again[k], v) for k, v in first.items())
    assert {p.name: p.read_text() for p in (tmp_path / "run").glob("log-*.jsonl")} == logs
    read_manifest(config.export)


def test_cosine_schedule_warms_up_then_decays_towards_zero():
    training = finetune_module.ExpertTraining(steps=100, lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    rates = [finetune_module.expert_lr(training, step) for step in range(training.steps)]
    assert rates[0] == pytest.approx(1e-4)
    assert rates[9] == pytest.approx(1e-3)  # warm-up reaches the peak
    assert rates[10] == pytest.approx(1e-3)  # the cosine starts at the peak
    assert all(a >= b for a, b in zip(rates[10:], rates[11:], strict=False))
    assert 0 < rates[-1] < 1e-5  # the last update is tiny but still an update
    assert rates[55] == pytest.approx(5e-4, rel=0.05)  # half-way down at the middle of the decay


def test_constant_schedule_holds_the_rate_after_warm_up():
    training = finetune_module.ExpertTraining(steps=100, lr=1e-3, warmup_steps=10)
    assert training.lr_schedule == "constant"
    assert [finetune_module.expert_lr(training, s) for s in (9, 50, 99)] == pytest.approx([1e-3] * 3)


def test_an_unknown_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="lr_schedule"):
        finetune_module.ExpertTraining(lr_schedule="linear")


def test_the_shared_stage_trains_every_code_inside_one_copy_and_the_experts_are_cut_from_it(models, tmp_path):
    config = _config(models, tmp_path, shared_steps=3, expert={"steps": 0, "batch_size": 4, "warmup_steps": 1})
    bundle = run_finetune(config)
    run = tmp_path / "run"
    assert [json.loads(line)["step"] for line in (run / "log-shared.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert not list(run.glob("log-[0-9]*.jsonl"))  # no per-code steps were asked for
    manifest = read_manifest(bundle)
    assert manifest.info["shared_steps"] == 3 and manifest.info["total_steps"] == 3

    router = Router.load(models[1])
    teacher, _ = load_teacher(models[0])
    shared = load_expert(run / "shared")[0]
    for arch, exported in zip(router.code_architectures(), load_code_experts(bundle, manifest), strict=True):
        expected = finetune_module.slice_unet(shared, router.space, arch).state_dict()
        assert all(torch.equal(exported.state_dict()[k], v) for k, v in expected.items())

    # Each sample ran as its own code's sub-network: a ResNet group that no code keeps never received a gradient.
    kept_by_any = router.code_architectures().amax(dim=0)
    unit = next(
        u
        for u in router.space.width_units
        if u.kind.value == "resnet" and not kept_by_any[router.space.slices[u.name]].all()
    )
    dropped = (kept_by_any[router.space.slices[unit.name]] == 0).repeat_interleave(unit.channels_per_gate)
    tuned, original = shared.get_submodule(unit.module).conv1.weight, teacher.get_submodule(unit.module).conv1.weight
    assert torch.equal(tuned[dropped], original[dropped])
    assert not torch.equal(tuned, original)


def test_total_steps_count_the_shared_stage_and_every_code():
    config = FinetuneConfig.model_validate({"out": "x", "shared_steps": 1800, "expert": {"steps": 150}})
    assert config.total_steps(num_codes=4) == 2400


def test_a_run_started_before_a_new_setting_existed_resumes(models, tmp_path):
    config = _config(models, tmp_path, checkpoint_minutes=1e-9)
    run_finetune(config)
    saved = tmp_path / "run" / "config.json"
    written = json.loads(saved.read_text())
    del written["shared_steps"]  # as written before the field (default 0) was added
    saved.write_text(json.dumps(written))
    (tmp_path / "run" / "experts" / "1" / "expert.json").unlink()  # code 1 unfinished: its checkpoint is resumed
    run_finetune(config)
    assert load_expert(tmp_path / "run" / "experts" / "1")[1].params > 0


def test_a_folder_holding_another_parts_checkpoint_refuses_other_settings(models, tmp_path):
    run_finetune(_config(models, tmp_path, checkpoint_minutes=1e-9))
    written = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ConfigError, match="shared_steps"):  # would start the shared part, which has no checkpoint yet
        run_finetune(_config(models, tmp_path, shared_steps=2))
    assert (tmp_path / "run" / "config.json").read_text() == written
