"""Teacher folders: `save_teacher` / `load_teacher` round trip, and checked loading whose errors name the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from aptp.conditioning.adapter import ADAPTER_WEIGHTS, TEXT_ADAPTER, TextAdapter, TextAdapterConfig
from aptp.conditioning.prompts import Conditioning
from aptp.formats.files import ModelFileError, file_sha256
from aptp.formats.teacher import (
    UNET_WEIGHTS,
    TeacherFileError,
    TeacherSpec,
    load_teacher,
    load_text_adapter,
    save_teacher,
)
from tests.helpers import assert_same_output, build_unet, pixel_unet_config, run, unet_inputs

CROSS_DIM = 16
RESOLUTION = 32


def _config(**overrides) -> dict:
    config = pixel_unet_config(RESOLUTION, CROSS_DIM)
    config.update(overrides)
    return config


def _spec() -> TeacherSpec:
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    return TeacherSpec(
        resolution=RESOLUTION,
        text_encoder={"name": "all-MiniLM-L6-v2", "max_length": 40},
        scheduler_config=dict(scheduler.config),
        sampling={"steps": 3, "guidance_scale": 2.5},
        training={"steps": 10, "note": "test"},
    )


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return build_unet(_config(), seed=3)


@pytest.fixture()
def folder(tmp_path, unet) -> Path:
    return save_teacher(unet, _spec(), tmp_path / "teacher")


def _description(folder: Path) -> dict:
    return json.loads((folder / "teacher.json").read_text())


def _rewrite_description(folder: Path, **changes) -> None:
    description = _description(folder)
    description.update(changes)
    (folder / "teacher.json").write_text(json.dumps(description))


# ------------------------------------------------------------------------------------------------------ round trip
def test_round_trip_gives_the_same_outputs_and_spec(folder, unet):
    loaded, spec = load_teacher(folder)
    assert isinstance(loaded, UNet2DConditionModel) and not loaded.training
    inputs = unet_inputs(unet, batch=2, resolution=RESOLUTION)
    assert torch.equal(run(loaded, inputs), run(unet, inputs))
    expected = _spec()
    assert spec.resolution == expected.resolution
    assert spec.text_encoder == expected.text_encoder
    assert spec.sampling == expected.sampling
    assert spec.training == expected.training
    assert spec.scheduler_config["prediction_type"] == "v_prediction"
    assert spec.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert DDPMScheduler.from_config(spec.scheduler_config).config.num_train_timesteps == 1000


def test_folder_layout_is_a_plain_diffusers_unet_folder(folder, unet):
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == {
        "teacher.json",
        "unet/config.json",
        UNET_WEIGHTS,
        "scheduler/scheduler_config.json",
    }
    plain = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    inputs = unet_inputs(unet, batch=1, resolution=RESOLUTION)
    # Plain diffusers may pick another attention kernel than our loader: same function to float rounding.
    assert_same_output(run(plain, inputs), run(unet, inputs), rel=1e-5)
    description = _description(folder)
    assert description["format"] == "aptp-teacher"
    assert description["sha256"] == {UNET_WEIGHTS: file_sha256(folder / UNET_WEIGHTS)}


def test_load_with_dtype(folder, unet):
    loaded, _ = load_teacher(folder, dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
    sample, timesteps, context = unet_inputs(unet, batch=1, resolution=RESOLUTION)
    with torch.no_grad():
        out = loaded(sample.double(), timesteps, encoder_hidden_states=context.double()).sample
    assert_same_output(out.float(), run(unet, (sample, timesteps, context)))


# ---------------------------------------------------------------------------------------------------------- errors
def _load_error(folder: Path) -> TeacherFileError:
    with pytest.raises(TeacherFileError) as info:
        load_teacher(folder)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, ModelFileError)
    return error


def test_missing_folder(tmp_path):
    error = _load_error(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "teacher.json") in str(error)


def test_missing_teacher_json(folder):
    (folder / "teacher.json").unlink()
    error = _load_error(folder)
    assert error.path == folder / "teacher.json"
    assert str(folder / "teacher.json") in str(error) and "not found" in str(error)


def test_invalid_json(folder):
    (folder / "teacher.json").write_text('{"format": "aptp-teacher",')
    error = _load_error(folder)
    assert str(folder / "teacher.json") in str(error) and "JSON" in str(error)


def test_json_that_is_not_an_object(folder):
    (folder / "teacher.json").write_text("[1, 2]")
    assert str(folder / "teacher.json") in str(_load_error(folder))


def test_wrong_format_field(folder):
    _rewrite_description(folder, format="aptp-expert")
    error = _load_error(folder)
    assert str(folder / "teacher.json") in str(error) and "aptp-expert" in str(error)


def test_missing_unet_config(folder):
    (folder / "unet" / "config.json").unlink()
    assert str(folder / "unet" / "config.json") in str(_load_error(folder))


def test_missing_scheduler_config(folder):
    (folder / "scheduler" / "scheduler_config.json").unlink()
    assert str(folder / "scheduler" / "scheduler_config.json") in str(_load_error(folder))


def test_missing_weights(folder):
    (folder / UNET_WEIGHTS).unlink()
    error = _load_error(folder)
    assert str(folder / UNET_WEIGHTS) in str(error) and "not found" in str(error)


def test_corrupt_weights_fail_the_checksum(folder):
    path = folder / UNET_WEIGHTS
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # one flipped byte in the last tensor's data
    path.write_bytes(bytes(data))
    error = _load_error(folder)
    assert error.path == path
    assert str(path) in str(error) and "checksum" in str(error)


def test_unreadable_weights_with_a_matching_checksum(folder):
    path = folder / UNET_WEIGHTS
    path.write_bytes(b"not safetensors at all")
    _rewrite_description(folder, sha256={UNET_WEIGHTS: file_sha256(path)})
    error = _load_error(folder)
    assert str(path) in str(error) and "safetensors" in str(error)


def test_weights_of_a_different_shaped_model_name_a_tensor(folder, tmp_path):
    other = build_unet(_config(block_out_channels=[12, 24, 24]), seed=0)  # same tensor names
    save_teacher(other, _spec(), tmp_path / "other")
    path = folder / UNET_WEIGHTS
    path.write_bytes((tmp_path / "other" / UNET_WEIGHTS).read_bytes())
    _rewrite_description(folder, sha256={UNET_WEIGHTS: file_sha256(path)})  # the checksum now passes
    error = _load_error(folder)
    assert str(path) in str(error)
    assert "tensor " in str(error) and "shape" in str(error)
    name = str(error).split("tensor ", 1)[1].split(" ", 1)[0]
    assert name in other.state_dict()


def test_weights_with_other_tensor_names(folder, tmp_path):
    other = build_unet(_config(layers_per_block=2), seed=0)
    save_teacher(other, _spec(), tmp_path / "other")
    path = folder / UNET_WEIGHTS
    path.write_bytes((tmp_path / "other" / UNET_WEIGHTS).read_bytes())
    _rewrite_description(folder, sha256={UNET_WEIGHTS: file_sha256(path)})
    error = _load_error(folder)
    assert str(path) in str(error) and "unexpected" in str(error)


def test_teacher_json_without_resolution(folder):
    description = _description(folder)
    del description["resolution"]
    (folder / "teacher.json").write_text(json.dumps(description))
    error = _load_error(folder)
    assert str(folder / "teacher.json") in str(error) and "resolution" in str(error)


def test_unet_config_that_cannot_build(folder):
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["down_block_types"] = ["NoSuchBlock2D"] * 3
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    assert str(folder / "unet" / "config.json") in str(_load_error(folder))


# ---------------------------------------------------------------------------------------------------- text adapter
def test_a_teacher_without_an_adapter_loads_none(folder):
    assert load_teacher(folder)[1].text_adapter is None
    assert load_text_adapter(folder) is None


def test_the_text_adapter_is_saved_beside_the_unet_and_checked_on_load(tmp_path, unet):
    torch.manual_seed(0)
    adapter = TextAdapter(TextAdapterConfig(token_dim=12, width=16, layers=1, heads=4))
    folder = save_teacher(unet, _spec(), tmp_path / "teacher", text_adapter=adapter)
    assert load_teacher(folder)[1].text_adapter == adapter.config
    loaded = load_text_adapter(folder)
    prompts = Conditioning(torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.long))
    with torch.no_grad():
        ours, theirs = loaded(prompts), adapter.eval()(prompts)
    torch.testing.assert_close(ours.states, theirs.states)
    assert torch.equal(ours.mask, theirs.mask) and ours.prompt_map is theirs.prompt_map is None
    weights = folder / TEXT_ADAPTER / ADAPTER_WEIGHTS
    torch.manual_seed(1)  # same shapes, other weights: only the checksum can tell
    TextAdapter(adapter.config).save(tmp_path / "other")
    weights.write_bytes((tmp_path / "other" / ADAPTER_WEIGHTS).read_bytes())
    with pytest.raises(ModelFileError, match="sha256|checksum"):
        load_text_adapter(folder)
