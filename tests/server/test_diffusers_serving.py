"""A diffusers Stable Diffusion folder served as it is: decoded RGB images of the pixel size through `/generate`,
the OpenAI client and a real `aptp serve` process, with the VAE's and text encoder's MACs in the report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from tests.helpers import free_port, wait_until_ready
from tests.server.conftest import server_settings
from tests.server.test_api import decode_png


@pytest.fixture(scope="module")
def sd_pipeline(tiny_sd):
    from aptp.pipeline import RoutedPipeline

    return RoutedPipeline.from_pretrained(tiny_sd)


@pytest.fixture
def sd_client(tiny_sd, sd_pipeline):
    from server.app import create_app

    with TestClient(create_app(server_settings(tiny_sd), sd_pipeline)) as client:
        yield client


def test_generate_answers_decoded_rgb_images_of_the_pixel_size(sd_client, sd_pipeline):
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 3, "num_images": 2, "steps": 2}
    response = sd_client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    payload = response.json()
    images = [decode_png(image["b64_png"]) for image in payload["images"]]
    assert [image.shape for image in images] == [(32, 32, 3)] * 2  # pixels, not the 8x8 4-channel latent
    assert not np.array_equal(images[0], images[1])  # two seeds, two images
    report = payload["report"]
    assert report["decoder_macs"] == 2 * sd_pipeline.decoder_macs_per_image > 0
    assert report["text_encoder_macs"] == 2 * sd_pipeline.text_encoder_macs_per_prompt > 0  # prompt + negative
    unet = report["macs_per_call"] * report["unet_calls_per_image"] * 2
    assert report["total_macs"] == unet + report["decoder_macs"] + report["text_encoder_macs"]
    # The same request through the Python API gives the same pixels.
    out = sd_pipeline(
        "a red circle",
        negative_prompt="blurry",
        seed=3,
        num_images_per_prompt=2,
        num_inference_steps=2,
        guidance_scale=sd_pipeline.default_guidance_scale,
    )
    assert np.array_equal(np.asarray(out.images[0]), images[0])


def test_codes_state_every_cost_and_the_latent_size(sd_client, sd_pipeline):
    codes = sd_client.get("/v1/codes").json()
    assert codes["source"] == "pipeline" and codes["resolution"] == 32 and codes["latent_size"] == 8
    assert codes["decoder_macs_per_image"] == sd_pipeline.decoder_macs_per_image
    assert codes["text_encoder_macs_per_prompt"] == sd_pipeline.text_encoder_macs_per_prompt
    assert codes["default_guidance_scale"] == 7.5


def test_the_openai_size_is_the_pixel_size(sd_client):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=sd_client, max_retries=0)
    result = client.images.generate(prompt="a blue square", size="32x32", extra_body={"seed": 1, "steps": 2})
    assert decode_png(result.data[0].b64_json).shape == (32, 32, 3)
    with pytest.raises(openai.BadRequestError, match="makes 32x32 images only"):
        client.images.generate(prompt="a blue square", size="8x8")


def test_aptp_serve_on_a_pipeline_folder_answers_the_openai_client(tiny_sd):
    port = free_port()
    env = {**os.environ, "APTP_PORT": str(port), "APTP_DEFAULT_STEPS": "2", "APTP_THREADS": "1"}
    command = [sys.executable, "-m", "aptp.cli.main", "serve", "--bundle", str(tiny_sd)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(process, url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        result = client.images.generate(prompt="a red circle", size="32x32", extra_body={"seed": 2})
        assert decode_png(result.data[0].b64_json).shape == (32, 32, 3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "pipeline" in process.stdout.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
