"""``stream: true``: the answer as server-sent events, in the OpenAI Images API's shapes.

For each partial image (``partial_images``, 0-3; see sdfast/stream.py for what they show and
when they come) one ``<prefix>.partial_image`` event per image of the request, then one
``<prefix>.completed`` event per image carrying the same PNG the unstreamed answer has. The
prefix is ``image_generation`` for generations and ``image_edit`` for edits; each event's JSON
has a ``type`` equal to its event name. sdfast adds ``sdfast.image_index`` (which of the ``n``
images) and, on partial images, ``sdfast.step`` / ``sdfast.steps``.

A failure after the stream began (the status line is sent) is an ``error`` event whose data is
``{"type": "error", "error": {...}}``, OpenAI's error shape, which the openai client raises as
an ``APIError``; then the stream ends. A client that disconnects stops its generation at the
next partial image (the receiver raises ``Cancelled`` on the worker thread).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import StreamingResponse

from ..errors import InvalidArgument, MissingFile
from ..stream import Cancelled
from .batching import Expired
from .shape import error_body

if TYPE_CHECKING:
    from ..output import PartialImage
    from ..request import Request
    from .service import ImageService

log = logging.getLogger(__name__)
_DONE = object()


def sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def error_event(service: ImageService, status: int, kind: str, message: str) -> bytes:
    service.metrics.error(kind, status)
    return sse("error", {"type": "error", "error": error_body(status, kind, message)})


async def start_stream(service: ImageService, req: Request, partial_images: int, prefix: str, t0: float
                       ) -> StreamingResponse:
    """Submit ``req`` with a receiver for its partial images and answer with the event stream.
    Refusals at submit (QueueFull, Closed) are raised here, before any byte is sent."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gone = threading.Event()

    def post(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: nobody is reading
            gone.set()

    def on_partial(p: PartialImage) -> None:  # on the worker thread
        if gone.is_set():
            raise Cancelled("the client of this stream disconnected")
        post(p)

    future = service.submit(req, partial_images, on_partial)
    future.add_done_callback(lambda _: post(_DONE))
    size = f"{req.width}x{req.height}"

    def common() -> dict[str, Any]:
        return {"created_at": int(time.time()), "size": size, "quality": "auto", "background": "opaque",
                "output_format": "png"}

    async def events() -> AsyncIterator[bytes]:
        service.metrics.in_flight.inc()
        deadline = loop.time() + service.config.timeout_s
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
                except TimeoutError:
                    yield error_event(service, 504, "timeout", f"timeout: no image within "
                                      f"{service.config.timeout_s:g} s; retry later")
                    return
                if item is _DONE:
                    break
                pngs = await asyncio.to_thread(service.partial_pngs, item)
                for k, png in enumerate(pngs):
                    yield sse(f"{prefix}.partial_image", {
                        "type": f"{prefix}.partial_image", "b64_json": base64.b64encode(png).decode("ascii"),
                        "partial_image_index": item.index, **common(),
                        "sdfast": {"image_index": k, "step": item.step, "steps": item.steps}})
            try:
                done = future.result()
                pngs = await asyncio.to_thread(service.pngs, done.output)
            except (InvalidArgument, MissingFile) as e:
                yield error_event(service, 400, "invalid_argument", " ".join(str(e).split("\n")))
                return
            except Expired:
                yield error_event(service, 504, "timeout", f"timeout: no image within "
                                  f"{service.config.timeout_s:g} s; retry later")
                return
            except Exception as e:  # a bug or a numerical failure: logged in full, one line here
                log.error("streamed generation failed", exc_info=e)
                yield error_event(service, 500, "internal", " ".join(f"internal: {type(e).__name__}: {e}".split("\n")))
                return
            for k, png in enumerate(pngs):
                yield sse(f"{prefix}.completed", {
                    "type": f"{prefix}.completed", "b64_json": base64.b64encode(png).decode("ascii"), **common(),
                    "sdfast": {"image_index": k, "batch_requests": done.batch_requests}})
            service.metrics.requests.labels(status="200").inc()
            service.metrics.latency.observe(time.perf_counter() - t0)
        finally:  # also when the client disconnects (the generator is closed)
            gone.set()
            service.forget(req)
            service.metrics.in_flight.dec()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
