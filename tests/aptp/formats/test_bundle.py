"""Bundles: the manifest a random bundle records, experts that equal the teacher's slices, and checked reading
whose errors name the offending file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from aptp.conditioning.encoder import EncoderConfig
from aptp.formats.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    MANIFEST,
    BundleError,
    CodeEntry,
    Manifest,
    load_code_experts,
    read_manifest,
    write_manifest,
)
from aptp.formats.files import ModelFileError, file_sha256
from pruning import slice_unet
from router.model import Router
from tests.helpers import ENCODER_MAX_LENGTH, assert_json_or_safetensors, run, unet_inputs
from training.export import random_bundle

NUM_CODES = 3
KEEPS = [1.0, 0.7, 0.4]  # random_bundle's default for 3 codes
RESOLUTION = 32


@pytest.fixture(scope="module")
def bundle(teacher_folder, tmp_path_factory) -> Path:
    return random_bundle(teacher_folder, tmp_path_factory.mktemp("bundle") / "bundle", num_codes=NUM_CODES)


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    """A private copy of the bundle that a test may damage."""
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def _edit_manifest(folder: Path, edit) -> Path:
    path = folder / MANIFEST
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def _names(path: Path) -> str:
    return re.escape(str(path))


# ----------------------------------------------------------------------------------------------------- layout
def test_random_bundle_layout(bundle):
    assert (bundle / MANIFEST).is_file()
    assert sorted(p.name for p in (bundle / "router").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in (bundle / "experts").iterdir()) == [str(k) for k in range(NUM_CODES)]
    for code in range(NUM_CODES):
        files = sorted(p.name for p in (bundle / "experts" / str(code)).iterdir())
        assert files == ["config.json", "diffusion_pytorch_model.safetensors", "expert.json"]


def test_bundle_holds_only_json_and_safetensors(bundle):
    files = [p for p in bundle.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} == {".json", ".safetensors"}
    assert_json_or_safetensors(files)


# --------------------------------------------------------------------------------------------------- manifest
def test_manifest_records_the_teacher(bundle, teacher):
    unet, spec, space = teacher
    manifest = read_manifest(bundle)
    assert manifest.num_codes == NUM_CODES
    assert manifest.resolution == RESOLUTION
    assert manifest.teacher_macs == space.total_macs(RESOLUTION)
    assert manifest.teacher_config == {
        k: v for k, v in json.loads(json.dumps(dict(unet.config))).items() if k[0] != "_"
    }
    assert manifest.scheduler_config == spec.scheduler_config
    assert manifest.prediction_type == "v_prediction"
    assert manifest.text_encoder == EncoderConfig(name="all-MiniLM-L6-v2", max_length=ENCODER_MAX_LENGTH)
    assert manifest.sampling == spec.sampling
    assert manifest.info["kind"] == "random-codes" and manifest.info["keeps"] == KEEPS
    raw = json.loads((bundle / MANIFEST).read_text())
    assert raw["format"] == BUNDLE_FORMAT and raw["version"] == BUNDLE_VERSION
    assert raw["num_codes"] == NUM_CODES and raw["prediction_type"] == "v_prediction"


def test_manifest_codes(bundle, teacher):
    unet, _, space = teacher
    codes = read_manifest(bundle).codes
    assert [c.code for c in codes] == list(range(NUM_CODES))
    assert [c.expert for c in codes] == [f"experts/{k}" for k in range(NUM_CODES)]
    macs = [c.macs for c in codes]
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == NUM_CODES  # decreasing with the keeps
    assert macs[0] == space.total_macs(RESOLUTION)  # keep 1.0 is the full U-Net
    params = [c.params for c in codes]
    assert all(p > 0 for p in params)
    assert params[0] == sum(p.numel() for p in unet.parameters())
    assert params == sorted(params, reverse=True)
    assert sum(c.training_share for c in codes) == pytest.approx(1.0)
    for entry in codes:
        arch = entry.architecture_tensor()
        assert set(entry.architecture) <= {"0", "1"} and arch.shape == (space.dim,)
        assert entry.macs == space.macs(arch, RESOLUTION)


def test_manifest_codes_are_the_routers_codes(bundle, teacher):
    _, _, space = teacher
    manifest = read_manifest(bundle)
    router = Router.load(bundle / "router")
    assert router.resolution == RESOLUTION
    assert router.space.to_dict() == space.to_dict()
    assert router.config.num_codes == NUM_CODES
    expected = torch.stack([c.architecture_tensor() for c in manifest.codes])
    assert torch.equal(router.code_architectures(), expected)
    assert router.code_macs() == [c.macs for c in manifest.codes]


def test_manifest_lists_every_file_with_its_checksum(bundle):
    manifest = read_manifest(bundle)
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(manifest.files) == on_disk
    for relative, sha in manifest.files.items():
        assert file_sha256(bundle / relative) == sha


def test_write_read_manifest_round_trip(tmp_path):
    (tmp_path / "experts" / "0").mkdir(parents=True)
    (tmp_path / "experts" / "0" / "a.json").write_text("{}")
    manifest = Manifest(
        teacher_config={"sample_size": 8},
        scheduler_config={"prediction_type": "epsilon"},
        resolution=8,
        text_encoder={"name": "x", "max_length": 4},
        teacher_macs=100,
        codes=[
            CodeEntry(code=0, expert="experts/0", architecture="101", macs=60, params=10, training_share=0.25),
            CodeEntry(code=1, expert="experts/0", architecture="111", macs=100, params=12, training_share=0.75),
        ],
        info={"note": "test"},
    )
    write_manifest(tmp_path, manifest)
    read = read_manifest(tmp_path)
    assert read == manifest  # write_manifest filled in `files`
    assert read.files == {"experts/0/a.json": file_sha256(tmp_path / "experts" / "0" / "a.json")}
    assert torch.equal(read.codes[0].architecture_tensor(), torch.tensor([1.0, 0.0, 1.0]))


# ---------------------------------------------------------------------------------------------------- experts
def test_experts_equal_the_teachers_slices(bundle, teacher):
    unet, _, space = teacher
    manifest = read_manifest(bundle)
    experts = load_code_experts(bundle, manifest)
    assert len(experts) == NUM_CODES
    inputs = unet_inputs(unet, batch=2, resolution=RESOLUTION, text_len=ENCODER_MAX_LENGTH)
    full = run(unet, inputs)
    for entry, expert in zip(manifest.codes, experts, strict=True):
        assert not expert.training
        assert sum(p.numel() for p in expert.parameters()) == entry.params
        expected = run(slice_unet(unet, space, entry.architecture_tensor()), inputs)
        actual = run(expert, inputs)
        assert (actual - expected).abs().max().item() < 1e-5, entry.code
        if entry.code == 0:  # the full architecture computes the teacher itself
            assert (actual - full).abs().max().item() < 1e-5
        else:
            assert (actual - full).abs().max().item() > 1e-3


def test_expert_that_does_not_match_its_code_raises(copy):
    def swap(data):
        data["codes"][1]["architecture"] = data["codes"][2]["architecture"]

    _edit_manifest(copy, swap)
    manifest = read_manifest(copy)  # the manifest itself is well-formed
    with pytest.raises(BundleError, match=_names(copy / "experts" / "1")):
        load_code_experts(copy, manifest)


# ----------------------------------------------------------------------------------------------- checked reading
@pytest.mark.parametrize(
    "relative",
    ["experts/1/diffusion_pytorch_model.safetensors", "router/model.safetensors", "experts/2/expert.json"],
)
def test_tampered_file_raises_naming_it(copy, relative):
    path = copy / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=_names(path) + ".*checksum"):
        read_manifest(copy)
    assert read_manifest(copy, verify=False).num_codes == NUM_CODES


def test_replaced_expert_weights_raise_naming_the_file(copy):
    """A valid safetensors file of the same shapes (another expert's weights) is caught too."""
    target = copy / "experts" / "1" / "diffusion_pytorch_model.safetensors"
    other = copy / "experts" / "1" / "_other.safetensors"
    from safetensors.torch import load_file, save_file

    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in load_file(str(target)).items()}
    save_file(state, str(other))
    other.replace(target)
    with pytest.raises(BundleError, match=_names(target)):
        read_manifest(copy)


@pytest.mark.parametrize("relative", ["router/config.json", "experts/0/diffusion_pytorch_model.safetensors"])
def test_missing_listed_file_raises_naming_it(copy, relative):
    (copy / relative).unlink()
    with pytest.raises(BundleError, match=_names(copy / relative) + ".*missing"):
        read_manifest(copy)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(format="something-else"),
        lambda d: d.pop("format"),
        lambda d: d.update(version=BUNDLE_VERSION + 1),
        lambda d: d.pop("version"),
        lambda d: d.pop("teacher_macs"),
        lambda d: d.pop("codes"),
        lambda d: d["codes"][0].pop("macs"),
        lambda d: d["codes"][0].update(extra=1),
        lambda d: d.update(resolution="large"),
        lambda d: d["sampling"].update(steps=0),
        lambda d: d.update(num_codes=len(d["codes"]) + 1),
        lambda d: d.update(prediction_type="sample"),
    ],
    ids=[
        "format",
        "no-format",
        "version",
        "no-version",
        "no-teacher-macs",
        "no-codes",
        "code-field",
        "extra",
        "res",
        "zero-steps",
        "num-codes",
        "prediction-type",
    ],
)
def test_bad_manifest_raises_naming_it(copy, edit):
    path = _edit_manifest(copy, edit)
    with pytest.raises(BundleError, match=_names(path)):
        read_manifest(copy)


@pytest.mark.parametrize(
    "numbers", [[1, 0, 2], [0, 1, 3], [1, 2, 3], [0, 0, 1], []], ids=["order", "gap", "from-one", "dup", "empty"]
)
def test_codes_must_be_numbered_from_zero(copy, numbers):
    def renumber(data):
        data["codes"] = [{**data["codes"][min(i, 2)], "code": n} for i, n in enumerate(numbers)]

    path = _edit_manifest(copy, renumber)
    with pytest.raises(BundleError, match=_names(path) + ".*0..K-1"):
        read_manifest(copy)


def test_missing_or_unreadable_manifest_raises_naming_it(copy):
    path = copy / MANIFEST
    path.write_text("{not json")
    with pytest.raises(BundleError, match=_names(path)):
        read_manifest(copy)
    path.write_text("[1, 2]")
    with pytest.raises(BundleError, match=_names(path)):
        read_manifest(copy)
    path.unlink()
    with pytest.raises(BundleError, match=_names(path)):
        read_manifest(copy)


def test_missing_bundle_folder_raises_naming_it(tmp_path):
    with pytest.raises(BundleError, match=_names(tmp_path / "nowhere")):
        read_manifest(tmp_path / "nowhere")


def test_bundle_errors_are_value_errors(tmp_path):
    """Callers (the CLI, the server) catch ModelFileError / ValueError to report a bad file cleanly."""
    with pytest.raises(ModelFileError) as info:
        read_manifest(tmp_path / "nowhere")
    assert isinstance(info.value, ValueError)
    assert info.value.path == tmp_path / "nowhere"


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d["codes"][1].update(macs=d["codes"][1]["macs"] // 2), "codes[1].macs"),
        (lambda d: d["codes"][0].update(params=d["codes"][0]["params"] + 1), "codes[0].params"),
        (lambda d: d.update(teacher_macs=10**12), "teacher_macs"),
    ],
    ids=["code-macs", "params", "teacher-macs"],
)
def test_costs_in_the_manifest_are_recounted_from_the_experts(copy, edit, field):
    """What a server reports and schedules by is the experts' own cost, not what a manifest claims."""
    path = _edit_manifest(copy, edit)
    with pytest.raises(BundleError, match=re.escape(field)) as error:
        load_code_experts(copy, read_manifest(copy))
    assert str(path) in str(error.value) and "the expert counts" in str(error.value)
