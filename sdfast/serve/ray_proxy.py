"""What Ray Serve's HTTP proxy answers when no replica does: OpenAI's error shape, never text.

Every answer a replica gives is already JSON (or an event stream). The proxy answers on its own
when the replica died with the request in flight (Ray returns without an answer, and uvicorn
sends a plain-text ``500 Internal Server Error``), when its queue is full or no replica is up (plain-text 503) and when Ray's own request
timeout passes (408). Clients of an OpenAI API parse ``{"error": {...}}``; this middleware, run in
each proxy, turns those answers into that shape: a lost replica becomes a 503 with
``Retry-After`` (generation is idempotent for a fixed seed, and Ray restarts the replica), the
others keep their status and carry Ray's message.

Ray loads it from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=sdfast.serve.ray_proxy:middlewares``,
read by each proxy at its start; ``sdfast serve --ray`` sets it (PROXY_ENV) for the Ray it starts
and for the job it submits to an existing cluster. Nothing here imports torch: a proxy stays light.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .shape import error_body

log = logging.getLogger(__name__)

PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "sdfast.serve.ray_proxy:middlewares"}
RETRY_AFTER_S = 1  # a request whose replica died can go to the other replicas at once

_LOST = ("replica_unavailable", "the replica serving this request stopped before it answered; "
         "retry it (Ray restarts the replica, and the others keep serving)")


def middlewares() -> list[Any]:
    """Ray's proxy callback: the Starlette middlewares its HTTP server wraps itself in."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrors)]


def _header(message: dict[str, Any], name: bytes) -> bytes:
    for key, value in message.get("headers", ()):
        if key.lower() == name:
            return value
    return b""


def _translate(status: int, text: str, retry_after: bytes) -> tuple[int, dict[str, Any], list]:
    if status == 500:
        status, (kind, message) = 503, _LOST
    else:
        kind = {408: "timeout", 429: "queue_full", 503: "unavailable"}.get(status, "proxy_error")
        message = f"Ray Serve: {text.strip() or 'no replica answered'}"
    headers = [(b"content-type", b"application/json")]
    if status in (429, 503):
        headers.append((b"retry-after", retry_after or str(RETRY_AFTER_S).encode()))
    return status, {"error": error_body(status, kind, message)}, headers


class OpenAIErrors:
    """Pure ASGI middleware: holds back a proxy's own non-JSON error answer and sends OpenAI's
    error shape instead; a replica's answers (JSON, PNG bytes in JSON, event streams) pass as
    they come, byte for byte."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}
        started = False

        async def answer(status: int, text: str, retry_after: bytes = b""):
            nonlocal started
            status, body, headers = _translate(status, text, retry_after)
            data = json.dumps(body).encode()
            started = True
            await send({"type": "http.response.start", "status": status,
                        "headers": [*headers, (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})

        async def send_or_hold(message):
            nonlocal started
            if message["type"] == "http.response.start":
                kind = _header(message, b"content-type")
                if message["status"] >= 400 and not kind.startswith((b"application/json", b"text/event-stream")):
                    held.update(start=message, body=b"")
                    return
                started = True
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if not message.get("more_body"):
                    start = held.pop("start")
                    return await answer(start["status"], held["body"][:500].decode("utf-8", "replace"),
                                        _header(start, b"retry-after"))
                return
            await send(message)

        try:
            await self.app(scope, receive, send_or_hold)
        except Exception:
            if started:
                raise
            log.warning("Ray Serve's proxy failed a request before answering", exc_info=True)
        if not started:  # Ray's proxy returns without answering when the replica died (uvicorn: text 500)
            await answer(500, "")
