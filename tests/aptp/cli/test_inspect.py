"""`aptp inspect`: the report on U-Net, expert and bundle folders, and clean failures on bad input."""

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
from tests.helpers import (
    ENCODER_MAX_LENGTH,
    REPO,
    TEXT_LEN,
    UNET_CONFIGS,
    load_unet_config,
    meta_unet,
    small_unet_config,
)

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


# ------------------------------------------------------------------------------------------------- bundle folders
@pytest.fixture(scope="module")
def bundle(tmp_path_factory, teacher_folder) -> Path:
    from training.export import random_bundle

    return random_bundle(
        teacher_folder, tmp_path_factory.mktemp("bundle") / "bundle", keeps=[1.0, 0.6, 0.3], num_codes=3
    )


@pytest.fixture(scope="module")
def bundle_report(bundle) -> dict:
    from aptp.cli.inspect import inspect_report

    return inspect_report(bundle)


def test_bundle_report_lists_every_code_with_the_manifest_and_pipeline_macs(capsys, bundle, bundle_report):
    from aptp.formats.bundle import read_manifest
    from aptp.pipeline import RoutedPipeline

    manifest = read_manifest(bundle)
    loaded = RoutedPipeline.load(bundle)
    report = _inspect_json(capsys, bundle)
    assert report == json.loads(json.dumps(bundle_report))  # the CLI prints describe()'s report, as one object
    assert report["kind"] == "bundle" and report["num_codes"] == 3
    assert report["resolution"] == [manifest.resolution] * 2
    assert report["teacher_macs"] == manifest.teacher_macs == loaded.teacher_macs
    assert report["sampling"] == manifest.sampling.model_dump()
    assert report["prediction_type"] == manifest.prediction_type
    assert report["router"]["num_codes"] == 3 and report["router"]["encoder"] == manifest.text_encoder.name
    teacher_unet = meta_unet({"_class_name": "UNet2DConditionModel", **manifest.teacher_config})
    assert report["teacher_params"] == sum(p.numel() for p in teacher_unet.parameters())
    space = ArchitectureSpace.from_unet(teacher_unet, text_len=ENCODER_MAX_LENGTH)
    assert [code["code"] for code in report["codes"]] == [0, 1, 2]
    macs = [code["expert_macs"] for code in report["codes"]]
    assert macs == [entry.macs for entry in manifest.codes] == [code.macs for code in loaded.codes]
    assert macs[0] > macs[1] > macs[2]  # keeps 1.0, 0.6, 0.3
    for code, entry in zip(report["codes"], manifest.codes, strict=True):
        assert code["expert"] == entry.expert and code["training_share"] == entry.training_share
        assert code["mac_ratio"] == pytest.approx(entry.macs / manifest.teacher_macs)
        assert code["params"] == entry.params
        kept = {u["name"]: u["kept"] for u in code["units"]}
        arch = entry.architecture_tensor()
        assert kept == {u.name: int(space.gates_of(arch, u.name).sum()) for u in space}


def test_each_code_is_its_expert_folders_report(bundle, bundle_report):
    from aptp.formats.describe import describe

    for code in bundle_report["codes"]:
        own = describe(bundle / code["expert"], resolution=bundle_report["resolution"][0])
        assert {k: v for k, v in code.items() if k not in ("code", "expert", "training_share")} == own


def test_bundle_text_report(capsys, bundle, bundle_report):
    code, out, err = _inspect(capsys, bundle)
    assert code == 0, err
    assert out.startswith(f"{bundle} (bundle, 3 codes), resolution 32x32, text length {ENCODER_MAX_LENGTH}")
    lines = out.splitlines()
    for entry in bundle_report["codes"]:
        row = next(line for line in lines if line.split()[:2] == [str(entry["code"]), entry["expert"]])
        assert f"{entry['params']:,}" in row and f"{entry['mac_ratio']:.1%}" in row
    header = next(line for line in lines if line.startswith("block"))
    assert header.split()[4:11] == ["gates", "code", "0", "code", "1", "code", "2"]
    assert "router            3 codes" in out and "sampling          2 steps" in out


def test_a_one_code_bundle_is_named_in_the_singular(bundle_report):
    from aptp.formats.describe import format_report

    one = {**bundle_report, "num_codes": 1, "codes": bundle_report["codes"][:1]}
    one["router"] = {**one["router"], "num_codes": 1}
    text = format_report(one)
    assert "(bundle, 1 code), resolution" in text and "router            1 code from" in text


def test_bundle_verify_counts_every_code(capsys, bundle):
    report = _inspect_json(capsys, bundle, "--verify")
    assert all(code["flop_counter_rel_error"] < 0.01 for code in report["codes"])
    code, out, _ = _inspect(capsys, bundle, "--verify")
    assert code == 0 and all(f"FlopCounterMode   code {k}:" in out for k in range(3))


def test_bundle_resolution_option_recounts_every_code(capsys, bundle, bundle_report):
    report = _inspect_json(capsys, bundle, "--resolution", "16")
    assert report["resolution"] == [16, 16] and report["teacher_macs"] < bundle_report["teacher_macs"]
    small, full = ([code["expert_macs"] for code in r["codes"]] for r in (report, bundle_report))
    assert all(a < b for a, b in zip(small, full, strict=True))


def test_the_manifest_file_names_its_bundle(capsys, bundle, bundle_report):
    assert _inspect_json(capsys, bundle / "manifest.json") == json.loads(json.dumps(bundle_report))


def test_a_router_folder_reports_what_each_code_costs_before_any_expert_exists(capsys, bundle):
    """A search's output: each code's MACs, share of the teacher's, balancing offset and kept gates, the same figures
    the bundle exported from it states."""
    from aptp.formats.bundle import read_manifest
    from router.model import Router

    manifest, router = read_manifest(bundle), Router.load(bundle / "router")
    report = _inspect_json(capsys, bundle / "router")
    assert report == _inspect_json(capsys, bundle / "router" / "config.json")
    assert report["kind"] == "router" and report["num_codes"] == 3
    assert report["total_macs"] == manifest.teacher_macs
    assert report["router"]["num_codes"] == 3 and report["router"]["encoder"] == manifest.text_encoder.name
    space = router.space
    for code, entry, offset in zip(report["codes"], manifest.codes, router.code_offsets.tolist(), strict=True):
        assert code["code"] == entry.code and code["macs"] == entry.macs
        assert code["mac_ratio"] == pytest.approx(entry.macs / manifest.teacher_macs)
        assert code["offset"] == offset
        arch = entry.architecture_tensor()
        assert {u["name"]: u["kept"] for u in code["units"]} == {
            u.name: int(space.gates_of(arch, u.name).sum()) for u in space
        }
    code, out, err = _inspect(capsys, bundle / "router")
    assert code == 0, err
    assert out.startswith(f"{bundle / 'router'} (router, 3 codes), resolution 32x32")
    rows = [line.split() for line in out.splitlines()]
    for entry in report["codes"]:
        assert [str(entry["code"]), f"{entry['macs'] / 1e6:.2f}", "M", f"{entry['mac_ratio']:.1%}"] in [
            row[:4] for row in rows
        ]


def test_verify_on_a_router_folder_says_there_is_no_unet_to_count(capsys, bundle):
    _assert_clean_error(capsys, bundle / "router", "--verify", mentions=("holds no U-Net",))


def test_a_reader_that_goes_away_ends_the_command_quietly(bundle):
    """`aptp inspect ... | head`: the pipe closes before the report is written; no traceback, exit 1."""
    command = [sys.executable, "-m", "aptp.cli.main", "inspect", str(bundle), "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    process.stdout.close()  # long before the report is ready: the import alone takes a second
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()


def test_a_latent_bundle_reports_its_decoder_and_text_encoder(tiny_sd, tmp_path):
    from aptp.cli.inspect import inspect_report
    from aptp.formats.describe import format_report
    from aptp.pipeline import RoutedPipeline
    from training.export import random_bundle

    bundle = random_bundle(tiny_sd, tmp_path / "bundle", num_codes=2, keeps=[1.0, 0.5])
    report = inspect_report(bundle)
    loaded = RoutedPipeline.load(bundle)
    assert report["resolution"] == [8, 8] and report["pixel_resolution"] == [32, 32]
    assert [code["expert_macs"] for code in report["codes"]] == [code.macs for code in loaded.codes]
    assert report["vae_decoder_macs_per_image"] == loaded.decoder_macs_per_image
    assert report["text_encoder_macs_per_prompt"] == loaded.text_encoder_macs_per_prompt
    assert "VAE decoder MACs" in format_report(report)


def test_the_shipped_bundle(capsys):
    from aptp.formats.bundle import read_manifest

    shipped = REPO / "bundles" / "shapes" / "aptp"
    manifest = read_manifest(shipped, verify=False)
    report = _inspect_json(capsys, shipped)
    assert report["num_codes"] == manifest.num_codes == len(report["codes"])
    assert [code["expert_macs"] for code in report["codes"]] == [entry.macs for entry in manifest.codes]
    assert all(0 < code["mac_ratio"] < 1 for code in report["codes"])


# ----------------------------------------------------------------------------------------------------- bad input
def _assert_clean_error(capsys, path, *extra, mentions=(), names=None):
    """`aptp inspect path` exits 2 with one error line naming `names` (default: `path`), and no traceback."""
    code, out, err = _inspect(capsys, path, *extra)
    assert code == 2
    assert out == ""
    assert err.startswith("aptp inspect: error:")
    assert f"error: {names or path}:" in err
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


def test_a_json_object_that_is_no_unet_config_is_not_read_as_diffusers_default_unet(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_layers": 2}))
    _assert_clean_error(capsys, tmp_path / "config.json", mentions=("not a UNet2DConditionModel config",))


def test_config_that_cannot_build(capsys, tmp_path):
    config = {**small_unet_config(), "block_out_channels": [32, 64]}  # 3 block types, 2 widths
    (tmp_path / "config.json").write_text(json.dumps(config))
    _assert_clean_error(capsys, tmp_path / "config.json")


def test_broken_expert_folder(capsys, tmp_path, expert):
    folder = Path(shutil.copytree(expert[0], tmp_path / "expert"))
    (folder / EXPERT_NAME).write_text("[]")
    _assert_clean_error(capsys, folder / EXPERT_NAME)


def _broken_bundle(tmp_path, bundle) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def test_bundle_manifest_that_is_not_json(capsys, tmp_path, bundle):
    folder = _broken_bundle(tmp_path, bundle)
    (folder / "manifest.json").write_text("{ not json")
    _assert_clean_error(capsys, folder, names=folder / "manifest.json", mentions=("not valid JSON",))
    _assert_clean_error(capsys, folder / "manifest.json", "--json")


def test_bundle_manifest_with_an_invalid_field(capsys, tmp_path, bundle):
    folder = _broken_bundle(tmp_path, bundle)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["codes"][1]["macs"] = -5
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _assert_clean_error(capsys, folder, names=folder / "manifest.json", mentions=("codes.1.macs",))


def test_bundle_manifest_whose_macs_the_expert_does_not_count(capsys, tmp_path, bundle):
    folder = _broken_bundle(tmp_path, bundle)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["codes"][1]["macs"] += 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _assert_clean_error(capsys, folder, names=folder / "manifest.json", mentions=("codes[1].macs",))


def test_bundle_code_with_another_architecture(capsys, tmp_path, bundle):
    folder = _broken_bundle(tmp_path, bundle)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["codes"][0]["expert"], manifest["codes"][2]["expert"] = "experts/2", "experts/0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    _assert_clean_error(capsys, folder, names=folder / "experts" / "2", mentions=("code 0",))


def test_bundle_missing_an_expert_folder(capsys, tmp_path, bundle):
    folder = _broken_bundle(tmp_path, bundle)
    shutil.rmtree(folder / "experts" / "1")
    _assert_clean_error(capsys, folder, names=folder / "experts" / "1", mentions=("code 1", "missing"))


def test_bundle_whose_router_disagrees(capsys, tmp_path, bundle):
    folder = _broken_bundle(tmp_path, bundle)
    config = json.loads((folder / "router" / "config.json").read_text())
    config["router"]["num_codes"] = 5
    (folder / "router" / "config.json").write_text(json.dumps(config))
    _assert_clean_error(capsys, folder, names=folder / "router" / "config.json", mentions=("5 codes",))


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
