"""`aptp generate` and `aptp eval` on a tiny random-weight teacher: the files they write and clean failures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

import aptp.conditioning.conditioner as conditioner_module
from aptp.cli.main import main
from aptp.formats.report import folder_checksum
from aptp.formats.teacher import TeacherSpec, save_teacher
from tests.helpers import ENCODER_MAX_LENGTH, build_unet, pixel_unet_config, shared_encoder_factory
from training.evaluation.evaluator import DomainEvaluator, EvaluatorConfig

RESOLUTION = 32


@pytest.fixture(autouse=True)
def shared_encoder(monkeypatch, prompt_encoder):
    monkeypatch.setattr(conditioner_module, "PromptEncoder", shared_encoder_factory(prompt_encoder))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A teacher folder holding a tiny random U-Net that cross-attends to all-MiniLM-L6-v2 token states."""
    config = pixel_unet_config(RESOLUTION, 384)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    spec = TeacherSpec(
        resolution=RESOLUTION,
        text_encoder={"name": "all-MiniLM-L6-v2", "max_length": ENCODER_MAX_LENGTH},
        scheduler_config=dict(scheduler.config),
        sampling={"steps": 2, "guidance_scale": 4.0},
    )
    return save_teacher(build_unet(config, seed=0), spec, tmp_path_factory.mktemp("bundle") / "tiny-teacher")


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("evaluator") / "evaluator"
    DomainEvaluator(EvaluatorConfig(width=8, feature_dim=32)).save(folder)
    return folder


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


# -------------------------------------------------------------------------------------------------------- generate
def test_generate_writes_one_row_of_images(tmp_path, capsys, bundle):
    out = tmp_path / "x.png"
    args = ["generate", "a red circle", "--bundle", bundle, "--out", out, "--steps", 2, "--num-images", 2]
    code, stdout, err = _run(capsys, *args, "--scale", 1)
    assert code == 0, err
    assert str(out) in stdout
    image = Image.open(out)
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == (64, 32)  # (width, height): two 32x32 images side by side
    pixels = _pixels(out)
    assert np.abs(pixels[:, :32] - pixels[:, 32:]).mean() > 1  # seeds 0 and 1 differ

    # per-image seeds: image 2 of `--seed 0` is image 1 of `--seed 1`
    single = tmp_path / "single.png"
    code, _, err = _run(capsys, "generate", "a red circle", "--bundle", bundle, "--out", single, "--steps", 2)
    assert code == 0, err
    shifted = tmp_path / "shifted.png"
    code, _, err = _run(capsys, *args[:5], shifted, "--steps", 2, "--seed", 1, "--scale", 1)
    assert code == 0, err
    assert Image.open(single).size == (128, 128)  # the default 4x upscaling
    assert np.abs(_pixels(single)[::4, ::4] - pixels[:, :32]).max() <= 1
    assert np.abs(_pixels(shifted) - pixels[:, 32:]).max() <= 1


def test_generate_defaults_to_the_bundle_the_server_serves():
    from aptp.cli.main import build_parser
    from server.settings import Settings

    args = build_parser().parse_args(["generate", "a red circle", "--out", "x.png"])
    assert Path(args.bundle) == Settings.model_fields["bundle"].default


@pytest.mark.parametrize(
    "options, named",
    [
        (["--guidance", "0"], "--guidance"),
        (["--guidance", "51"], "--guidance"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**63 - 1), "--num-images", "2"], "--seed"),
    ],
    ids=["guidance-0", "guidance-51", "negative-seed", "seed-past-the-end"],
)
def test_generate_refuses_what_the_server_refuses_naming_the_option(tmp_path, capsys, bundle, options, named):
    out = tmp_path / "x.png"
    code, _, err = _run(capsys, "generate", "a red circle", "--bundle", bundle, "--out", out, *options)
    assert code == 2 and f"aptp generate: error: {named}" in err, err
    assert not out.exists()


def test_generate_refuses_a_blank_prompt(tmp_path, capsys, bundle):
    code, _, err = _run(capsys, "generate", "  ", "--bundle", bundle, "--out", tmp_path / "x.png")
    assert code == 2 and "aptp generate: error: prompt" in err, err


def test_generate_with_a_missing_bundle_exits_2_naming_the_path(tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "a red circle", "--bundle", "/nonexistent", "--out", tmp_path / "x.png")
    assert code == 2
    assert "/nonexistent" in err and "error" in err
    assert not (tmp_path / "x.png").exists()


def test_generate_with_a_corrupt_bundle_exits_2_naming_the_file(tmp_path, capsys, bundle):
    broken = tmp_path / "broken"
    for path in bundle.rglob("*"):
        if path.is_file():
            target = broken / path.relative_to(bundle)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (broken / "teacher.json").write_text("{")
    code, _, err = _run(capsys, "generate", "a red circle", "--bundle", broken, "--out", tmp_path / "x.png")
    assert code == 2 and str(broken / "teacher.json") in err


# ------------------------------------------------------------------------------------------------------------ eval
def test_eval_writes_the_report_and_sample_grid(tmp_path, capsys, bundle, evaluator):
    out = tmp_path / "results"
    args = ["eval", "--bundle", bundle, "--evaluator", evaluator, "--num-prompts", 8, "--num-heldout", 8]
    code, stdout, err = _run(capsys, *args, "--num-paraphrases", 8, "--steps", 2, "--out", out)
    assert code == 0, err
    name = bundle.name
    assert {p.name for p in out.iterdir()} >= {f"{name}.json", f"{name}.md", f"{name}_samples.png"}
    report = json.loads((out / f"{name}.json").read_text())
    assert report["name"] == name and report["steps"] == 2 and report["bundle"] == str(bundle)
    assert report["text_adapter_macs_per_prompt"] == 0  # the tiny teacher has no text adapter
    # Which model made these figures: the checksum of its description, as evaluated, and the settings used.
    provenance = report["provenance"]
    assert provenance["bundles"][str(bundle)] == folder_checksum(bundle) is not None
    assert provenance["config"]["steps"] == 2 and provenance["config"]["num_prompts"] == 8
    results = report["results"]
    assert [r["split"] for r in results] == ["test", "heldout", "paraphrases"]
    for result in results:
        assert result["prompts"] == 8 and sum(result["tier_counts"].values()) == 8
        numbers = [result["alignment"]["overall"], result["alignment_real"]["overall"]]
        numbers += [result[k] for k in ("domain_fid", "domain_fid_floor", "cmmd", "cmmd_floor")]
        assert all(isinstance(x, float) and math.isfinite(x) for x in numbers), result
        assert 0 <= result["alignment"]["overall"] <= 1
        assert result["domain_fid"] >= 0 and result["domain_fid_floor"] >= 0
    assert name in (out / f"{name}.md").read_text()
    grid = Image.open(out / f"{name}_samples.png")
    assert grid.format == "PNG" and grid.width == 8 * RESOLUTION * 4  # 8 images a row, 4x upscaled
    # one JSON line per split on stdout
    assert [json.loads(line)["split"] for line in stdout.splitlines() if line.startswith("{")] == [
        "test",
        "heldout",
        "paraphrases",
    ]


@pytest.mark.parametrize("which", ["--bundle", "--evaluator"])
def test_eval_with_a_missing_folder_exits_2_naming_it(tmp_path, capsys, bundle, evaluator, which):
    paths = {"--bundle": bundle, "--evaluator": evaluator, which: tmp_path / "missing"}
    code, _, err = _run(capsys, "eval", *sum(([k, v] for k, v in paths.items()), []), "--out", tmp_path / "out")
    assert code == 2
    assert str(tmp_path / "missing") in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def routed_bundle(tmp_path_factory, bundle) -> Path:
    from training.export import random_bundle

    return random_bundle(bundle, tmp_path_factory.mktemp("routed") / "routed", num_codes=2, keeps=[1.0, 0.5])


def _table(path: Path) -> str:
    """A report's markdown without its provenance foot (which names the run's commit and date)."""
    text, foot = path.read_text().rstrip().rsplit("\n\n", 1)
    assert foot.startswith("Provenance: commit ") or foot.startswith("Provenance: no commit"), foot
    return text


def test_eval_compares_a_teacher_and_a_routed_bundle_in_one_table(tmp_path, capsys, bundle, routed_bundle, evaluator):
    from aptp.formats.bundle import read_manifest

    out = tmp_path / "results"
    args = ["eval", "--bundle", bundle, "--bundle", routed_bundle, "--evaluator", evaluator]
    code, stdout, err = _run(
        capsys, *args, "--num-prompts", 6, "--num-heldout", 4, "--num-paraphrases", 4, "--steps", 2, "--out", out
    )
    assert code == 0, err
    rows = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == [bundle.name, routed_bundle.name]
    teacher_report, routed_report = json.loads((out / "compare.json").read_text())
    teacher_routing = teacher_report["results"][0]["routing"]
    assert teacher_routing["num_codes"] == 1 and teacher_routing["load"] == {"0": 1.0}
    assert teacher_routing["macs_ratio"]["overall"] == 1.0
    manifest = read_manifest(routed_bundle)
    for result in routed_report["results"]:
        routing = result["routing"]
        assert routing["num_codes"] == 2 and math.isclose(sum(routing["load"].values()), 1.0)
        expected = sum(routing["load"][str(c.code)] * c.macs / manifest.teacher_macs for c in manifest.codes)
        assert math.isclose(routing["macs_ratio"]["overall"], expected)
        assert routing["teacher_macs_per_call"] == manifest.teacher_macs
    assert (out / f"{routed_bundle.name}_codes.png").exists()  # one row of samples per code
    assert not (out / f"{bundle.name}_codes.png").exists()

    # The same table from the saved reports, without sampling again (how results of separate runs are combined).
    reports = [out / f"{bundle.name}.json", out / f"{routed_bundle.name}.json"]
    fresh = tmp_path / "tables"  # a folder that does not exist yet
    code, _, err = _run(capsys, "eval", "--compare", *reports, "--compare-name", "again", "--out", fresh)
    assert code == 0, err
    assert _table(fresh / "again.md") == _table(out / "compare.md")

    # Prompt-by-prompt alignment against a named reference, below the same table.
    for result in routed_report["results"]:
        assert len(result["alignment_per_prompt"]) == result["prompts"]
        assert math.isclose(
            sum(result["alignment_per_prompt"]) / result["prompts"], result["alignment"]["overall"], abs_tol=1e-3
        )
    code, _, err = _run(capsys, "eval", "--compare", *reports, "--reference", bundle.name, "--out", fresh)
    assert code == 0, err
    table = _table(fresh / "compare.md")
    assert table.startswith(_table(out / "compare.md"))
    (row,) = [line for line in table.splitlines() if line.startswith(f"| {routed_bundle.name} |")][1:]
    cells = [cell.strip() for cell in row.split("|")[2:5]]  # test, held-out, paraphrases
    assert all(cell.count("[") == 1 for cell in cells), row
    code, _, err = _run(capsys, "eval", "--compare", *reports, "--reference", "nobody", "--out", fresh)
    assert code == 2 and "nobody" in err


@pytest.mark.parametrize("content", [None, "not json", '{"name": "x", "results": []}'])
def test_eval_compare_names_a_file_that_is_not_a_report(tmp_path, capsys, content):
    report = tmp_path / "report.json"
    if content is not None:
        report.write_text(content)
    code, _, err = _run(capsys, "eval", "--compare", report, "--out", tmp_path / "results")
    assert code == 2
    assert str(report) in err
    assert not (tmp_path / "results").exists()


def test_generate_reports_the_code_and_its_cost(tmp_path, capsys, routed_bundle):
    code, stdout, err = _run(capsys, "generate", "a red circle", "--bundle", routed_bundle, "--out", tmp_path / "x.png")
    assert code == 0, err
    assert "code " in stdout and "GMACs per U-Net call" in stdout


def test_generate_decodes_a_pipeline_folder_and_eval_says_it_scores_the_shapes_domain(tmp_path, capsys, tiny_sd):
    out = tmp_path / "sd.png"
    code, stdout, err = _run(
        capsys,
        "generate",
        "a red circle",
        "--bundle",
        tiny_sd,
        "--out",
        out,
        "--num-images",
        2,
        "--steps",
        2,
        "--scale",
        1,
    )
    assert code == 0, err
    assert Image.open(out).size == (64, 32) and Image.open(out).mode == "RGB"  # two 32x32 decoded images in a row
    code, _, err = _run(capsys, "eval", "--bundle", tiny_sd, "--out", tmp_path / "results")
    assert code == 2 and "diffusers pipeline folder" in err and "Traceback" not in err


def test_eval_scores_your_own_model_on_your_own_prompts_with_local_metric_weights(
    tmp_path, capsys, tiny_sd, tiny_captions
):
    from scripts.tiny_sd import build_tiny_clip

    clip = build_tiny_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bicycle\na tree in the snow\n# a comment\na house at night\n")
    out = tmp_path / "results"
    args = ["eval", "--bundle", tiny_sd, "--prompts", prompts, "--steps", 2, "--out", out, "--name", "mine"]
    code, _, err = _run(capsys, *args, "--clip", clip, "--reference-images", tiny_captions / "images")
    assert code == 0, err
    report = json.loads((out / "mine.json").read_text())
    assert report["prompts"] == 3 and report["reference_images"] == 12 and report["macs_ratio"] == 1.0
    assert 0 <= report["metrics"]["clip_score"] <= 100 and math.isfinite(report["metrics"]["cmmd"])
    assert report["not_computed"] == ["fid (--reference-images and --inception)"]
    assert report["provenance"]["bundles"][str(tiny_sd)] is not None
    assert (out / "mine_codes.png").is_file() and "not computed: fid" in (out / "mine.md").read_text()
    # A metric file that is not there is named, before any image is generated.
    code, _, err = _run(capsys, "eval", "--bundle", tiny_sd, "--prompts", prompts, "--clip", tmp_path / "none")
    assert code == 2 and str(tmp_path / "none") in err and "Traceback" not in err
    code, _, err = _run(
        capsys, *args, "--reference-images", tiny_captions / "images", "--inception", tmp_path / "x.pth"
    )
    assert code == 2 and "--inception" in err and "Traceback" not in err
