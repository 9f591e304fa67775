"""Request bodies over ``--max-request-mb``: refused with 413 in OpenAI's error body, by Content-Length before the
app sees the request, or while the body streams in (TooLarge, which the app answers the same way)."""

from __future__ import annotations

import json


def error_body(message: str, code: str, kind: str = "invalid_request_error", param: str | None = None) -> dict:
    """OpenAI's error body, which every error of the server answers in."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def too_large_body(megabytes: float) -> dict:
    return error_body(f"the request is larger than this server's limit of {megabytes:g} MiB (megaedge serve "
                      "--max-request-mb)", "request_too_large")


class TooLarge(Exception):
    """A body that grew past the limit while it streamed in."""


class BodyLimit:
    """ASGI middleware: 413 for request bodies over the limit, by Content-Length or while they stream in."""

    def __init__(self, app, limit: int, on_reject=None):
        self.app, self.limit, self.on_reject = app, limit, on_reject  # on_reject(path): count what never routed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            if self.on_reject:
                self.on_reject(scope.get("path", ""))
            return await _send_too_large(send, self.limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise TooLarge()
            return message

        await self.app(scope, limited, send)


async def _send_too_large(send, limit: int) -> None:
    body = json.dumps(too_large_body(limit / 2**20)).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
