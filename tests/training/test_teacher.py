"""`aptp train teacher`: a tiny run writes its log, checkpoint and a loadable teacher folder, resumes exactly after
being killed, weights the loss by min-SNR-gamma, and rejects bad configs with messages naming file and field."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler
from pydantic import ValidationError

import training.teacher as teacher_module
from aptp.cli.main import main
from aptp.conditioning.adapter import TextAdapter
from aptp.formats.teacher import load_teacher, load_text_adapter
from aptp.sampling import SamplingConfig
from tests.helpers import ENCODER_MAX_LENGTH, TINY_TEACHER_UNET, shared_encoder_factory, tiny_teacher_config
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.layout import LAYOUT_READS
from training.noise import min_snr_weight
from training.teacher import train_teacher


@pytest.fixture(autouse=True)
def shared_encoder(monkeypatch, prompt_encoder):
    monkeypatch.setattr(teacher_module, "PromptEncoder", shared_encoder_factory(prompt_encoder))


class Killed(Exception):
    """Stands in for SIGKILL: raised from inside the training loop."""


def _kill_at_step(monkeypatch, step: int, batch_size: int) -> None:
    """Make the run die when it fetches the data of `step` (after the previous steps completed)."""

    class DyingDomain(teacher_module.ShapesDomain):
        def batch(self, start, count):
            if start == step * batch_size:
                raise Killed(f"killed at step {step}")
            return super().batch(start, count)

    monkeypatch.setattr(teacher_module, "ShapesDomain", DyingDomain)


def _train(config, init_seed: int = 0):
    """`train_teacher` with the global RNG seeded first: the U-Net's initial weights are drawn from it (see
    `test_same_config_gives_the_same_teacher`)."""
    torch.manual_seed(init_seed)
    return train_teacher(config)


def _weights(folder) -> dict[str, torch.Tensor]:
    unet, _ = load_teacher(folder)
    return unet.state_dict()


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, f"max abs difference {worst:.3e}"


# ------------------------------------------------------------------------------------------------------ a tiny run
def test_tiny_run_writes_log_checkpoint_and_a_loadable_teacher(tmp_path):
    config = tiny_teacher_config(tmp_path, checkpoint_minutes=1e-9)
    export = _train(config)
    run = tmp_path / "run"

    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert all(math.isfinite(r["grad_norm"]) for r in records)

    checkpoint = latest_checkpoint(run)
    assert checkpoint == run / "checkpoint"
    assert json.loads((run / "config.json").read_text())["optim"]["steps"] == 2

    assert export == tmp_path / "teacher"
    unet, spec = load_teacher(export)
    assert list(unet.config.block_out_channels) == TINY_TEACHER_UNET["block_out_channels"]
    assert unet.config.cross_attention_dim == 384  # all-MiniLM-L6-v2's width
    assert unet.config.sample_size == 32
    assert spec.resolution == 32
    expected_encoder = {"name": "all-MiniLM-L6-v2", "max_length": ENCODER_MAX_LENGTH, "layers": [-1]}
    assert spec.text_encoder.model_dump() == expected_encoder
    assert spec.scheduler_config["prediction_type"] == "v_prediction"
    assert spec.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert spec.sampling == SamplingConfig(steps=2, guidance_scale=4.0)
    assert spec.training["steps"] == 2 and spec.training["batch_size"] == 4

    # the export holds the EMA weights saved in the checkpoint, not the raw ones
    shadow = {k: torch.empty_like(v) for k, v in unet.named_parameters()}
    raw = teacher_module.build_unet(config, 384)
    state = load_checkpoint(checkpoint, {"unet": raw, "ema": shadow}, None)
    assert state["step"] == 2
    for name, param in unet.named_parameters():
        # stored in half precision (export_dtype float16), loaded back as float32
        assert torch.equal(param, shadow[name].half().float()), name
    assert any(not torch.equal(p, raw.get_parameter(n)) for n, p in unet.named_parameters())


def test_training_changes_the_weights(tmp_path):
    """The export of 2 steps differs from that of 1 step (the loop really optimises; EMA warm-up is fast)."""
    one = _train(tiny_teacher_config(tmp_path / "one", optim={"steps": 1}))
    two = _train(tiny_teacher_config(tmp_path / "two", optim={"steps": 2}))
    a, b = _weights(one), _weights(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-5


# ------------------------------------------------------------------------------------------------------ resumption
def test_run_killed_mid_way_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The "resumes after being killed" guarantee: data, noise and timesteps are functions of the step."""
    straight = _train(tiny_teacher_config(tmp_path / "a", optim={"steps": 4}))

    config = tiny_teacher_config(tmp_path / "b", optim={"steps": 4}, checkpoint_minutes=1e-9)
    with monkeypatch.context() as patch:
        _kill_at_step(patch, 2, batch_size=4)
        with pytest.raises(Killed):
            _train(config)
    assert not (tmp_path / "b" / "teacher").exists()
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoint", {}, None)["step"] == 2
    resumed = _train(config, init_seed=1)  # a resumed run takes its weights from the checkpoint
    _assert_same_weights(_weights(resumed), _weights(straight))
    logged = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3]


def test_extending_a_finished_run_resumes_from_its_checkpoint(tmp_path):
    """A 2-step run re-run with steps=4 on the same folder continues (its learning rates match a straight 4-step run
    because all 4 steps are in the warm-up, whose rates do not depend on the total)."""
    optim = {"warmup_steps": 10}
    straight = _train(tiny_teacher_config(tmp_path / "a", optim={**optim, "steps": 4}))
    _train(tiny_teacher_config(tmp_path / "b", optim={**optim, "steps": 2}))
    resumed = _train(tiny_teacher_config(tmp_path / "b", optim={**optim, "steps": 4}), init_seed=1)
    _assert_same_weights(_weights(resumed), _weights(straight))
    fresh = _train(tiny_teacher_config(tmp_path / "c", optim={**optim, "steps": 2}))
    a, b = _weights(resumed), _weights(fresh)
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-5  # the 2 extra steps did train


LAYOUT = {
    "passthrough": True,
    "layout_weight": 0.1,
    "pretrain_steps": 3,
    "pretrain_captions": 16,
    "pretrain_batch_size": 4,
}


SUMMARY = LAYOUT | {"summary_tokens": LAYOUT_READS}
PROMPT_MAP = SUMMARY | {"map_grid": 3, "map_channels": 4}


@pytest.mark.parametrize("extra", [{}, LAYOUT, SUMMARY, PROMPT_MAP], ids=["plain", "layout", "summary", "prompt-map"])
def test_a_teacher_with_a_text_adapter_trains_it_exports_it_and_resumes(tmp_path, monkeypatch, extra):
    """The adapter is trained with the U-Net (its EMA exported beside it, the U-Net reading its output), with the
    layout read-out's loss logged when it has one, and a run killed mid-way resumes to the same adapter and U-Net
    (and read-out)."""
    shape = {"width": 16, "layers": 1, "heads": 4}
    adapter = shape | extra
    map_channels = extra.get("map_channels", 0)
    unet_settings = {**TINY_TEACHER_UNET, "sample_size": 32, "in_channels": 5 + map_channels}
    config = tiny_teacher_config(tmp_path / "a", optim={"steps": 3}, text_adapter=adapter, unet=unet_settings)
    straight = _train(config)
    unet, spec = load_teacher(straight)
    passthrough = extra.get("passthrough", False)
    assert unet.config.cross_attention_dim == 16 + (384 if passthrough else 0)
    assert unet.config.in_channels == 3 + 2 + map_channels
    summary = extra.get("summary_tokens", 0)
    assert spec.text_adapter.model_dump() == {
        "token_dim": 384,
        **shape,
        "passthrough": passthrough,
        "summary_tokens": summary,
        "map_grid": extra.get("map_grid", 0),
        "map_channels": map_channels,
    }
    assert spec.context_length == spec.text_encoder.max_length + summary
    records = [json.loads(line) for line in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [0, 1, 2]
    if "layout_weight" in extra:
        assert [r["pretrain_step"] for r in records if "pretrain_step" in r] == [0, 2]  # every 100 and the last
        assert [r["pretrained"] for r in records if "pretrained" in r] == [3]
        assert all(math.isfinite(r["layout"]) and r["layout"] > 0 for r in steps)
        assert all(0 <= value <= 1 for r in steps for value in r["layout_accuracy"].values())
    else:
        assert not any("layout" in r for r in records)
    trained = load_text_adapter(straight)
    torch.manual_seed(config.seed)  # the run draws the adapter's initial weights first
    initial = TextAdapter(spec.text_adapter)
    pairs = zip(trained.parameters(), initial.parameters(), strict=True)
    assert any(not torch.equal(p, q.half().float()) for p, q in pairs)  # stored in half precision

    killed = tiny_teacher_config(
        tmp_path / "b", optim={"steps": 3}, text_adapter=adapter, unet=unet_settings, checkpoint_minutes=1e-9
    )
    with monkeypatch.context() as patch:
        _kill_at_step(patch, 2, batch_size=4)
        with pytest.raises(Killed):
            _train(killed)
    resumed = _train(killed, init_seed=1)
    _assert_same_weights(_weights(resumed), _weights(straight))
    _assert_same_weights(load_text_adapter(resumed).state_dict(), trained.state_dict())


def test_summary_tokens_the_layout_read_cannot_use_are_refused(tmp_path):
    with pytest.raises(ValidationError, match=f"summary_tokens: .* must be {LAYOUT_READS}"):
        tiny_teacher_config(tmp_path, text_adapter={"width": 16, "summary_tokens": 4, **LAYOUT})


def test_a_prompt_map_the_unet_does_not_take_or_the_layout_read_cannot_make_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="unet.in_channels: 5 leaves 0 prompt-map channels .* makes 4"):
        tiny_teacher_config(tmp_path, text_adapter={"width": 16, **PROMPT_MAP})
    unet = {**TINY_TEACHER_UNET, "sample_size": 32, "in_channels": 9}
    with pytest.raises(ValidationError, match="map_grid: .* must be the domain's grid \\(9 cells\\), not 2x2"):
        tiny_teacher_config(tmp_path, text_adapter={"width": 16, **PROMPT_MAP, "map_grid": 2}, unet=unet)


def test_same_config_gives_the_same_teacher(tmp_path):
    """`seed` is the run's seed: the same config trains the same teacher whatever ran before in the process."""
    first = _train(tiny_teacher_config(tmp_path / "a", optim={"steps": 1}), init_seed=0)
    second = _train(tiny_teacher_config(tmp_path / "b", optim={"steps": 1}), init_seed=1)
    _assert_same_weights(_weights(first), _weights(second))


# ------------------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weight(gamma):
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    alphas = scheduler.alphas_cumprod
    timesteps = torch.tensor([0, 10, 100, 500, 900, 999])
    v = min_snr_weight(alphas, timesteps, gamma, "v_prediction")
    eps = min_snr_weight(alphas, timesteps, gamma, "epsilon")
    for i, t in enumerate(timesteps.tolist()):
        snr = alphas[t].item() / (1 - alphas[t].item())
        assert v[i].item() == pytest.approx(min(snr, gamma) / (snr + 1), rel=1e-4)
        assert eps[i].item() == pytest.approx(min(snr, gamma) / snr, rel=1e-4)
    # high-SNR (early) steps are down-weighted, low-SNR ones are not for epsilon
    assert eps[0] < 1 and eps[-1].item() == pytest.approx(1.0)
    assert torch.all(v <= 1)


# ------------------------------------------------------------------------------------------------------ the command
def _train_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["train", "teacher", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_missing_config_exits_2_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    code, err = _train_cli(capsys, "--config", missing)
    assert code == 2
    assert str(missing) in err and "not found" in err


@pytest.mark.parametrize(
    "text, field",
    [
        ("optim:\n  steps: -1\n", "optim.steps"),
        ("noise:\n  prediction_type: sample\n", "noise.prediction_type"),
        ("unet:\n  block_out_channels: wide\n", "unet.block_out_channels"),
        ("unet:\n  in_channels: 4\n", "unet"),
    ],
)
def test_cli_invalid_field_exits_2_naming_file_and_field(tmp_path, capsys, text, field):
    path = tmp_path / "teacher.yaml"
    path.write_text(text)
    code, err = _train_cli(capsys, "--config", path)
    assert code == 2
    assert str(path) in err and field in err
    assert not (tmp_path / "runs").exists()


def test_cli_invalid_yaml_exits_2(tmp_path, capsys):
    path = tmp_path / "teacher.yaml"
    path.write_text("optim: [unclosed\n")
    code, err = _train_cli(capsys, "--config", path)
    assert code == 2 and str(path) in err and "YAML" in err


def test_cli_trains_with_overrides(tmp_path, capsys):
    """`--out`, `--export` and `--steps` override the YAML; the run writes where it is told."""
    config = tiny_teacher_config(tmp_path, optim={"steps": 50})
    path = tmp_path / "teacher.yaml"
    path.write_text(json.dumps(config.model_dump()))  # JSON is YAML
    out, export = tmp_path / "elsewhere", tmp_path / "exported"
    code = main(["train", "teacher", "--config", str(path), "--out", str(out), "--export", str(export), "--steps", "1"])
    assert code == 0, capsys.readouterr().err
    _, spec = load_teacher(export)
    assert spec.training["steps"] == 1
    assert latest_checkpoint(out) is not None
    assert not (tmp_path / "run").exists()


def test_cli_set_overrides_any_field_and_rejects_bad_ones(tmp_path, capsys):
    config = tiny_teacher_config(tmp_path, optim={"steps": 1})
    path = tmp_path / "teacher.yaml"
    path.write_text(json.dumps(config.model_dump()))
    out = tmp_path / "set-run"
    args = ["train", "teacher", "--config", str(path), "--out", str(out), "--export", str(tmp_path / "exp")]
    code = main([*args, "--set", "optim.batch_size=2", "--set", "seed=5"])
    assert code == 0, capsys.readouterr().err
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["optim"]["batch_size"] == 2 and recorded["seed"] == 5
    assert main([*args, "--set", "no-equals-sign"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main([*args, "--set", "optim.colour=red"]) == 2
    assert "optim.colour" in capsys.readouterr().err
