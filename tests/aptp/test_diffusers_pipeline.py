"""A user's own Stable Diffusion folder, served as it is: the same conditioning and the same images as diffusers'
`StableDiffusionPipeline` for the same seeds, scheduler and steps, decoded to RGB at the pixel size."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from aptp.pipeline import RoutedPipeline
from scripts.tiny_sd import build_tiny_sd

PROMPTS = ["a red circle", "the blue square in the corner"]


def _diffusers_pipeline(folder):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, local_files_only=True)
    # The same sampler this project builds from the folder's noise schedule.
    reference.scheduler = DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    return reference


@pytest.fixture(scope="module")
def ours(tiny_sd):
    return RoutedPipeline.from_pretrained(tiny_sd)


@pytest.fixture(scope="module")
def reference(tiny_sd):
    return _diffusers_pipeline(tiny_sd)


def _generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_a_pipeline_folder_is_a_one_code_latent_pipeline(ours):
    assert ours.source == "pipeline" and ours.num_codes == 1 and ours.router is None
    assert ours.latent_size == 8 and ours.resolution == 32  # the VAE upsamples 4x
    assert ours.codes[0].macs == ours.teacher_macs > 0
    assert ours.decoder_macs_per_image > ours.teacher_macs  # at this toy size the decoder costs more than a call
    assert ours.text_encoder_macs_per_prompt > 0 and ours.adapter_macs_per_prompt == 0


@torch.no_grad()
def test_conditioning_is_the_pipelines_own_encode_prompt(ours, reference):
    negatives = ["blurry", "a cat"]
    prompt_embeds, negative_embeds = reference.encode_prompt(PROMPTS, "cpu", 1, True, negatives)
    torch.testing.assert_close(ours.encode(PROMPTS).states, prompt_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.encode(negatives).states, negative_embeds, rtol=1e-5, atol=1e-6)
    _, empty_embeds = reference.encode_prompt(PROMPTS[:1], "cpu", 1, True, None)
    torch.testing.assert_close(ours.empty_prompt.states, empty_embeds, rtol=1e-5, atol=1e-6)
    assert ours.encode(PROMPTS).mask is None  # SD's U-Net reads every padded position, as diffusers calls it


@pytest.mark.parametrize("negative", [None, ["blurry", "a cat"]], ids=["no-negative", "negative"])
def test_images_equal_stable_diffusion_pipeline_for_the_same_seeds(ours, reference, negative):
    args = {"negative_prompt": negative, "num_inference_steps": 4, "guidance_scale": 7.5, "num_images_per_prompt": 2}
    mine = ours(PROMPTS, generator=_generators(1, 2, 3, 4), output_type="np", **args)
    theirs = reference(PROMPTS, generator=_generators(1, 2, 3, 4), output_type="np", **args).images
    assert mine.images.shape == theirs.shape == (4, 32, 32, 3)
    # The one-code pipeline is the same model: only float rounding may differ.
    np.testing.assert_allclose(mine.images, theirs, atol=1e-5, rtol=0)
    assert mine.codes == [0, 0]


def test_v_prediction_follows_the_scheduler_config(tmp_path):
    folder = build_tiny_sd(tmp_path / "v", prediction_type="v_prediction", seed=1)
    ours = RoutedPipeline.from_pretrained(folder)
    assert ours.sampler.config.prediction_type == "v_prediction"
    mine = ours("a red circle", num_inference_steps=3, generator=_generators(5), output_type="np").images
    theirs = _diffusers_pipeline(folder)(
        "a red circle", num_inference_steps=3, guidance_scale=7.5, generator=_generators(5), output_type="np"
    ).images
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)


def test_the_python_api_takes_a_string_seeds_and_output_types(ours):
    out = ours("a red circle", seed=7, num_images_per_prompt=2, num_inference_steps=2)
    assert len(out.images) == 2 and all(isinstance(image, Image.Image) for image in out.images)
    assert {image.size for image in out.images} == {(32, 32)} and {image.mode for image in out.images} == {"RGB"}
    again = ours("a red circle", seed=7, num_images_per_prompt=2, num_inference_steps=2, output_type="pt")
    assert again.images.shape == (2, 3, 32, 32) and again.images.min() >= 0 and again.images.max() <= 1
    # The same seeds give the same images whatever the output type.
    pil = np.stack([np.asarray(image) for image in out.images])
    assert np.array_equal(pil, (again.images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8"))
    unet_calls = 2 * 2  # steps, both guidance branches
    expected = (
        2 * unet_calls * out.macs_per_call[0] + ours.text_encoder_macs_per_prompt + 2 * ours.decoder_macs_per_image
    )
    assert out.total_macs == expected
    with pytest.raises(ValueError, match="output_type"):
        ours("a red circle", output_type="latent")
    with pytest.raises(ValueError, match="2 negative prompts for 1 prompts"):
        ours("a red circle", negative_prompt=["a", "b"])


def test_the_embedded_teacher_still_runs_in_pixel_space(teacher_folder):
    pipeline = RoutedPipeline.from_pretrained(teacher_folder)
    assert pipeline.latent_size == pipeline.resolution == 32 and pipeline.decoder_macs_per_image == 0
    out = pipeline(["a red circle"], seed=0, num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_puts_every_component_in_that_dtype(tiny_sd, ours, dtype):
    half = RoutedPipeline.from_pretrained(tiny_sd, dtype=dtype)
    components = [half.experts[0], half.decoder.vae, half.encoder.text_encoder]
    assert {next(module.parameters()).dtype for module in components} == {dtype}
    args = {"seed": 1, "num_inference_steps": 3, "output_type": "np"}
    # Same model in lower precision: close to the float32 images (0.010 bf16 and 0.002 fp16 measured here).
    np.testing.assert_allclose(half("a red circle", **args).images, ours("a red circle", **args).images, atol=0.05)
    assert half.to("cpu") is half and half.device == torch.device("cpu")


def test_a_bundle_cut_from_a_pipeline_carries_its_vae_and_text_encoder(tiny_sd, ours, tmp_path):
    from aptp.formats.bundle import BundleError, read_manifest
    from training.export import random_bundle

    bundle = random_bundle(tiny_sd, tmp_path / "bundle", num_codes=2, keeps=[1.0, 0.5])
    manifest = read_manifest(bundle)
    assert manifest.latent is not None and manifest.latent.vae_scale_factor == 4 and manifest.resolution == 8
    assert {"vae/config.json", "text_encoder/model.safetensors", "tokenizer/tokenizer.json"} <= manifest.files.keys()
    routed = RoutedPipeline.from_pretrained(bundle)  # the bundle folder alone serves
    assert routed.num_codes == 2 and routed.resolution == 32 and routed.latent_size == 8
    assert routed.codes[0].macs == ours.teacher_macs and routed.codes[1].macs < routed.codes[0].macs
    assert routed.decoder_macs_per_image == ours.decoder_macs_per_image
    # The U-Nets read the pipeline's own CLIP states; the router reads its sentence encoder's embedding.
    encoded = routed.encode(PROMPTS)
    torch.testing.assert_close(encoded.states, ours.encode(PROMPTS).states)
    assert encoded.pooled.shape == (2, 384)
    for code in range(2):
        images = routed.generate(code, encoded, [0, 1], 2, [7.5, 7.5])
        assert images.shape == (2, 3, 32, 32) and images.dtype == torch.uint8
    # Code 0 keeps every gate: it is the pipeline's own U-Net, so its images are the pipeline's.
    np.testing.assert_array_equal(
        routed.generate(0, encoded, [5, 6], 3, [7.5, 7.5]).numpy(),
        ours.generate(0, encoded, [5, 6], 3, [7.5, 7.5]).numpy(),
    )
    shutil.rmtree(bundle / "vae")
    with pytest.raises(BundleError, match="vae") as error:
        RoutedPipeline.from_pretrained(bundle)
    assert str(bundle / "vae") in str(error.value)
