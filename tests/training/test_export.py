"""`export_bundle` / `random_bundle`: the bundle folder is replaced as a whole, given experts and training shares
are what gets written, and random bundles are reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aptp.formats.bundle import MANIFEST, load_bundle_text_adapter, load_code_experts, read_manifest
from pruning import ArchitectureSpace, slice_unet
from router.gates import depth_order
from router.model import Router, RouterConfig
from tests.helpers import ENCODER_MAX_LENGTH, run, save_tiny_teacher, unet_inputs
from training.export import export_bundle, random_bundle

RESOLUTION = 32


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_export_replaces_an_existing_folder(teacher_folder, tmp_path):
    out = tmp_path / "bundle"
    (out / "experts" / "7").mkdir(parents=True)
    (out / "stale.txt").write_text("from an older export")
    (out / "experts" / "7" / "old.safetensors").write_bytes(b"old")
    assert random_bundle(teacher_folder, out, num_codes=2) == out
    assert not (out / "stale.txt").exists() and not (out / "experts" / "7").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no `bundle.tmp` left behind
    manifest = read_manifest(out)
    assert set(manifest.files) | {MANIFEST} == _files(out)  # every file is the new export's
    assert manifest.num_codes == 2


def test_export_ignores_a_leftover_tmp_folder(teacher_folder, tmp_path):
    out = tmp_path / "bundle"
    (tmp_path / "bundle.tmp" / "junk").mkdir(parents=True)
    (tmp_path / "bundle.tmp" / "junk" / "x.bin").write_bytes(b"junk")
    random_bundle(teacher_folder, out, num_codes=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert not any("junk" in name for name in _files(out))
    read_manifest(out)


def test_a_failed_export_leaves_the_previous_bundle_intact(teacher_folder, teacher, tmp_path):
    out = random_bundle(teacher_folder, tmp_path / "bundle", num_codes=2)
    before = read_manifest(out)
    unet, spec, _ = teacher
    router = Router.load(out / "router")
    with pytest.raises(IndexError):
        export_bundle(out, unet, spec, router, experts=[])  # no expert for code 0
    assert read_manifest(out) == before


def _router(space: ArchitectureSpace, encoder: dict, archs: torch.Tensor) -> Router:
    torch.manual_seed(0)
    router = Router(RouterConfig(num_codes=len(archs), encoder=encoder), space, RESOLUTION)
    router.codes.set_architectures(archs)
    return router


def _nested(space: ArchitectureSpace, keep: float, seed: int, depth_kept: int) -> torch.Tensor:
    arch = space.random(keep, seed=seed)
    depth = torch.zeros(len(space.depth_units))
    depth[depth_order(space)[:depth_kept]] = 1.0
    arch[space.width_dim :] = depth
    return arch


def test_export_writes_the_given_experts_and_shares(teacher, tmp_path):
    """Fine-tuned experts (here: slices with perturbed weights) are written as given, not re-sliced."""
    unet, spec, space = teacher
    archs = torch.stack([_nested(space, 0.8, 1, 8), _nested(space, 0.5, 2, 4)])
    router = _router(space, spec.text_encoder, archs)
    experts = []
    for k, arch in enumerate(archs):
        expert = slice_unet(unet, space, arch)
        with torch.no_grad():
            for parameter in expert.parameters():
                parameter.add_(0.01 * (k + 1))
        experts.append(expert)
    out = export_bundle(
        tmp_path / "bundle", unet, spec, router, experts=experts, training_shares=[0.75, 0.25], info={"run": "x"}
    )
    manifest = read_manifest(out)
    assert [c.training_share for c in manifest.codes] == [0.75, 0.25]
    assert manifest.info == {"run": "x"}
    assert [c.architecture_tensor() for c in manifest.codes][1].tolist() == archs[1].tolist()
    assert [c.params for c in manifest.codes] == [sum(p.numel() for p in e.parameters()) for e in experts]
    inputs = unet_inputs(unet, batch=2, resolution=RESOLUTION, text_len=ENCODER_MAX_LENGTH)
    for loaded, given, arch in zip(load_code_experts(out, manifest), experts, archs, strict=True):
        assert (run(loaded, inputs) - run(given, inputs)).abs().max().item() < 1e-5
        assert (run(loaded, inputs) - run(slice_unet(unet, space, arch), inputs)).abs().max().item() > 1e-4


def test_random_bundle_keeps_and_nested_depth(teacher_folder, teacher, tmp_path):
    _, _, space = teacher
    keeps = [0.9, 0.5]
    out = random_bundle(teacher_folder, tmp_path / "bundle", num_codes=2, keeps=keeps, seed=3)
    manifest = read_manifest(out)
    assert manifest.info == {"kind": "random-codes", "keeps": keeps, "seed": 3}
    order = depth_order(space)
    for entry, keep in zip(manifest.codes, keeps, strict=True):
        arch = entry.architecture_tensor()
        kept = max(1, round(keep * len(order)))
        assert arch[space.width_dim :][order].tolist() == [1.0] * kept + [0.0] * (len(order) - kept)
        width = arch[: space.width_dim].mean().item()
        assert width == pytest.approx(keep, abs=0.12)  # each width gate kept with probability `keep`
    # The router serves with the teacher's text encoder, token length and resolution.
    description = json.loads((out / "router" / "config.json").read_text())
    expected = {"name": "all-MiniLM-L6-v2", "max_length": ENCODER_MAX_LENGTH, "layers": [-1]}
    assert description["router"]["encoder"] == expected
    assert description["space"]["text_len"] == ENCODER_MAX_LENGTH
    assert description["resolution"] == RESOLUTION


def test_random_bundle_is_reproducible(teacher_folder, tmp_path):
    first = read_manifest(random_bundle(teacher_folder, tmp_path / "a", num_codes=2, seed=5))
    second = read_manifest(random_bundle(teacher_folder, tmp_path / "b", num_codes=2, seed=5))
    other = read_manifest(random_bundle(teacher_folder, tmp_path / "c", num_codes=2, seed=6))
    assert first.files == second.files  # byte-identical files
    assert [c.architecture for c in first.codes] == [c.architecture for c in second.codes]
    assert [c.architecture for c in first.codes][1] != [c.architecture for c in other.codes][1]


def test_cli_export_from_a_router_and_a_phase2_run(teacher_folder, tmp_path, capsys):
    from aptp.cli.main import main
    from aptp.formats.expert import save_expert

    source = random_bundle(teacher_folder, tmp_path / "source", num_codes=2, keeps=[1.0, 0.5])
    router = Router.load(source / "router")
    # A phase-2 run folder: one expert per code and the routing of its training prompts.
    run_dir = tmp_path / "finetune-run"
    experts = load_code_experts(source, read_manifest(source))
    for code, (expert, arch) in enumerate(zip(experts, router.code_architectures(), strict=True)):
        save_expert(expert, router.space, arch, run_dir / "experts" / str(code))
    (run_dir / "routing.json").write_text(json.dumps({"seed": 0, "codes": [0, 1, 1, 1]}))
    (run_dir / "config.json").write_text(json.dumps({"expert": {"steps": 150}, "shared_steps": 1800}))

    out = tmp_path / "exported"
    args = ["export", "--teacher", teacher_folder, "--router", source / "router", "--experts", run_dir, "--out", out]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    manifest = read_manifest(out)
    assert [c.training_share for c in manifest.codes] == [0.25, 0.75]
    assert manifest.info["steps_per_code"] == 150 and manifest.info["shared_steps"] == 1800
    assert [c.macs for c in manifest.codes] == [c.macs for c in read_manifest(source).codes]

    (run_dir / "experts" / "1" / "expert.json").unlink()  # phase 2 not finished for code 1
    assert main([str(a) for a in [*args[:-1], tmp_path / "again"]]) == 2
    err = capsys.readouterr().err
    assert str(run_dir / "experts" / "1") in err and "phase 2" in err
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------------------------------------------- text adapter
def test_a_teachers_text_adapter_travels_in_the_bundle(tmp_path):
    from aptp.formats.teacher import load_teacher, load_text_adapter

    teacher_folder = save_tiny_teacher(tmp_path / "teacher", adapter_width=16)
    out = random_bundle(teacher_folder, tmp_path / "bundle", num_codes=2)
    manifest = read_manifest(out)
    adapter = load_text_adapter(teacher_folder)
    assert manifest.text_adapter == adapter.config == load_teacher(teacher_folder)[1].text_adapter
    assert {"text_adapter/config.json", "text_adapter/model.safetensors"} <= manifest.files.keys()
    exported = load_bundle_text_adapter(out, manifest)
    assert exported.state_dict().keys() == adapter.state_dict().keys()
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in adapter.state_dict().items())

    unet, spec = load_teacher(teacher_folder)
    router = Router.load(out / "router")
    with pytest.raises(ValueError, match="text adapter"):
        export_bundle(tmp_path / "without", unet, spec, router)  # the experts would read states nobody produces


def test_the_adapter_is_stored_in_half_precision_only_when_that_is_exact(tmp_path):
    """A teacher exported in half precision gives its adapter to the bundle in half precision (half the bytes); an
    adapter whose weights half precision would round is kept in float32, so the experts read what they trained on."""
    from safetensors import safe_open

    from aptp.formats.teacher import load_teacher, load_text_adapter

    teacher_folder = save_tiny_teacher(tmp_path / "teacher", adapter_width=16)
    unet, spec = load_teacher(teacher_folder)
    router = Router.load(random_bundle(teacher_folder, tmp_path / "random", num_codes=2) / "router")
    full = load_text_adapter(teacher_folder)  # stored in float32 by the tiny teacher: not exact in half precision
    rounded = load_text_adapter(teacher_folder)
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.half().float())
    for adapter, stored in [(full, torch.float32), (rounded, torch.float16)]:
        out = export_bundle(
            tmp_path / str(stored), unet, spec, router, storage_dtype=torch.float16, text_adapter=adapter
        )
        with safe_open(out / "text_adapter" / "model.safetensors", "pt") as weights:
            dtypes = {weights.get_tensor(k).dtype for k in weights.keys()}  # noqa: SIM118 - not a dict
            assert dtypes == {stored}
        exported = load_bundle_text_adapter(out, read_manifest(out))
        assert all(torch.equal(exported.state_dict()[k], v) for k, v in adapter.state_dict().items())


def test_a_teacher_without_an_adapter_exports_none(teacher_folder, tmp_path):
    manifest = read_manifest(random_bundle(teacher_folder, tmp_path / "bundle", num_codes=2))
    assert manifest.text_adapter is None and not any(f.startswith("text_adapter/") for f in manifest.files)
