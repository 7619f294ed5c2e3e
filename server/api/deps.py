"""Dependencies shared by the routes: the server state, and the API-key check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..state import ServerState
from .errors import NOT_READY_RETRY_SECONDS, ApiError, retry_headers

_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_bearer = HTTPBearer(auto_error=False, description="Needed when the server runs with APTP_API_KEYS.")


def get_state(request: Request) -> ServerState:
    return request.app.state.aptp


State = Annotated[ServerState, Depends(get_state)]


def require_api_key(
    state: State, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """With API keys configured, the request needs `Authorization: Bearer <one of them>`."""
    keys = state.settings.api_keys
    if not keys:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401, "missing API key: send `Authorization: Bearer <key>`", headers=_CHALLENGE, reason="unauthorized"
        )
    if not is_api_key(credentials.credentials, keys):
        raise ApiError(401, "invalid API key", headers=_CHALLENGE, reason="unauthorized")


def is_api_key(token: str, keys: list[str]) -> bool:
    """Whether `token` is one of `keys`, compared against every key so the time taken does not reveal which
    prefix matched."""
    given = token.encode()
    return any([secrets.compare_digest(given, key.encode()) for key in keys])  # noqa: C419 - no short-circuit


Authorized = Depends(require_api_key)


def require_loaded(state: ServerState) -> None:
    """503 while the bundle is still loading (the server listens before it is loaded)."""
    if not state.loaded:
        message = "the server is still loading its bundle"
        raise ApiError(503, message, headers=retry_headers(NOT_READY_RETRY_SECONDS), reason="draining")
