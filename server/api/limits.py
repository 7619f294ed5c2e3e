"""Refusals at the door, before a request costs the event loop a JSON parse: the request-body limit (a body larger
than `max_body_bytes` is refused with 413, whether it declares its length or streams it), and admission (a
generation request arriving while the server cannot admit any is refused, 429 or 503, before its body is read)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .deps import is_api_key
from .errors import ApiError, count_rejection, render_error
from .generation import check_admission


class BodySizeLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes` (the error in each API family's shape)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received, refused = 0, False

        async def counted() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a streamed body went over: answer now, end the route's read
                    refused = True
                    await self._refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted, unless_refused)
        except Exception:
            if not refused:
                raise  # the route's own failure; after a refusal, whatever the cut-off read raised is moot

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        error = ApiError(413, f"request body over {self.max_bytes} bytes", reason="body_too_large")
        count_rejection(request, error.reason)
        await render_error(request, error)(scope, receive, send)


GENERATION_PATHS = frozenset({"/generate", "/v1/images/generations"})


class AdmissionDoor:
    """ASGI middleware: a generation request that `check_admission` would refuse whatever its body says is refused
    before the body is read or validated, so a burst past capacity is answered at the cost of its headers alone.
    A request the API keys would refuse passes on, to be answered 401 by the route."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in GENERATION_PATHS:
            state = scope["app"].state.aptp
            keys = state.settings.api_keys
            authorization = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = authorization.partition(" ")
            if not keys or (scheme.lower() == "bearer" and is_api_key(token, keys)):
                try:
                    check_admission(state)
                except ApiError as error:
                    request = Request(scope)
                    count_rejection(request, error.reason)
                    await render_error(request, error)(scope, receive, send)
                    return
        await self.app(scope, receive, send)
