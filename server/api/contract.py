"""The OpenAPI document as the contract the server keeps: every error status a route can answer, the limits an
operator set (steps, images, prompt length) as schema bounds, and bearer auth only when API keys are configured."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..schemas import SEED_MAX, ErrorResponse, OpenAIErrorResponse
from ..settings import Settings


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route that can answer `statuses`, each with its body's schema (OpenAI's error shape on the
    OpenAI route)."""
    reasons = {
        400: "A body that cannot be read (not UTF-8 JSON); on the OpenAI route, any invalid field (its error shape)",
        401: "Missing or invalid API key (only with APTP_API_KEYS)",
        413: "Request body over max_body_bytes",
        422: "Invalid field: the message names it",
        429: "Every queue the request could take is full; Retry-After and retry-after-ms say how long to wait",
        500: "The batch holding the request failed; the message says why",
        503: "Loading or draining: not accepting work",
        504: "Queued longer than request_timeout_s and dropped",
    }
    model = OpenAIErrorResponse if openai else ErrorResponse
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": model, "description": reasons[status]}
        if status in RETRY_STATUSES:
            responses[status]["headers"] = RETRY_HEADERS
    return responses


RETRY_STATUSES = (429, 503)
# `server.api.errors.retry_headers`
RETRY_HEADERS = {
    "Retry-After": {"description": "Seconds to wait before retrying (rounded up)", "schema": {"type": "integer"}},
    "retry-after-ms": {"description": "The same wait in milliseconds", "schema": {"type": "integer"}},
}


GENERATION_ERRORS = error_responses(400, 401, 413, 422, 429, 500, 503, 504)
OPENAI_ERRORS = error_responses(400, 401, 413, 429, 500, 503, 504, openai=True)


def _bound(schema: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` on a property's schema, or on its non-null branch when it is optional (`anyOf`)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") in ("integer", "number", "string"):
            branch[key] = value


def install_contract(app: FastAPI, settings: Settings) -> None:
    """The document states the operator's limits, and once the bundle is loaded its own (the image size, the
    cheapest code's cost as the least `max_macs_ratio`); it is kept once it can state everything."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            pipeline = app.state.aptp.pipeline
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            models = schema.get("components", {}).get("schemas", {})
            images = settings.max_images_per_request
            limits = {
                "GenerateRequest": {"steps": settings.max_steps, "num_images": images},
                "OpenAIImageRequest": {"steps": settings.max_steps, "n": images},
            }
            for model, fields in limits.items():
                properties = models.get(model, {}).get("properties", {})
                for name, maximum in fields.items():
                    _bound(properties[name], "maximum", maximum)
                # image i takes seed + i, and every seed stays below 2^63
                _bound(properties["seed"], "maximum", SEED_MAX - images + 1)
                for name in ("prompt", "negative_prompt"):
                    if name in properties:
                        _bound(properties[name], "maxLength", settings.max_prompt_chars)
                if pipeline is not None:
                    cheapest = min(info.macs for info in pipeline.codes) / pipeline.teacher_macs
                    _bound(properties["max_macs_ratio"], "minimum", cheapest)
                    properties["max_macs_ratio"].pop("exclusiveMinimum", None)
                    for branch in properties["max_macs_ratio"].get("anyOf", []):
                        branch.pop("exclusiveMinimum", None)
            route = models.get("RouteRequest", {}).get("properties", {}).get("prompts", {})
            route.get("items", {})["maxLength"] = settings.max_prompt_chars
            if pipeline is not None:
                size = models.get("OpenAIImageRequest", {}).get("properties", {}).get("size", {})
                _bound(size, "enum", [f"{pipeline.resolution}x{pipeline.resolution}"])
            if not settings.api_keys:  # nothing to authenticate: say so
                schema.get("components", {}).pop("securitySchemes", None)
                for operations in schema.get("paths", {}).values():
                    for operation in operations.values():
                        operation.pop("security", None)
                        operation.get("responses", {}).pop("401", None)
            if pipeline is None:  # loading: the bundle's own bounds come later
                return schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
