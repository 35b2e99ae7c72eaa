"""The HTTP face of an ImageService: the OpenAI Images API plus /health and /metrics.

    POST /v1/images/generations   {"prompt", "n", "size": "WxH", "response_format": "b64_json",
                                   + sdfast's "seed", "steps", "guidance_scale", "negative_prompt",
                                   "scheduler", "loras"}  → {"created", "data": [{"b64_json"}]}
    POST /v1/images/edits         multipart: "image" file, optional "mask" file (transparent =
                                   repaint), the same text fields + "strength", "paste_unmasked"
                                   (edits.py) → the same answer
    either, with "stream": true   server-sent events: "partial_images" (0-3) partial images, then
                                   the final ones (streaming.py)
    GET  /v1/models               {"object": "list", "data": [{"id": MODEL, "object": "model", ...}]}
    GET  /health                  200 once warmed up, 503 before and while draining
    GET  /metrics                 Prometheus text

--api-key guards /v1/* only: /health and /metrics stay open for probes and scrapers (bind to
loopback or firewall them). Under Ray Serve each replica has its own /metrics.

Every refusal is a JSON body in OpenAI's error shape whose ``message`` is one line: for bad input
exactly the text ``sdfast generate`` prints after ``error:``. No answer ever carries a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InvalidArgument, MissingFile
from .batching import Closed, Expired, QueueFull
from .edits import form_fields
from .service import ImageService
from .shape import error_body
from .streaming import start_stream

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a prompt and a few numbers; anything larger is not a generation request


def error_response(service: ImageService, status: int, kind: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    service.metrics.error(kind, status)
    return JSONResponse({"error": error_body(status, kind, message)}, status_code=status, headers=headers)


def create_app(service: ImageService, drain_timeout_s: float | None = None) -> FastAPI:
    """The app; its lifespan starts the warm-up and, at shutdown, drains the queue."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        # uvicorn has already waited for in-flight HTTP requests; this finishes anything queued.
        await asyncio.to_thread(service.drain, drain_timeout_s)

    app = FastAPI(title="sdfast", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    key = service.config.api_key.encode() if service.config.api_key else None

    def authorized(request: Request) -> bool:
        if key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Only the spaces and tabs HTTP allows around a value are stripped (str.strip would also
        # take NBSP and NEL, so the key with such a byte appended would pass).
        # compare_digest: the time taken does not depend on how much of the key was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(" \t").encode(), key)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # 404 / 405 from routing, in the same shape as every other refusal.
        if exc.status_code == 404:
            message = (f"path: {request.url.path} is not served; the API is POST /v1/images/generations, "
                       "POST /v1/images/edits and GET /v1/models (plus GET /health and /metrics)")
        elif exc.status_code == 405:
            message = f"method: {request.method} is not allowed on {request.url.path}; use {exc.headers.get('Allow', '')}" \
                if exc.headers else f"method: {request.method} is not allowed on {request.url.path}"
        else:
            message = f"http: {exc.detail}"
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(service, exc.status_code, kind, message, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(service, 500, "internal", _one_line(f"internal: {type(exc).__name__}: {exc}"))

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        if not authorized(request):
            return error_response(service, 401, "unauthorized",
                                  "api key: missing or wrong; send the header 'Authorization: Bearer KEY'",
                                  {"WWW-Authenticate": "Bearer"})
        return JSONResponse({"object": "list", "data": [
            {"id": service.info.name, "object": "model", "created": 0, "owned_by": "sdfast"}]})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(service.health(), status_code=200 if service.ready else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    def gate(request: Request) -> JSONResponse | None:
        """The refusal of a request the server will not take now (auth, warm-up, draining)."""
        if not authorized(request):
            return error_response(service, 401, "unauthorized",
                                  "api key: missing or wrong; send the header 'Authorization: Bearer KEY'",
                                  {"WWW-Authenticate": "Bearer"})
        if not service.ready:
            if service.state == "failed":
                return error_response(service, 503, "not_ready", f"server: {service.state_detail}")
            kind = "shutting_down" if service.state == "draining" else "not_ready"
            return error_response(service, 503, kind, f"server: {service.state}; retry shortly",
                                  {"Retry-After": "1"})
        return None

    async def answer(parse, event: str, t0: float) -> Response:
        """Parse (in a thread: an edit decodes images), submit, and answer: JSON, or for
        ``stream: true`` server-sent events (streaming.py). ``event``: the OpenAI event prefix."""
        try:
            body, req = await asyncio.to_thread(parse)
            partial_images = service.partial_images(body)
            if partial_images is not None:
                return await start_stream(service, req, partial_images, event, t0)
            future = service.submit(req)
        except (InvalidArgument, MissingFile) as e:
            return error_response(service, 400, "invalid_argument", _one_line(e))
        except QueueFull as e:
            return error_response(service, 429, "queue_full", str(e), {"Retry-After": str(e.retry_after_s)})
        except Closed as e:
            return error_response(service, 503, "shutting_down", str(e), {"Retry-After": "1"})
        except Exception as e:  # a checking bug: logged in full, answered in one line
            log.exception("request check failed")
            return error_response(service, 500, "internal", _one_line(f"internal: {type(e).__name__}: {e}"))
        service.metrics.in_flight.inc()
        try:
            done = await asyncio.wait_for(asyncio.wrap_future(future), service.config.timeout_s)
            pngs = await asyncio.to_thread(service.pngs, done.output)
        except (InvalidArgument, MissingFile) as e:  # raised by the pipeline itself (e.g. a profile check)
            return error_response(service, 400, "invalid_argument", _one_line(e))
        except (TimeoutError, Expired):
            return error_response(service, 504, "timeout",
                                  f"timeout: no image within {service.config.timeout_s:g} s; retry later")
        except Exception as e:  # a bug or a numerical failure: logged in full, answered in one line
            log.exception("generation failed")
            return error_response(service, 500, "internal", _one_line(f"internal: {type(e).__name__}: {e}"))
        finally:
            service.metrics.in_flight.dec()
        service.metrics.requests.labels(status="200").inc()
        service.metrics.latency.observe(time.perf_counter() - t0)
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(p).decode("ascii"), "revised_prompt": None} for p in pngs],
            # sdfast's own: how many requests shared this request's denoising loop.
            "sdfast": {"batch_requests": done.batch_requests, "batch_images": done.batch_images},
        })

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        t0 = time.perf_counter()
        refusal = gate(request)
        if refusal is not None:
            return refusal
        raw = await _read_body(request, MAX_BODY_BYTES)
        if raw is None:
            return error_response(service, 413, "payload_too_large",
                                  f"body: at most {MAX_BODY_BYTES} bytes; send a prompt and a few numbers")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return error_response(service, 400, "invalid_argument", f"body: not valid JSON ({e})")
        except RecursionError:  # nesting deeper than the parser goes: no generation request looks so
            return error_response(service, 400, "invalid_argument",
                                  "body: JSON nested too deeply; send a flat object of a prompt and a few numbers")
        return await answer(lambda: (body, service.parse(body)), "image_generation", t0)

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        t0 = time.perf_counter()
        refusal = gate(request)
        if refusal is not None:
            return refusal
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return error_response(service, 400, "invalid_argument",
                                  "body: an edit is a multipart/form-data upload (the image file, an optional "
                                  "mask file and text fields), as the openai client's images.edit sends it")
        limit = int(service.config.max_upload_mb * (1 << 20))
        raw = await _read_body(request, limit)
        if raw is None:
            return error_response(service, 413, "payload_too_large",
                                  f"body: at most {service.config.max_upload_mb:g} MB (--max-upload-mb); "
                                  "upload a smaller image")
        request._body = raw  # what Request.form() parses (starlette reads a cached body first)
        try:
            form = await request.form(max_files=4, max_fields=64, max_part_size=MAX_BODY_BYTES)
            items = form.multi_items()
        except Exception as e:  # starlette's MultiPartException / HTTPException: a malformed form
            return error_response(service, 400, "invalid_argument",
                                  _one_line(f"body: not a readable multipart form ({getattr(e, 'detail', e)})"))

        def parse():
            fields, image, mask = form_fields(items)
            return fields, service.parse(fields, image=image, mask=mask)

        try:
            return await answer(parse, "image_edit", t0)
        finally:
            await form.close()

    return app


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed ``limit`` bytes (never read whole)."""
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:  # not "²": int() refuses it
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _one_line(e: object) -> str:
    return " ".join(str(e).split("\n"))


def run_server(app: FastAPI, host: str, port: int) -> int:
    """uvicorn in the foreground until SIGTERM or SIGINT, which drain in-flight requests first.

    uvicorn re-raises a caught signal once drained, so the process would die *by* SIGTERM; an
    orchestrator's SIGTERM is the normal way to stop a server, so here it ends with status 0
    (SIGINT with 130, like the rest of the CLI). Returns that status."""
    import signal

    import uvicorn

    received: list[int] = []

    class DrainingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame) -> None:
            received.append(sig)
            super().handle_exit(sig, frame)

    # timeout_graceful_shutdown=None: wait for every in-flight request, however long it takes.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=None)
    server = DrainingServer(config)
    server.run()
    if not server.started:
        return 1  # uvicorn logged why (e.g. the port is taken)
    return 130 if signal.SIGINT in received else 0


class BackgroundServer:
    """uvicorn on a thread, on loopback and a free port: for tests and bench/studies/serve_load.py.

        with BackgroundServer(create_app(service)) as url: ...   # url = "http://127.0.0.1:PORT"
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                     timeout_graceful_shutdown=None)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="sdfast-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start (see its log)")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
