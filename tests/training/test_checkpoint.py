"""Training checkpoints (safetensors + JSON, no pickle): exact resumption, atomic replacement, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from training.checkpoint import STATE, TENSORS, latest_checkpoint, load_checkpoint, save_checkpoint

STATE_DICT = {"step": 3, "elapsed_seconds": 1.5, "notes": ["a", "b"], "nested": {"best": 0.25, "flag": True}}


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> None:
    """Steps whose data depend only on the step number (as in the teacher's loop)."""
    model.train()
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def trained(tmp_path):
    """A model and AdamW after 3 steps, and a checkpoint of them (with an extra tensor dict) in `tmp_path`."""
    model = _model(0)
    optimizer = _optimizer(model)
    _train(model, optimizer, range(3))
    extra = {"shadow": torch.arange(6.0).reshape(2, 3), "count": torch.tensor([7])}
    folder = tmp_path / "run" / "checkpoint"
    save_checkpoint(folder, {"model": model, "extra": extra}, optimizer, STATE_DICT)
    return model, optimizer, extra, folder


def test_resumed_training_is_bit_identical_to_uninterrupted_training(trained):
    model, optimizer, extra, folder = trained
    _train(model, optimizer, range(3, 5))
    expected = _params(model)

    restored = _model(1)  # different initial weights, fresh optimizer state
    restored_optimizer = _optimizer(restored)
    restored_extra = {"shadow": torch.zeros(2, 3), "count": torch.zeros(1, dtype=torch.int64)}
    state = load_checkpoint(folder, {"model": restored, "extra": restored_extra}, restored_optimizer)
    _train(restored, restored_optimizer, range(3, 5))

    assert state == STATE_DICT
    assert torch.equal(restored_extra["shadow"], extra["shadow"]) and int(restored_extra["count"]) == 7
    actual = _params(restored)
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    # the optimizer's own hyper-parameters came back too
    assert restored_optimizer.param_groups[0]["weight_decay"] == 0.1
    assert tuple(restored_optimizer.param_groups[0]["betas"]) == (0.8, 0.95)


def test_load_without_optimizer_restores_the_modules(trained):
    model, _, _, folder = trained
    restored = _model(1)
    load_checkpoint(folder, {"model": restored, "extra": {}}, None)
    for name, value in _params(model).items():
        assert torch.equal(restored.state_dict()[name], value)


def test_checkpoint_files_are_safetensors_and_json(trained):
    folder = trained[3]
    assert sorted(p.name for p in folder.iterdir()) == sorted([TENSORS, STATE])
    assert json.loads((folder / STATE).read_text())["state"] == STATE_DICT


def test_saving_again_replaces_the_checkpoint(trained):
    model, optimizer, extra, folder = trained
    _train(model, optimizer, range(3, 4))
    save_checkpoint(folder, {"model": model, "extra": extra}, optimizer, {"step": 4})
    restored = _model(1)
    state = load_checkpoint(folder, {"model": restored, "extra": {}}, _optimizer(restored))
    assert state == {"step": 4}
    assert torch.equal(restored[0].weight, model[0].weight)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["checkpoint"]  # no .tmp / .old left behind


def test_a_leftover_temporary_folder_does_not_break_saving(trained):
    model, optimizer, extra, folder = trained
    leftover = folder.with_name(folder.name + ".tmp")
    leftover.mkdir()
    (leftover / TENSORS).write_bytes(b"half-written")
    save_checkpoint(folder, {"model": model, "extra": extra}, optimizer, {"step": 9})
    assert load_checkpoint(folder, {"model": _model(1), "extra": {}}, None) == {"step": 9}
    assert not leftover.exists()


def test_latest_checkpoint(tmp_path, trained):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert latest_checkpoint(empty) is None
    assert latest_checkpoint(tmp_path / "no-such-run") is None
    folder = trained[3]
    assert latest_checkpoint(folder.parent) == folder


def test_a_kill_between_the_renames_keeps_a_loadable_checkpoint(trained, monkeypatch):
    model, optimizer, extra, folder = trained
    original_rename = Path.rename

    def killed_before_the_new_checkpoint_lands(self, target):
        if self.name.endswith(".tmp"):
            raise KeyboardInterrupt("killed")
        return original_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_new_checkpoint_lands)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, {"model": model, "extra": extra}, optimizer, {"step": 4})
    monkeypatch.undo()
    found = latest_checkpoint(folder.parent)
    assert found is not None
    assert load_checkpoint(found, {"model": _model(1), "extra": {}}, None)["step"] in (3, 4)


def test_loading_a_missing_folder_raises_value_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "checkpoint"
    with pytest.raises(ValueError, match=str(missing)):
        load_checkpoint(missing, {"model": _model(0)}, None)


def test_loading_invalid_state_json_raises_value_error_naming_the_folder(trained):
    folder = trained[3]
    (folder / STATE).write_text("{not json")
    with pytest.raises(ValueError, match=str(folder)):
        load_checkpoint(folder, {"model": _model(1)}, None)


@pytest.mark.parametrize("corruption", ["garbage", "truncated"])
def test_loading_a_corrupt_tensors_file_raises_value_error_naming_the_folder(trained, corruption):
    folder = trained[3]
    path = folder / TENSORS
    data = path.read_bytes()
    path.write_bytes(b"not a safetensors file" * 4 if corruption == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(folder)):
        load_checkpoint(folder, {"model": _model(1)}, None)


def test_loading_into_a_tensor_dict_with_unknown_names_raises(trained):
    folder = trained[3]
    with pytest.raises(ValueError, match="lacks extra tensors"):
        load_checkpoint(folder, {"model": _model(1), "extra": {"missing": torch.zeros(1)}}, None)
