"""The OpenAPI document as the contract the server keeps: every error status a route can answer, the limits an
operator set (steps, images, prompt length) as schema bounds, and bearer auth only when API keys are configured."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ..settings import Settings

_ERROR = {"description": "", "content": {"application/json": {"schema": {"type": "object"}}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route that can answer `statuses`."""
    reasons = {
        400: "Invalid field (OpenAI's error shape)",
        401: "Missing or invalid API key (only with APTP_API_KEYS)",
        413: "Request body over max_body_bytes",
        422: "Invalid field: the message names it",
        429: "Every queue the request could take is full; Retry-After gives seconds to wait",
        500: "The batch holding the request failed; the message says why",
        503: "Loading or draining: not accepting work",
        504: "Queued longer than request_timeout_s and dropped",
    }
    return {status: {**_ERROR, "description": reasons[status]} for status in statuses}


GENERATION_ERRORS = error_responses(401, 413, 422, 429, 500, 503, 504)
OPENAI_ERRORS = error_responses(400, 401, 413, 429, 500, 503, 504)


def _bound(schema: dict[str, Any], key: str, value: int) -> None:
    """Set `key` on a property's schema, or on its non-null branch when it is optional (`anyOf`)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") in ("integer", "string"):
            branch[key] = value


def install_contract(app: FastAPI, settings: Settings) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            models = schema.get("components", {}).get("schemas", {})
            limits = {
                "GenerateRequest": {"steps": settings.max_steps, "num_images": settings.max_images_per_request},
                "OpenAIImageRequest": {"steps": settings.max_steps, "n": settings.max_images_per_request},
            }
            for model, fields in limits.items():
                properties = models.get(model, {}).get("properties", {})
                for name, maximum in fields.items():
                    _bound(properties[name], "maximum", maximum)
                for name in ("prompt", "negative_prompt"):
                    if name in properties:
                        _bound(properties[name], "maxLength", settings.max_prompt_chars)
            if not settings.api_keys:  # nothing to authenticate: say so
                schema.get("components", {}).pop("securitySchemes", None)
                for operations in schema.get("paths", {}).values():
                    for operation in operations.values():
                        operation.pop("security", None)
                        operation.get("responses", {}).pop("401", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
