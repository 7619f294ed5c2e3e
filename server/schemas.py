"""Request and response bodies. Static limits live here; limits an operator sets (steps, images per request, prompt
length) are checked against `Settings` in the routes, with the same 422 error shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict

SEED_MAX = 2**63 - 1
NOT_BLANK = r"\S"  # holds a character that is not whitespace
PromptText = Annotated[str, Field(min_length=1, pattern=NOT_BLANK)]


def seed_problem(seed: int | None, num_images: int) -> str | None:
    """Why image seeds `seed, seed + 1, ...` cannot all be used (image i takes seed + i), or None."""
    if seed is not None and seed + num_images - 1 > SEED_MAX:
        return f"seed + number of images must stay below {SEED_MAX}"
    return None


def _integral_float_as_int(value: Any) -> Any:
    """JSON Schema counts 2.0 as an integer; Python does not. Only that float is let through, as the int it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def whole_number(**bounds: int) -> Any:
    """An integer field as JSON Schema means it: 2 and 2.0, never "2", true or 2.5 (no coercion of strings or
    booleans), within `bounds` (`ge`, `le`). The float is turned into an int before the strict check, so the
    bounds stay the schema's `minimum` and `maximum`."""
    return Annotated[int, Strict(), Field(**bounds), BeforeValidator(_integral_float_as_int)]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: PromptText = Field(description="What to draw (not only whitespace).")
    negative_prompt: str | None = Field(None, description="What to steer away from (replaces the empty prompt).")
    num_images: whole_number(ge=1) = Field(1, description="Images to generate; image i uses seed + i.")
    steps: whole_number(ge=1) | None = Field(None, description="Sampling steps (default: the bundle's).")
    guidance_scale: float | None = Field(None, ge=1.0, le=50.0, description="Classifier-free guidance scale.")
    seed: whole_number(ge=0, le=SEED_MAX) | None = Field(None, description="Seed of the first image (default: random).")
    max_macs_ratio: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Cap on the MACs of one U-Net call, as a fraction of the teacher's: the router's most preferred "
        "code within it serves the request (422 when no code is that cheap; the least accepted is the cheapest code's "
        "cost, in the document the server serves).",
    )
    quality: Literal["fast", "balanced", "best"] | None = Field(
        None,
        description="A named budget among the codes within `max_macs_ratio` (all of them without it): `fast` is the "
        "cheapest, `balanced` the router's choice (the default), `best` the costliest.",
    )


class GeneratedImage(BaseModel):
    b64_png: str
    seed: int


class GenerationReport(BaseModel):
    """Where the request went and what it cost."""

    code: int = Field(description="The architecture code (expert) that served the request.")
    requested_code: int = Field(
        description="The code the router chose within the request's budget; another `code` means `degraded`."
    )
    degraded: bool = Field(
        description="Served by a cheaper code than `requested_code` because that code's queue was past its share "
        "of the places (only when the server is set to degrade: `APTP_DEGRADE_WHEN_FULL`)."
    )
    router_score: float = Field(description="Similarity of the prompt's predicted architecture to the code's.")
    macs_per_call: int = Field(description="MACs of one U-Net call of the code (batch 1, one guidance branch).")
    teacher_macs_per_call: int = Field(description="MACs of one call of the unpruned U-Net.")
    unet_calls_per_image: int = Field(description="Steps, doubled when the batch ran classifier-free guidance.")
    text_adapter_macs: int = Field(
        description="MACs of the teacher's text adapter on this request's prompt (and negative prompt): once per "
        "request, not per step; 0 when the model has no adapter."
    )
    text_encoder_macs: int = Field(
        description="MACs of the model's text encoder on this request's prompt (and negative prompt): a pipeline's "
        "CLIP text encoder; 0 for the embedded domain's frozen sentence encoder, which is not counted."
    )
    decoder_macs: int = Field(description="MACs of decoding this request's images (the VAE decoder; 0 in pixel space).")
    total_macs: int = Field(
        description="MACs spent on this request: its images' U-Net calls, text encoding and adapter, and decoding."
    )
    steps: int
    guidance_scale: float
    seeds: list[int]
    batch_images: int = Field(description="Images in the batch this request was computed in.")
    router_seconds: float = Field(description="Encoding and routing this request's prompts (its routing batch).")
    encode_seconds: float = Field(
        description="Of router_seconds, encoding the prompts, which the U-Net's conditioning needs routed or not; "
        "the rest chose the code."
    )
    queue_seconds: float
    compute_seconds: float = Field(description="Duration of the whole batch.")
    total_seconds: float = Field(description="From arrival to answer.")


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]
    report: GenerationReport


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[PromptText] = Field(min_length=1, max_length=256)


class RouteDecision(BaseModel):
    prompt_index: int
    code: int
    score: float
    macs_per_call: int
    macs_ratio: float = Field(description="macs_per_call / teacher_macs_per_call.")


class RouteResponse(BaseModel):
    routes: list[RouteDecision]
    teacher_macs_per_call: int
    router_seconds: float


class CodeDescription(BaseModel):
    code: int
    macs_per_call: int
    macs_ratio: float
    params: int
    training_share: float
    completed_batches_avg_seconds: float | None = Field(
        description="Moving average duration of this code's batches (None until one has run)."
    )
    queued_requests: int


class CodesResponse(BaseModel):
    source: Literal["bundle", "teacher", "pipeline"]
    resolution: int = Field(description="Image size in pixels.")
    latent_size: int = Field(description="The U-Nets' input size (the image size over the decoder's scale factor).")
    teacher_macs_per_call: int
    text_adapter_macs_per_prompt: int = Field(
        description="MACs of the teacher's text adapter for one prompt, shared by every code (0 without one)."
    )
    text_encoder_macs_per_prompt: int = Field(
        description="MACs of the text encoder for one prompt (a pipeline's CLIP; 0 for the embedded domain's frozen "
        "sentence encoder, which is not counted)."
    )
    decoder_macs_per_image: int = Field(description="MACs of decoding one image (the VAE; 0 in pixel space).")
    default_steps: int
    default_guidance_scale: float
    codes: list[CodeDescription]


# ------------------------------------------------------------------------------------------ OpenAI images API shape
# OpenAI's quality names (and this server's own) -> the compute budget tier they ask for (`GenerateRequest.quality`).
OPENAI_QUALITY = {
    "low": "fast",
    "medium": "balanced",
    "standard": "balanced",
    "auto": "balanced",
    "high": "best",
    "hd": "best",
    "fast": "fast",
    "balanced": "balanced",
    "best": "best",
}
OpenAIQuality = Literal[tuple(OPENAI_QUALITY)]


class OpenAIImageRequest(BaseModel):
    """`POST /v1/images/generations` as OpenAI clients send it; `seed`, `steps`, `guidance_scale` and
    `negative_prompt` are this server's extras (clients pass them as `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: PromptText
    n: whole_number(ge=1) = 1
    size: str | None = Field(None, description="`WxH`; only the model's own resolution is supported.")
    response_format: Literal["b64_json"] = Field("b64_json", description="Only `b64_json` (no image hosting).")
    model: str | None = Field(None, description="Accepted and ignored: the server serves one bundle.")
    quality: OpenAIQuality | None = Field(
        None,
        description="`low`, `medium` or `high` (OpenAI's names; `standard` and `auto` are `medium`, `hd` is `high`), "
        "or this server's `fast`, `balanced`, `best`: the cheapest code, the router's choice, the costliest code.",
    )
    max_macs_ratio: float | None = Field(None, gt=0.0, le=1.0, description="As in `POST /generate`.")
    style: str | None = None
    user: str | None = None
    output_format: Literal["png"] | None = Field(None, description="Only `png`.")
    seed: whole_number(ge=0, le=SEED_MAX) | None = None
    steps: whole_number(ge=1) | None = None
    guidance_scale: float | None = Field(None, ge=1.0, le=50.0)
    negative_prompt: str | None = None


class OpenAIImage(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class OpenAIImageResponse(BaseModel):
    created: int
    data: list[OpenAIImage]
    # Echoed extras (OpenAI clients keep unknown fields on the response object).
    seed: int
    steps: int
    guidance_scale: float
    negative_prompt: str | None
    size: str
    output_format: Literal["png"] = "png"
    aptp: GenerationReport


# ---------------------------------------------------------------------------------------------------- error bodies
class FieldProblem(BaseModel):
    loc: list[str | int] = Field(description='Where: `["body", "<field>"]`.')
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every error of the native routes: a message, or the problems of the fields at fault (422)."""

    detail: str | list[FieldProblem]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(
        description="`invalid_request_error`, `authentication_error`, `rate_limit_error`, `server_error`."
    )
    param: str | None = Field(description="The field at fault, if one is.")
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    """Every error of `/v1/images/generations`, in OpenAI's shape."""

    error: OpenAIErrorDetail
