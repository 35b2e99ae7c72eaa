"""``sdfast serve``: the OpenAI-compatible image server, on uvicorn or as a Ray Serve deployment."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re

from ..errors import InvalidArgument

log = logging.getLogger(__name__)

DESCRIPTION = """Serve POST /v1/images/generations (the OpenAI Images API; sdfast's seed, steps,
guidance_scale, negative_prompt and scheduler in the same JSON body), POST /v1/images/edits
(multipart: the image, an optional mask whose transparent pixels are repainted, the same fields
plus strength; uploads bounded by --max-upload-mb and --max-upload-pixels), "stream": true on
both (server-sent events with "partial_images" 0-3 partial images, then the final one),
GET /health (200 once warmed up) and GET /metrics (Prometheus).

Requests that can share a U-Net call (same size, steps, scheduler, guidance on/off) are batched up
to --max-batch images within --max-wait-ms; each keeps its own seed and guidance scale. Batching is
switched on only where a warm-up probe finds batched images bit-identical to lone ones
(--batch-invariance require, the default). On a CPU the default oneDNN kernels are not
batch-invariant; --kernels batch-invariant makes them so on a Xeon with AVX-512, at some speed
cost (on other CPUs the probe decides, and may keep batching off).

  sdfast serve --model tiny --port 8000
  curl -s --fail-with-body http://127.0.0.1:8000/v1/images/generations -H 'Content-Type: application/json' \
      -d '{"prompt": "a red circle on a blue background", "seed": 1, "steps": 20}' -o response.json

(the README's Serve section has the same call through the openai client.) GET /v1/models lists
the one model served, as OpenAI clients expect.

With --ray the same app runs as a Ray Serve deployment with --replicas copies, one pipeline each
(see sdfast/serve/ray.py for `serve run` and multi-machine clusters).
"""


def register(sub: argparse._SubParsersAction) -> None:
    from .generate import add_model_arguments

    p = sub.add_parser("serve", help="serve the OpenAI Images API over HTTP, with request batching",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers", "math"],
                   help="torch backend attention (default sdpa)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--max-batch", type=int, default=4, help="most images in one denoising loop (default 4)")
    p.add_argument("--max-wait-ms", type=float, default=25.0,
                   help="how long the oldest request waits for batch-mates (default 25)")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before 429 (default 64)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request before 504 (default 300)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $SDFAST_API_KEY; none = open)")
    p.add_argument("--max-n", type=int, default=4, help="most images per request (default 4)")
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="longest prompt accepted (default 2000)")
    p.add_argument("--max-side", type=int, default=None,
                   help="largest image side (default: the engines' profile, or twice the native size)")
    p.add_argument("--max-steps", type=int, default=150, help="most denoising steps per request (default 150)")
    p.add_argument("--warmup-size", action="append", default=[], metavar="WxH",
                   help="warm up at this size (repeatable; default the native size)")
    p.add_argument("--batch-invariance", default="require", choices=["require", "allow"],
                   help="require (default): batch only if batched images are bit-identical to lone ones "
                        "on these engines; allow: batch regardless")
    p.add_argument("--kernels", default="fast", choices=["fast", "batch-invariant"],
                   help="fast (default): the usual CPU kernels (oneDNN); batch-invariant: kernels whose "
                        "rows do not depend on the batch size (MKL strict CNR, no oneDNN/NNPACK), so "
                        "batching is exact on a CPU at some speed cost")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="serve the LoRAs in DIR (NAME.safetensors, each checked against the model at start); a "
                        "request names them in its loras field, 'NAME[:SCALE],...' (torch and inductor backends, and engines exported with LoRA slots)")
    p.add_argument("--max-loras", type=int, default=4, help="most LoRAs one request may name (default 4)")
    p.add_argument("--max-upload-mb", type=float, default=16.0,
                   help="largest /v1/images/edits upload, image + mask + fields, in MB (default 16)")
    p.add_argument("--max-upload-pixels", type=int, default=4096 * 4096,
                   help="largest uploaded image or mask in pixels, read from its header before decoding "
                        "(default 16777216 = 4096x4096)")
    p.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas, one pipeline each (default 1)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs Ray reserves per replica (default 0)")
    p.add_argument("--ray-address", default=None,
                   help="an existing Ray cluster (e.g. 'auto' or ray://HEAD:10001); default: start one here")
    p.set_defaults(handler=run)


def _sizes(values: list[str]) -> list[tuple[int, int]]:
    out = []
    for v in values:
        m = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", v)  # ASCII digits only; no sign, space or newline
        if m is None:
            raise InvalidArgument(f"warmup-size: must be WIDTHxHEIGHT like 512x512, not {v!r}")
        out.append((int(m.group(2)), int(m.group(1))))
    return out


def config_from_args(args: argparse.Namespace):
    from ..serve.service import ServeConfig, check_config

    if not 0 < args.port < 65536:
        raise InvalidArgument(f"port: must be from 1 to 65535 but is {args.port}")
    if args.replicas < 1:
        raise InvalidArgument(f"replicas: must be >= 1 but is {args.replicas}")
    for flag, v in (("num-cpus", args.num_cpus), ("num-gpus", args.num_gpus)):
        if not math.isfinite(v) or v < 0:
            raise InvalidArgument(f"{flag}: must be a finite number >= 0 but is {v}")
    # $SDFAST_API_KEY set but empty means no key; an explicit --api-key '' is a mistake (check_config says so).
    api_key = args.api_key if args.api_key is not None else (os.environ.get("SDFAST_API_KEY") or None)
    config = ServeConfig(model=args.model, backend=args.backend, engines=args.engines, device=args.device,
                       dtype=args.dtype, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                       max_queue=args.max_queue, timeout_s=args.timeout, api_key=api_key,
                       max_prompt_chars=args.max_prompt_chars, max_n=args.max_n, max_side=args.max_side,
                       max_steps=args.max_steps, warmup_sizes=_sizes(args.warmup_size),
                       batch_invariance=args.batch_invariance, attention=args.attention,
                       kernels=args.kernels, lora_dir=args.lora_dir, max_loras=args.max_loras,
                       max_upload_mb=args.max_upload_mb, max_upload_pixels=args.max_upload_pixels)
    check_config(config)
    return config


def run(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (/v1/images/edits' uploads)
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise InvalidArgument(f"serve: needs {e.name}, which is not installed; pip install 'sdfast[serve]'") from None
    config = config_from_args(args)
    if args.host not in ("127.0.0.1", "::1", "localhost") and not config.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", args.host)
    if args.ray:
        from ..serve.ray import run_ray

        return run_ray(config, replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                       host=args.host, port=args.port, address=args.ray_address)

    from ..serve import ImageService, create_app
    from ..serve.app import run_server
    from ..serve.service import load_pipeline

    service = ImageService(load_pipeline(config), config)
    return run_server(create_app(service), args.host, args.port)
