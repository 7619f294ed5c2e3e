"""`/v1/images/generations` through the official OpenAI Python client, and its error shape."""

from __future__ import annotations

import openai
import pytest

from tests.server.test_api import decode_png


def make_openai(client, api_key: str = "unused") -> openai.OpenAI:
    # The TestClient is an httpx.Client, so the official client talks to the app in-process.
    return openai.OpenAI(base_url="http://testserver/v1", api_key=api_key, http_client=client, max_retries=0)


def test_official_client_generates_and_gets_the_extras_back(client):
    images = make_openai(client).images.generate(
        prompt="a blue triangle",
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 21, "steps": 2, "guidance_scale": 3.0},
    )
    assert len(images.data) == 2
    for item in images.data:
        assert decode_png(item.b64_json).shape == (32, 32, 3)
    returned = images.to_dict()  # declared fields and the extras the client keeps
    assert (returned["seed"], returned["steps"], returned["guidance_scale"]) == (21, 2, 3.0)
    assert returned["size"] == "32x32"
    assert returned["aptp"]["seeds"] == [21, 22]


def test_default_size_and_format(client):
    response = client.post("/v1/images/generations", json={"prompt": "a blue triangle"})
    assert response.status_code == 200
    body = response.json()
    assert len(body["data"]) == 1 and body["size"] == "32x32" and isinstance(body["created"], int)


@pytest.mark.parametrize(
    "extra, param, words",
    [
        ({"size": "1024x1024"}, "size", "32x32"),
        ({"response_format": "url"}, "response_format", "b64_json"),
        ({"output_format": "jpeg"}, "output_format", "png"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"n": 99}, "n", "at most 4 images"),
        ({"steps": 1000}, "steps", "at most 100 steps"),
    ],
)
def test_unsupported_values_answer_400_naming_the_parameter(client, extra, param, words):
    response = client.post("/v1/images/generations", json={"prompt": "a blue triangle", **extra})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert words in error["message"]


def test_official_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="32x32"):
        make_openai(client).images.generate(prompt="a blue triangle", size="1024x1024")


def test_a_body_that_is_not_utf8_json_is_refused_in_openais_shape(client):
    response = client.post("/v1/images/generations", content=b"\xff\xfe{", headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
