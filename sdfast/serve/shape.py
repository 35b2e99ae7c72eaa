"""OpenAI's error shape, in a module that imports nothing heavy: the app, its streams and Ray's
HTTP proxies (ray_proxy.py, which must not load torch) all answer with it."""

from __future__ import annotations

from typing import Any


def error_body(status: int, kind: str, message: str) -> dict[str, Any]:
    """OpenAI's error shape for a refusal: ``param`` is the argument a bad-input message names first."""
    param = message.split(":", 1)[0] if kind == "invalid_argument" else None
    return {"message": message, "type": "invalid_request_error" if status < 500 else "server_error",
            "param": param, "code": kind}
