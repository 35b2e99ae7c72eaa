"""The serving core without HTTP: configuration, request checking, warm-up, the batcher, PNGs.

The FastAPI app (app.py) and the Ray Serve deployment (ray.py) both wrap one ``ImageService``
per pipeline; nothing here imports a web framework.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import rules
from ..errors import InvalidArgument
from ..request import Request
from .batching import Batcher, batch_key
from .invariance import probe_batch_invariance, use_batch_invariant_kernels
from .loras import load_lora_dir, parse_loras_field
from .metrics import ServeMetrics

if TYPE_CHECKING:
    from ..output import PartialImage
    from ..runtime import GenerationOutput, Pipeline

log = logging.getLogger(__name__)

#: OpenAI Images API fields we accept; ``user``, ``model``, ``quality`` and ``style`` are ignored
#: (but, as the OpenAI API does, they must be strings when sent).
OPENAI_FIELDS = ("prompt", "n", "size", "response_format", "user", "model", "quality", "style", "stream",
                 "partial_images")
IGNORED_STRING_FIELDS = ("user", "model", "quality", "style")
#: sdfast's own fields, sent by the openai client through ``extra_body``.
SDFAST_FIELDS = ("seed", "steps", "guidance_scale", "negative_prompt", "scheduler", "loras")
#: what an edit adds (its image and mask are files, see edits.py): the init image's share of
#: the schedule, and copying the kept pixels back over the result
EDIT_FIELDS = ("strength", "paste_unmasked")
SIZE_RE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")  # whole string (fullmatch): no trailing newline


@dataclass
class ServeConfig:
    """Everything ``sdfast serve`` is told; picklable, so Ray can ship it to replicas."""

    model: str = "tiny"
    backend: str = "torch"
    engines: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    max_batch: int = 4  # images per denoising loop
    max_wait_ms: float = 25.0
    max_queue: int = 64
    timeout_s: float = 300.0
    api_key: str | None = None
    max_prompt_chars: int = 2000
    max_n: int = 4
    max_side: int | None = None  # None: the engines' profile, or twice the native size for eager ones
    max_steps: int = 150
    warmup_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width); [] = native
    batch_invariance: str = "require"  # "require": batch only if the warm-up probe proves it exact
    attention: str = "sdpa"
    kernels: str = "fast"  # or "batch-invariant": see use_batch_invariant_kernels
    lora_dir: str | None = None  # the LoRAs requests may name (NAME.safetensors); None: none
    max_loras: int = 4  # most LoRAs one request may name
    max_upload_mb: float = 16.0  # largest /v1/images/edits body (image + mask + fields)
    max_upload_pixels: int = 4096 * 4096  # largest uploaded image or mask, from its header


def load_pipeline(config: ServeConfig) -> Pipeline:
    from ..model.info import resolve_model
    from ..runtime import load

    check_config(config)
    info = resolve_model(config.model)  # configs only: the warm-up sizes are checked before any weights load
    default_side = 2 * info.native_size if config.engines is None else rules.MAX_SIDE  # engines: their profile
    check_warmup_sizes(config, info, config.max_side or default_side)
    if config.kernels == "batch-invariant":
        use_batch_invariant_kernels()
    return load(info, backend=config.backend, device=config.device, dtype=config.dtype,
                engines=config.engines, attention=config.attention)


def check_config(config: ServeConfig) -> None:
    """Refuse bad settings before any weights load (the CLI's flag names in the messages)."""
    if config.batch_invariance not in ("require", "allow"):
        raise InvalidArgument(f"batch-invariance: must be 'require' or 'allow', not {config.batch_invariance!r}")
    if config.kernels not in ("fast", "batch-invariant"):
        raise InvalidArgument(f"kernels: must be 'fast' or 'batch-invariant', not {config.kernels!r}")
    for arg in ("max_batch", "max_queue", "max_n", "max_prompt_chars", "max_steps", "max_loras",
                "max_upload_pixels"):
        v = getattr(config, arg)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidArgument(f"{arg.replace('_', '-')}: must be an integer >= 1 but is {v!r}")
    if config.max_side is not None and (not rules.is_int(config.max_side) or config.max_side < rules.MIN_SIDE):
        raise InvalidArgument(f"max-side: must be an integer of at least {rules.MIN_SIDE} pixels but is "
                              f"{config.max_side!r}")
    # nan compares false with everything, so it would pass `< 0`; inf never ends a wait.
    for arg, v, strict in (("max-wait-ms", config.max_wait_ms, False), ("timeout", config.timeout_s, True),
                           ("max-upload-mb", config.max_upload_mb, True)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (strict and v == 0):
            raise InvalidArgument(f"{arg}: must be a finite number {'> 0' if strict else '>= 0'} but is {v!r}")
    key = config.api_key
    if key is not None:
        if not isinstance(key, str) or not key:
            raise InvalidArgument("api-key: empty; give a key, or leave --api-key out for an open server")
        if key != key.strip():
            raise InvalidArgument("api-key: starts or ends with whitespace, which an HTTP header cannot carry "
                                  "(clients strip it, so no request would match); remove the spaces")
        if not all(" " <= ch <= "~" for ch in key):
            raise InvalidArgument("api-key: only printable ASCII characters can travel in an Authorization "
                                  "header; use letters, digits and punctuation")
    for size in config.warmup_sizes:
        h, w = size
        for arg, v in (("height", h), ("width", w)):
            if not rules.is_int(v) or not rules.MIN_SIDE <= v <= rules.MAX_SIDE:
                raise InvalidArgument(f"warmup-size: the {arg} must be {rules.MIN_SIDE} to {rules.MAX_SIDE} "
                                      f"pixels but is {v!r}")


def check_warmup_sizes(config: ServeConfig, info, max_side: int) -> None:
    """The warm-up sizes against the model (the rule every request's size obeys) and the server's
    side limit, before anything is loaded: a size no request may have would leave a server that
    never becomes ready."""
    for h, w in config.warmup_sizes:
        for arg, v in (("height", h), ("width", w)):
            if v > max_side:
                raise InvalidArgument(f"warmup-size: {w}x{h}: the {arg} {v} is above this server's limit of "
                                      f"{max_side} pixels (--max-side); warm up at a size it serves")
            try:
                rules.check_side(arg, v, info.vae_scale_factor, "the VAE scale factor")
            except InvalidArgument as e:
                raise InvalidArgument(f"warmup-size: {w}x{h}: {e}") from None


class ImageService:
    def __init__(self, pipe: Pipeline, config: ServeConfig):
        check_config(config)
        self.pipe = pipe
        self.config = config
        self.info = pipe.info
        self.metrics = ServeMetrics()
        self.profile = _profile(pipe)
        self.max_images = config.max_batch
        if self.profile is not None:
            self.max_images = min(self.max_images, self.profile.max_batch)
        self.max_side = config.max_side or (max(self.profile.max_height, self.profile.max_width)
                                            if self.profile is not None else 2 * self.info.native_size)
        check_warmup_sizes(config, self.info, self.max_side)
        from ..engines import check_request

        for h, w in config.warmup_sizes:  # exported engines: inside their profile too
            try:
                check_request(pipe.engines, 1, h, w, True)
            except InvalidArgument as e:
                raise InvalidArgument(f"warmup-size: {w}x{h}: {e}") from None
        self.loras = load_lora_dir(config.lora_dir, pipe)  # name -> LoraFile, each checked against the model
        self.state = "warming"  # -> "ready" -> "draining"; or "failed"
        self.state_detail = ""
        self.batch_invariant: bool | None = None
        self.batcher = Batcher(None, self._run_one, max_images=self.max_images, max_wait_s=config.max_wait_ms / 1000,
                               max_queue=config.max_queue, on_batch=self.metrics.on_batch,
                               on_depth=self.metrics.queue_depth.set, key=self._batch_key)
        self.redecode = False
        self._streams: dict[int, tuple[int, Any]] = {}  # id(request) -> (partial images, on_partial)
        # id(request) -> its text-encoder chunk count, found when parse tokenized it: the batch key
        # reads it instead of tokenizing again (dropped when the request is garbage-collected)
        self._chunks: dict[int, int] = {}
        self._started = False
        self._lock = threading.Lock()
        self._warm_thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Warm up in the background; /health answers 503 until done. Idempotent."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self._warm_thread = threading.Thread(target=self._warmup, name="sdfast-warmup", daemon=True)
        self._warm_thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._warm_thread is not None:
            self._warm_thread.join(timeout)
        return self.ready

    def _warmup(self) -> None:
        try:
            sizes = self.config.warmup_sizes or [(self.info.native_size, self.info.native_size)]
            for h, w in sizes:
                seconds = self.pipe.warmup(height=h, width=w, batch=1, steps=2)
                log.info("warm-up at %dx%d took %.2f s", w, h, seconds)
            self._enable_batching(sizes[0])
        except Exception as e:  # warm-up failing is the operator's problem: say so on /health
            log.exception("warm-up failed")
            self.state, self.state_detail = "failed", f"warm-up failed: {type(e).__name__}: {e}"
            return
        if self.state == "warming":
            self.state = "ready"
            self.metrics.ready.set(1)

    def _enable_batching(self, size: tuple[int, int]) -> None:
        run_batch = getattr(self.pipe, "run_batch", None)
        if run_batch is None:
            log.warning("this Pipeline has no run_batch: every request runs its own loop")
            return
        if self.max_images < 2:
            return
        if self.config.batch_invariance == "allow":
            # Told to batch whatever the arithmetic does: no probe (it costs 2k loops at start-up),
            # but the largest batch's shapes are warmed up too.
            self.pipe.warmup(height=size[0], width=size[1], batch=self.max_images, steps=2)
            self.batcher.run_batch = self._run_batch
            log.info("batching up to %d images without checking batch invariance", self.max_images)
            return
        if self.pipe.device.type == "cpu" and self.config.kernels == "fast":
            # Measured (see use_batch_invariant_kernels): oneDNN and MKL rows depend on the batch
            # size on a CPU, and a short probe can pass by luck of rounding.
            self.batch_invariant = False
            self.metrics.batch_invariant.set(0)
            log.warning("CPU kernels 'fast' are not batch-invariant: batching is off; use --kernels "
                        "batch-invariant for exact batching, or --batch-invariance allow to batch anyway")
            return
        probe = probe_batch_invariance(self.pipe, size, self.max_images)
        # The loop can be exact while decoding all rows in one VAE call is not (measured: a 1-row
        # decode differs from the same row among others). Then decode each request's rows on
        # their own, as its lone run does, at the cost of a second VAE pass per batched image.
        self.redecode = probe.latents and not probe.images and probe.own_decode
        self.batch_invariant = probe.latents and (probe.images or probe.own_decode)
        self.metrics.batch_invariant.set(int(self.batch_invariant))
        if self.batch_invariant:
            self.batcher.run_batch = self._run_batch
        else:
            log.warning("batched rows differ from lone runs on these engines (kernels are not batch-invariant "
                        "here): batching is off; pass --batch-invariance allow to batch anyway")

    def _batch_key(self, req: Request) -> tuple:
        if id(req) in self._streams:  # its partial images are its rows alone
            return ("stream", id(req))
        # Long prompts: only requests with the same text-encoder chunk count share a loop.
        chunks = self._chunks.get(id(req))
        if chunks is None:  # a request parse did not see (the library's or a test's own)
            chunks = self.pipe.chunks(req) if hasattr(self.pipe, "chunks") else 1
        return (*batch_key(req), chunks)

    def _run_one(self, req: Request) -> GenerationOutput:
        stream = self._streams.get(id(req))
        if stream is not None:
            out = self.pipe.run(req, partial_images=stream[0], on_partial=stream[1])
        else:
            out = self.pipe.run(req)
        self._observe_swap(out)
        return out

    def _observe_swap(self, out: GenerationOutput) -> None:
        swap = getattr(out, "timings", {}).get("lora_swap")
        if swap is not None:
            self.metrics.lora_swap.observe(swap)

    def _run_batch(self, requests: list[Request]) -> list[GenerationOutput]:
        outs = self.pipe.run_batch(requests)
        if outs:
            self._observe_swap(outs[0])  # one swap per loop
        if self.redecode and len(requests) > 1:
            for out in outs:
                out.images = self.pipe.to_pil(self.pipe.decode(out.latents))
        return outs

    def drain(self, timeout: float | None = None) -> bool:
        """Stop intake and finish every queued request. True when all finished in time."""
        self.state = "draining"
        self.metrics.ready.set(0)
        self.batcher.close()
        return self.batcher.join(timeout)

    # -- requests ------------------------------------------------------------------------------
    def parse(self, body: Any, image: bytes | None = None, mask: bytes | None = None) -> Request:
        """JSON body → checked Request, or InvalidArgument with the CLI's one-line message. An edit
        (``image``: the uploaded file's bytes, ``mask`` optional) takes EDIT_FIELDS too."""
        if not isinstance(body, dict):
            raise InvalidArgument("body: must be a JSON object with at least a 'prompt' field")
        fields = OPENAI_FIELDS + SDFAST_FIELDS + (EDIT_FIELDS if image is not None else ())
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise InvalidArgument(f"{unknown[0]}: not a field of this API; the fields are {', '.join(fields)}")
        for name, value in body.items():  # every field is one string or number (none nests)
            if isinstance(value, (list, dict)):
                raise InvalidArgument(f"{name}: must be a single value, not an {_json_type(value)}")
        for name in IGNORED_STRING_FIELDS:
            if body.get(name) is not None and not isinstance(body[name], str):
                raise InvalidArgument(f"{name}: must be a string (it is not used here) but is a "
                                      f"{_json_type(body[name])}")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidArgument("prompt: required, and must be a string")
        _check_unicode("prompt", prompt)
        c = self.config
        if len(prompt) > c.max_prompt_chars:
            raise InvalidArgument(f"prompt: at most {c.max_prompt_chars} characters but has {len(prompt)}; "
                                  "shorten it")
        n = body.get("n", 1)
        n = 1 if n is None else n
        limit_n = min(c.max_n, self.max_images)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit_n:
            raise InvalidArgument(f"n: must be an integer from 1 to {limit_n} (this server's limit) but is {n!r}")
        fmt = body.get("response_format")
        fmt = "b64_json" if fmt is None else fmt
        if fmt != "b64_json":  # 0, false, [] are not a format, as the OpenAI API answers too
            what = repr(fmt) if isinstance(fmt, str) else f"a {_json_type(fmt)}"
            raise InvalidArgument(f"response_format: {what} is not served (no image storage); use 'b64_json'")
        self.partial_images(body)  # checked with the rest, used by the endpoint
        init = mask_image = None
        if image is not None:
            from .edits import upload_image, upload_mask

            init = upload_image(image, c.max_upload_pixels)
            mask_image = None if mask is None else upload_mask(mask, init.size, c.max_upload_pixels)
        height, width = self._size(body.get("size"), None if init is None else init.size)
        negative = body.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise InvalidArgument("negative_prompt: must be a string")
        if negative is not None:
            _check_unicode("negative_prompt", negative)
        if negative is not None and len(negative) > c.max_prompt_chars:
            raise InvalidArgument(f"negative_prompt: at most {c.max_prompt_chars} characters but has "
                                  f"{len(negative)}; shorten it")
        steps = body.get("steps", 50)
        if isinstance(steps, int) and not isinstance(steps, bool) and steps > c.max_steps:
            raise InvalidArgument(f"steps: at most {c.max_steps} on this server but is {steps}")
        opts = {k: body[k] for k in ("guidance_scale", "seed", "scheduler") if body.get(k) is not None}
        g = opts.get("guidance_scale")
        if isinstance(g, int) and not isinstance(g, bool):
            opts["guidance_scale"] = float(g)  # JSON 7 is the CLI's 7.0 (same value, same messages)
        loras = parse_loras_field(body.get("loras"), self.loras, self.config.max_loras)
        if init is not None:
            for k in EDIT_FIELDS:
                if body.get(k) is not None:
                    opts[k] = body[k]
            if "paste_unmasked" in opts and not isinstance(opts["paste_unmasked"], bool):
                raise InvalidArgument(f"paste_unmasked: must be true or false but is {opts['paste_unmasked']!r}")
        req = Request.build(self.info, prompt=prompt if n == 1 else [prompt] * n, negative_prompt=negative,
                            height=height, width=width, steps=steps, loras=loras, image=init, mask=mask_image,
                            **opts)
        from ..engines import check_request

        chunks = self.pipe.chunks(req) if hasattr(self.pipe, "chunks") else 1  # long prompts: a profile dim
        check_request(self.pipe.engines, req.batch, req.height, req.width, req.guided, chunks=chunks)
        self._chunks[id(req)] = chunks
        weakref.finalize(req, self._chunks.pop, id(req), None)
        return req

    def partial_images(self, body: dict[str, Any]) -> int | None:
        """None for a plain answer; for ``stream: true`` the partial images asked for (0-3)."""
        from ..stream import check_partial_images

        stream, k = body.get("stream"), body.get("partial_images")
        if stream is not None and not isinstance(stream, bool):
            raise InvalidArgument(f"stream: must be true or false but is a {_json_type(stream)}")
        if not stream:
            if k not in (None, 0):
                raise InvalidArgument("partial_images: only a streamed answer has partial images; send "
                                      "stream: true, or drop partial_images")
            return None
        return check_partial_images(0 if k is None else k)

    def _size(self, size: Any, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
        """(height, width) from ``size``; "auto" (or none) is the native size, or for an edit the
        image's own size fitted to the limits (edits.auto_size)."""
        native = self.info.native_size
        if (size is None or size == "auto") and image_size is not None:
            from .edits import auto_size

            return auto_size(image_size, self.max_side, self.info.vae_scale_factor, rules.MIN_SIDE)
        if size is None or size == "auto":
            return native, native
        m = SIZE_RE.fullmatch(size) if isinstance(size, str) else None
        if m is None:
            raise InvalidArgument(f"size: must be 'WIDTHxHEIGHT' in pixels, like '{native}x{native}', "
                                  f"not {size!r}")
        width, height = int(m.group(1)), int(m.group(2))
        for arg, v in (("width", width), ("height", height)):
            if v > self.max_side:
                raise InvalidArgument(f"size: {arg} {v} is above this server's limit of {self.max_side} pixels; "
                                      f"ask for at most {self.max_side}x{self.max_side}")
        return height, width

    def submit(self, req: Request, partial_images: int = 0, on_partial: Any = None):
        """→ concurrent Future of the GenerationOutput (QueueFull / Closed when refused). A
        streamed request (``on_partial``, called on the worker thread) runs in a loop of its own."""
        if on_partial is not None:
            self._streams[id(req)] = (partial_images, on_partial)
        try:
            return self.batcher.submit(req, self.config.timeout_s)
        except BaseException:
            self._streams.pop(id(req), None)
            raise

    def forget(self, req: Request) -> None:
        """Drop a streamed request's receiver (its answer ended, whether or not it ran)."""
        self._streams.pop(id(req), None)

    def metadata(self, out: GenerationOutput, k: int) -> dict[str, Any]:
        """The same PNG text chunks as ``sdfast generate`` writes for image k of this request."""
        if hasattr(out, "metadata"):
            return out.metadata(k)
        from .. import __version__

        req, pipe = out.request, self.pipe
        meta = {
            "prompt": req.prompts[0] if req.batch == 1 else req.prompts,
            "negative_prompt": req.negative_prompts[0] if req.batch == 1 else req.negative_prompts,
            "seed": req.seed, "steps": req.steps, "guidance_scale": req.guidance_scale,
            "scheduler": req.scheduler, "height": req.height, "width": req.width,
            "model": pipe.info.name, "backend": pipe.backend, "dtype": pipe.precision.value,
            "sdfast_version": __version__,
        }
        if req.batch > 1:
            meta.update(prompt=req.prompts[k], negative_prompt=req.negative_prompts[k], batch_index=k)
        return meta

    def pngs(self, out: GenerationOutput) -> list[bytes]:
        """PNG bytes written by media.save_png, so they carry exactly the CLI's metadata."""
        return _encode(out.images, [self.metadata(out, k) for k in range(len(out.images))])

    def partial_pngs(self, p: PartialImage) -> list[bytes]:
        """A streamed partial image's PNGs: the prompt and where in the run it was made."""
        meta = [{"prompt": p.request.prompts[k], "seed": p.request.seed, "partial_image_index": p.index,
                 "step": p.step, "steps": p.steps, "model": self.info.name} for k in range(len(p.images))]
        return _encode(p.images, meta)

    def health(self) -> dict[str, Any]:
        import torch

        return {"status": self.state, "detail": self.state_detail, "pid": os.getpid(),
                "torch_threads": torch.get_num_threads(), "model": self.info.name,
                "backend": self.pipe.backend, "dtype": self.pipe.precision.value,
                "max_batch": self.max_images if self.batcher.run_batch is not None else 1,
                "batch_invariant": self.batch_invariant, "queue_depth": self.batcher.depth,
                "loras": sorted(self.loras)}


def _encode(images: list, metas: list[dict[str, Any]]) -> list[bytes]:
    from ..media import save_png

    result = []
    with tempfile.TemporaryDirectory(prefix="sdfast-serve-") as tmp:
        for k, (image, meta) in enumerate(zip(images, metas, strict=True)):
            path = Path(tmp) / f"{k}.png"
            save_png(image, path, meta)
            result.append(path.read_bytes())
    return result


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_unicode(arg: str, text: str) -> None:
    """JSON may carry a lone surrogate (\\ud800), which is no character: the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"{arg}: holds {text[e.start]!r} at character {e.start}, half of a UTF-16 "
                              "surrogate pair and no character; send valid Unicode") from None


def _profile(pipe: Pipeline):
    for engine in pipe.engines.values():
        profile = getattr(engine, "profile", None)
        if profile is not None:
            return profile
    return None

