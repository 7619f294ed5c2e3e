"""Diffusers pipeline folders: what is not a supported Stable Diffusion folder is refused at load, naming the
component and what is supported, before any weight is read; never served with a wrong image."""

from __future__ import annotations

import json
import shutil

import pytest

from aptp.formats.diffusers import PipelineFileError, check_pipeline_folder, is_pipeline_folder
from aptp.formats.files import ModelFileError
from aptp.pipeline import RoutedPipeline


@pytest.fixture
def copy(tiny_sd, tmp_path):
    return shutil.copytree(tiny_sd, tmp_path / "pipeline")


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_the_tiny_pipeline_is_accepted(tiny_sd):
    assert is_pipeline_folder(tiny_sd)
    assert set(check_pipeline_folder(tiny_sd)) == {"unet", "vae", "text_encoder", "scheduler"}


@pytest.mark.parametrize(
    "edit, named, says",
    [
        (lambda d: d.update(_class_name="StableDiffusionXLPipeline"), "model_index.json", "SDXL"),
        (
            lambda d: d.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"]),
            "model_index.json",
            "text_encoder_2",
        ),
        (lambda d: d.update(text_encoder=["transformers", "T5EncoderModel"]), "text_encoder", "T5EncoderModel"),
        (lambda d: d.update(vae=["diffusers", "AutoencoderTiny"]), "vae", "AutoencoderTiny"),
        (lambda d: d.pop("vae"), "model_index.json", "'vae' is missing"),
    ],
    ids=["sdxl", "second-text-encoder", "t5", "tiny-vae", "no-vae-entry"],
)
def test_unsupported_pipelines_are_refused_naming_the_component(copy, edit, named, says):
    _edit_json(copy / "model_index.json", edit)
    with pytest.raises(PipelineFileError, match="supported") as error:
        RoutedPipeline.from_pretrained(copy)
    assert named in str(error.value) and says in str(error.value)


def test_a_missing_component_folder_is_refused_naming_it(copy):
    shutil.rmtree(copy / "vae")
    with pytest.raises(PipelineFileError, match="vae") as error:
        RoutedPipeline.from_pretrained(copy)
    assert str(copy / "vae") in str(error.value)


def test_pickled_weights_are_never_loaded(copy):
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(PipelineFileError, match="pickle") as error:
        RoutedPipeline.from_pretrained(copy)
    assert str(copy / "unet") in str(error.value)


@pytest.mark.parametrize(
    "component, edit, says",
    [
        ("unet", lambda d: d.update(in_channels=9), "inpainting"),
        ("unet", lambda d: d.update(addition_embed_type="text_time"), "addition_embed_type"),
        ("text_encoder", lambda d: d.update(hidden_size=48), "cross-attention reads 32"),
    ],
    ids=["inpainting-unet", "added-conditioning", "width-mismatch"],
)
def test_unsupported_shapes_are_refused_before_any_weight_is_read(copy, component, edit, says):
    _edit_json(copy / component / "config.json", edit)
    with pytest.raises(PipelineFileError, match=says) as error:
        check_pipeline_folder(copy)
    assert str(copy / component) in str(error.value)


def test_corrupt_weights_are_refused_naming_the_component(copy):
    (copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ModelFileError) as error:
        RoutedPipeline.from_pretrained(copy)
    assert str(copy / "vae") in str(error.value)


def test_a_folder_of_no_known_kind_names_the_files_it_looked_for(tmp_path):
    with pytest.raises(ModelFileError, match="manifest.json.*teacher.json.*model_index.json"):
        RoutedPipeline.from_pretrained(tmp_path)


def test_a_pipeline_folder_is_not_mistaken_for_a_teacher_folder(tiny_sd):
    from aptp.formats.teacher import TeacherFileError, load_teacher

    with pytest.raises(TeacherFileError, match="diffusers pipeline folder, not a teacher folder"):
        load_teacher(tiny_sd)


def test_a_teacher_folder_around_a_latent_unet_is_refused_not_served_as_latents(tiny_sd, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from aptp.cli.main import main
    from aptp.formats.teacher import TeacherFileError, save_teacher
    from tests.helpers import tiny_teacher_spec

    unet = UNet2DConditionModel.from_pretrained(tiny_sd / "unet")  # 4 latent channels in and out
    folder = save_teacher(unet, tiny_teacher_spec(resolution=8), tmp_path / "teacher")
    with pytest.raises(TeacherFileError, match="makes 4 channels.*serve its diffusers pipeline folder"):
        RoutedPipeline.from_pretrained(folder)
    assert main(["generate", "a red circle", "--bundle", str(folder), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "unet/config.json" in err and "Traceback" not in err
