"""`aptp inspect`: the report on U-Net and expert folders, and clean failures on bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from aptp.cli.main import main
from aptp.formats.expert import EXPERT_NAME, save_expert
from pruning import ArchitectureSpace, slice_unet
from tests.helpers import REPO, TEXT_LEN, UNET_CONFIGS, load_unet_config, meta_unet, small_unet_config

SD15 = UNET_CONFIGS / "sd-1.5"
SD15_PARAMS = 859_520_964  # the published parameter count of SD 1.5's U-Net


def _inspect(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _inspect_json(capsys, *args: str) -> dict:
    code, out, err = _inspect(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out)  # exactly one JSON document on stdout


@pytest.fixture(scope="module")
def sd15_space() -> ArchitectureSpace:
    return ArchitectureSpace.from_unet(meta_unet(load_unet_config("sd-1.5")))


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory) -> Path:
    """A diffusers-style U-Net folder (config.json only) for the small config."""
    folder = tmp_path_factory.mktemp("small-unet")
    meta_unet(small_unet_config()).save_config(folder)
    return folder


@pytest.fixture(scope="module")
def expert(tmp_path_factory, small_unet, small_space):
    arch = small_space.random(0.5, 0)
    sliced = slice_unet(small_unet, small_space, arch)
    folder = save_expert(sliced, small_space, arch, tmp_path_factory.mktemp("expert") / "expert")
    return folder, arch, sliced


# -------------------------------------------------------------------------------------------------- U-Net folders
def test_json_report_on_sd15(capsys, sd15_space):
    report = _inspect_json(capsys, SD15)
    assert {"params", "total_macs", "prunable_macs", "units"} <= report.keys()
    assert report["kind"] == "unet"
    assert report["resolution"] == [64, 64] and report["text_len"] == 77
    assert report["params"] == SD15_PARAMS
    assert report["total_macs"] == sd15_space.total_macs(64)
    assert report["prunable_macs"] == sd15_space.prunable_macs(64)
    assert 0 < report["prunable_macs"] < report["total_macs"]
    assert report["architecture_dim"] == sd15_space.dim
    assert isinstance(report["units"], list)
    assert [u["name"] for u in report["units"]] == [u.name for u in sd15_space]
    assert all(u["kept"] == u["gates"] for u in report["units"])  # a full model keeps everything


def test_text_report(capsys):
    code, out, err = _inspect(capsys, SD15)
    assert code == 0, err
    assert "total MACs" in out and "prunable MACs" in out
    assert f"{SD15_PARAMS:,}" in out
    for block in ("down_blocks.0", "mid_block", "up_blocks.3"):
        assert block in out
    assert "expert MACs" not in out


def test_resolution_and_text_len_options(capsys, sd15_space):
    default = _inspect_json(capsys, SD15)
    small = _inspect_json(capsys, SD15, "--resolution", "32", "--text-len", "5")
    assert small["resolution"] == [32, 32] and small["text_len"] == 5
    assert small["total_macs"] < default["total_macs"]
    space = ArchitectureSpace.from_dict({**sd15_space.to_dict(), "text_len": 5})
    assert small["total_macs"] == space.total_macs(32)


def test_accepts_config_file_and_pipeline_layout(capsys, tmp_path, small_folder):
    pipeline = tmp_path / "pipeline"
    (pipeline / "unet").mkdir(parents=True)
    shutil.copy(small_folder / "config.json", pipeline / "unet" / "config.json")
    reports = [_inspect_json(capsys, p) for p in (small_folder, small_folder / "config.json", pipeline)]
    assert reports[0]["total_macs"] == reports[1]["total_macs"] == reports[2]["total_macs"] > 0


def test_verify_on_small_config(capsys, small_folder, small_space):
    report = _inspect_json(capsys, small_folder, "--verify", "--text-len", TEXT_LEN)
    assert report["total_macs"] == small_space.total_macs(16)
    assert report["flop_counter_rel_error"] < 0.01
    assert report["flop_counter_macs"] > 0
    code, out, _ = _inspect(capsys, small_folder, "--verify")
    assert code == 0 and "FlopCounterMode" in out


# ------------------------------------------------------------------------------------------------- expert folders
def test_expert_report(capsys, expert, small_space):
    folder, arch, sliced = expert
    report = _inspect_json(capsys, folder)
    assert report["kind"] == "expert"
    assert report["text_len"] == TEXT_LEN
    assert report["expert_macs"] == small_space.macs(arch)
    assert report["expert_macs"] < report["total_macs"] == small_space.total_macs()
    assert report["mac_ratio"] == pytest.approx(report["expert_macs"] / report["total_macs"])
    assert report["params"] == sum(p.numel() for p in sliced.parameters())
    kept = {u["name"]: u["kept"] for u in report["units"]}
    assert kept == {u.name: int(small_space.gates_of(arch, u.name).sum()) for u in small_space}
    code, out, _ = _inspect(capsys, folder)
    assert code == 0 and "expert MACs" in out


def test_expert_verify(capsys, expert):
    folder, _, _ = expert
    report = _inspect_json(capsys, folder, "--verify")
    assert report["flop_counter_rel_error"] < 0.01


# ----------------------------------------------------------------------------------------------------- bad input
def _assert_clean_error(capsys, path, *extra, mentions=()):
    code, out, err = _inspect(capsys, path, *extra)
    assert code == 2
    assert out == ""
    assert err.startswith("aptp inspect: error:")
    assert str(path) in err
    for text in mentions:
        assert text in err
    assert "Traceback" not in err


def test_nonexistent_path(capsys, tmp_path):
    _assert_clean_error(capsys, tmp_path / "nowhere")


def test_folder_without_config(capsys, tmp_path):
    _assert_clean_error(capsys, tmp_path, mentions=("config.json",))


def test_config_that_is_not_json(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{ this is not json")
    _assert_clean_error(capsys, tmp_path / "config.json", "--json", mentions=("JSON",))


def test_config_of_another_class(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "in_channels": 3}))
    _assert_clean_error(capsys, tmp_path / "config.json", mentions=("AutoencoderKL",))


def test_config_that_cannot_build(capsys, tmp_path):
    config = {**small_unet_config(), "block_out_channels": [32, 64]}  # 3 block types, 2 widths
    (tmp_path / "config.json").write_text(json.dumps(config))
    _assert_clean_error(capsys, tmp_path / "config.json")


def test_broken_expert_folder(capsys, tmp_path, expert):
    folder = Path(shutil.copytree(expert[0], tmp_path / "expert"))
    (folder / EXPERT_NAME).write_text("[]")
    _assert_clean_error(capsys, folder / EXPERT_NAME)


@pytest.mark.parametrize("option", [["--resolution", "0"], ["--resolution", "-8"], ["--text-len", "many"]])
def test_bad_option_values_are_argparse_errors(capsys, option):
    with pytest.raises(SystemExit) as excinfo:
        main(["inspect", str(SD15), *option])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert option[0] in err and "positive integer" in err


def test_missing_subcommand_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2


# -------------------------------------------------------------------------------------------------- console script
def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("aptp") == "aptp.cli.main:main"


def _aptp_executable() -> str | None:
    candidate = Path(sys.executable).parent / "aptp"
    return str(candidate) if candidate.is_file() else shutil.which("aptp")


@pytest.mark.slow  # a fresh interpreter imports torch and diffusers: about 5-6 s
def test_console_script_inspect_sd21():
    executable = _aptp_executable()
    if executable is None:
        pytest.skip("the aptp console script is not installed")
    result = subprocess.run(
        [executable, "inspect", "configs/unets/sd-2.1", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kind"] == "unet"
    assert report["resolution"] == [96, 96]
    space = ArchitectureSpace.from_unet(meta_unet(load_unet_config("sd-2.1")))
    assert report["total_macs"] == space.total_macs(96)
    assert report["params"] == sum(p.numel() for p in meta_unet(load_unet_config("sd-2.1")).parameters())
    assert torch.tensor([u["gates"] for u in report["units"]]).sum().item() == space.dim


def test_a_pipeline_folder_reports_the_decoder_and_text_encoder_beside_the_unet(tiny_sd, capsys):
    from aptp.formats.describe import describe
    from aptp.pipeline import RoutedPipeline

    report = describe(tiny_sd)
    loaded = RoutedPipeline.from_pretrained(tiny_sd)
    assert report["kind"] == "pipeline" and report["text_len"] == 16  # the tokenizer's max length
    assert report["resolution"] == [8, 8] and report["pixel_resolution"] == [32, 32]
    assert report["total_macs"] == loaded.teacher_macs
    assert report["vae_decoder_macs_per_image"] == loaded.decoder_macs_per_image
    assert report["text_encoder_macs_per_prompt"] == loaded.text_encoder_macs_per_prompt
    assert main(["inspect", str(tiny_sd)]) == 0
    out = capsys.readouterr().out
    assert "VAE decoder MACs" in out and "per image (32x32 pixels)" in out and "text encoder MACs" in out
