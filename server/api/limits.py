"""The request-body limit: a body larger than `max_body_bytes` is refused with 413 before it is parsed, whether it
declares its length or streams it, so an oversized request never costs the event loop a JSON parse."""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, count_rejection, render_error


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
