"""Expert folders: save/load round trip, and every way a folder can be broken fails with a clear ExpertFileError."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from aptp.formats.expert import (
    CONFIG_NAME,
    EXPERT_NAME,
    WEIGHTS_NAME,
    ExpertFileError,
    ExpertInfo,
    file_sha256,
    load_expert,
    save_expert,
)
from pruning import ArchitectureSpace, slice_unet
from tests.helpers import SMALL_RESOLUTION, assert_json_or_safetensors, run, unet_inputs


@pytest.fixture(scope="module")
def arch(small_space):
    return small_space.random(0.5, 0)


@pytest.fixture(scope="module")
def sliced(small_unet, small_space, arch):
    return slice_unet(small_unet, small_space, arch)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, sliced, small_space, arch) -> Path:
    """One expert folder, written once; tests that break it work on a copy (`expert_copy`)."""
    return save_expert(sliced, small_space, arch, tmp_path_factory.mktemp("experts") / "expert")


@pytest.fixture
def expert_copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "broken-expert"))


def _edit_description(folder: Path, **changes) -> None:
    path = folder / EXPERT_NAME
    description = json.loads(path.read_text())
    description.update(changes)
    path.write_text(json.dumps(description))


def _expect_error(folder: Path, offending: Path, **kwargs) -> ExpertFileError:
    with pytest.raises(ExpertFileError) as excinfo:
        load_expert(folder, **kwargs)
    assert offending.name in str(excinfo.value)
    assert excinfo.value.path == offending
    return excinfo.value


# ---------------------------------------------------------------------------------------------------- round trip
def test_round_trip(saved, sliced, small_space, arch):
    unet, info = load_expert(saved)
    assert isinstance(info, ExpertInfo)
    assert torch.equal(info.arch, small_space.harden(arch))
    assert info.space.units == small_space.units
    assert info.space.text_len == small_space.text_len
    assert info.params == sum(p.numel() for p in sliced.parameters()) == sum(p.numel() for p in unet.parameters())
    assert info.sha256 == file_sha256(saved / WEIGHTS_NAME)
    assert not unet.training
    assert not any(t.is_meta for t in [*unet.parameters(), *unet.buffers()])
    inputs = unet_inputs(sliced, batch=2, resolution=SMALL_RESOLUTION, seed=1)
    expected = run(sliced, inputs)
    assert (run(unet, inputs) - expected).abs().max() <= 1e-6
    assert info.space.macs(info.arch) == small_space.macs(arch)


def test_load_with_dtype(saved):
    unet, _ = load_expert(saved, dtype=torch.float16)
    assert {p.dtype for p in unet.parameters()} == {torch.float16}


def test_round_trip_keeps_non_default_feed_forward_groups(tmp_path, small_unet):
    space = ArchitectureSpace.from_unet(small_unet, text_len=9, feed_forward_groups=7)  # 4 groups of 64
    arch = space.random(0.5, 2)
    folder = save_expert(slice_unet(small_unet, space, arch), space, arch, tmp_path / "ff7")
    _, info = load_expert(folder)
    assert info.space.units == space.units
    assert info.space.text_len == 9
    assert torch.equal(info.arch, arch)


def test_folder_holds_no_pickle(saved):
    files = sorted(p.name for p in saved.iterdir())
    assert files == sorted([CONFIG_NAME, EXPERT_NAME, WEIGHTS_NAME])
    assert {p.suffix for p in saved.iterdir()} == {".json", ".safetensors"}
    assert_json_or_safetensors(list(saved.iterdir()))
    for name in (CONFIG_NAME, EXPERT_NAME):
        assert isinstance(json.loads((saved / name).read_text()), dict)
    with safe_open(str(saved / WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata() == {"format": "aptp-expert"}
        assert len(list(f.keys())) > 0
    assert json.loads((saved / CONFIG_NAME).read_text())["_class_name"] == "UNet2DConditionModel"


# ------------------------------------------------------------------------------------------------------- errors
def test_missing_folder(tmp_path):
    _expect_error(tmp_path / "no-such-expert", tmp_path / "no-such-expert")


def test_missing_expert_json(expert_copy):
    (expert_copy / EXPERT_NAME).unlink()
    _expect_error(expert_copy, expert_copy / EXPERT_NAME)


def test_invalid_expert_json(expert_copy):
    (expert_copy / EXPERT_NAME).write_text('{"format": "aptp-expert", ')
    error = _expect_error(expert_copy, expert_copy / EXPERT_NAME)
    assert "JSON" in str(error)


def test_invalid_config_json(expert_copy):
    (expert_copy / CONFIG_NAME).write_text("not json")
    _expect_error(expert_copy, expert_copy / CONFIG_NAME)


def test_wrong_format_field(expert_copy):
    _edit_description(expert_copy, format="something-else")
    error = _expect_error(expert_copy, expert_copy / EXPERT_NAME)
    assert "something-else" in str(error)


def test_unsupported_version(expert_copy):
    _edit_description(expert_copy, version=99)
    _expect_error(expert_copy, expert_copy / EXPERT_NAME)


def test_missing_weights(expert_copy):
    (expert_copy / WEIGHTS_NAME).unlink()
    _expect_error(expert_copy, expert_copy / WEIGHTS_NAME)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_weights(expert_copy, verify):
    weights = expert_copy / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    error = _expect_error(expert_copy, weights, verify=verify)
    assert ("checksum" in str(error)) == verify


@pytest.mark.parametrize("size", [0, 5])
def test_weights_without_a_header(expert_copy, size):
    weights = expert_copy / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:size])
    _expect_error(expert_copy, weights, verify=False)


def test_corrupted_weights_fail_the_checksum(expert_copy):
    weights = expert_copy / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-100:-50] = bytes(50)  # inside the tensor data: still a well-formed safetensors file
    weights.write_bytes(bytes(data))
    error = _expect_error(expert_copy, weights, verify=True)
    assert "checksum" in str(error)


def test_weights_of_a_different_architecture(tmp_path, small_unet, small_space, arch):
    # Same depth gates (so the same tensor names), different widths: only the shapes differ.
    other = small_space.random(0.5, 1)
    other[small_space.width_dim :] = arch[small_space.width_dim :]
    assert not torch.equal(other, arch)
    a = save_expert(slice_unet(small_unet, small_space, arch), small_space, arch, tmp_path / "a")
    b = save_expert(slice_unet(small_unet, small_space, other), small_space, other, tmp_path / "b")
    shutil.copyfile(b / WEIGHTS_NAME, a / WEIGHTS_NAME)
    description = json.loads((a / EXPERT_NAME).read_text())
    description["weights"]["sha256"] = file_sha256(a / WEIGHTS_NAME)
    (a / EXPERT_NAME).write_text(json.dumps(description))
    error = _expect_error(a, a / WEIGHTS_NAME)
    message = str(error)
    assert "tensor " in message and "shape" in message
    name = message.split("tensor ")[1].split(" ")[0]
    with safe_open(str(a / WEIGHTS_NAME), framework="pt") as f:
        names = list(f.keys())
        assert name in names
        assert str(tuple(f.get_slice(name).get_shape())) in message


def test_keep_sets_with_unknown_unit(expert_copy):
    description = json.loads((expert_copy / EXPERT_NAME).read_text())
    description["keep_sets"]["resnet:down_blocks.9.resnets.0"] = [0]
    (expert_copy / EXPERT_NAME).write_text(json.dumps(description))
    error = _expect_error(expert_copy, expert_copy / EXPERT_NAME)
    assert "down_blocks.9" in str(error)


def test_keep_sets_missing(expert_copy):
    description = json.loads((expert_copy / EXPERT_NAME).read_text())
    del description["keep_sets"]
    (expert_copy / EXPERT_NAME).write_text(json.dumps(description))
    _expect_error(expert_copy, expert_copy / EXPERT_NAME)


def test_plain_load_logs_no_dtype_warning(saved, caplog):
    caplog.clear()
    load_expert(saved)
    assert "should be kept in float32" not in caplog.text
