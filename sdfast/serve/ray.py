"""The same server as a Ray Serve deployment: one pipeline (and one batcher) per replica.

One machine, from the CLI (starts a local Ray, serves on --host/--port until SIGTERM/SIGINT):

    sdfast serve --ray --replicas 2 --num-cpus 1 --model tiny

With Ray's own CLI, through the application builder ``build`` (arguments are ServeConfig
fields plus replicas, num_cpus, num_gpus):

    serve run sdfast.serve.ray:build model=tiny replicas=2 num_cpus=1

Several machines: Ray schedules the replicas, nothing here does.

    ray start --head --port 6379                      # on the head machine
    ray start --address HEAD_IP:6379                  # on each worker machine
    sdfast serve --ray --ray-address auto --replicas 4 --num-gpus 1 --host 0.0.0.0 --api-key KEY
                                                      # on the head: 4 GPU replicas across the cluster

Whose batching: ours, inside each replica. ``@serve.batch`` would hand a method whatever calls
arrived together, mixing sizes, step counts and schedulers that cannot share a U-Net call, and
knows nothing of the exactness probe, the bounded queue or failure isolation. Ray does what it
is good at: placing replicas on CPUs/GPUs, routing each request to a lightly loaded replica, and
restarting failed ones; ``max_ongoing_requests`` (two batches' worth) lets enough requests reach
a replica to fill a batch while a burst still spreads over all replicas; past that, requests wait
in Ray's router up to ``max_queue`` (then Ray answers 503 where a lone server answers 429). A replica warms up (and probes) in its constructor, so Ray
routes to it only when it is ready. GPU replicas (num_gpus > 0) are unverified: no GPU here.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import fields, replace
from typing import Any

from ..errors import InvalidArgument
from .service import ImageService, ServeConfig, load_pipeline

log = logging.getLogger(__name__)


class SdfastReplica:
    """One pipeline, its batcher and the FastAPI app, built on the replica's own process."""

    def __init__(self, config: ServeConfig):
        self.service = ImageService(load_pipeline(config), config)
        self.service.start()
        if not self.service.wait_ready():
            raise RuntimeError(f"sdfast replica did not become ready: {self.service.state_detail}")

    def __serve_build_asgi_app__(self):  # Ray Serve calls this after __init__
        from .app import create_app

        return create_app(self.service)

    def check_health(self) -> None:  # Ray Serve's periodic replica health check
        if self.service.state == "failed":
            raise RuntimeError(self.service.state_detail)


def deployment(config: ServeConfig, replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0):
    """The bound Ray Serve application."""
    from ray import serve

    if replicas < 1 or num_cpus < 0 or num_gpus < 0:
        raise InvalidArgument("replicas must be >= 1 and num-cpus, num-gpus >= 0")
    if num_gpus > 0 and config.device == "cpu":
        config = replace(config, device="cuda")  # a GPU replica computing on its CPU wastes the GPU
    cls = serve.ingress()(SdfastReplica)
    # Two batches' worth per replica (one running, one forming): enough for full batches, few
    # enough that Ray spreads a burst over the replicas instead of queueing it all on the first.
    # The rest waits in Ray's router, bounded by max_queued_requests (Ray answers 503 past it).
    dep = serve.deployment(cls, name="sdfast", num_replicas=replicas,
                           ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
                           max_ongoing_requests=2 * config.max_batch, max_queued_requests=config.max_queue,
                           graceful_shutdown_timeout_s=config.timeout_s)
    return dep.bind(config)


def build(args: dict[str, str]) -> Any:
    """Application builder for ``serve run sdfast.serve.ray:build key=value ...``."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    num_cpus = float(args.pop("num_cpus", 1.0))
    num_gpus = float(args.pop("num_gpus", 0.0))
    names = [f.name for f in fields(ServeConfig)]
    config = ServeConfig()
    for key, value in args.items():
        if key not in names:
            raise InvalidArgument(f"{key}: not a serve setting; use one of {', '.join(names)}, replicas, "
                                  "num_cpus, num_gpus")
        current = getattr(config, key)
        if key == "max_side":
            value = int(value)
        elif key == "warmup_sizes":
            value = [(int(h), int(w)) for w, h in (v.split("x") for v in value.split(","))]
        elif isinstance(current, int | float):
            value = type(current)(value)
        setattr(config, key, value)
    return deployment(config, replicas, num_cpus, num_gpus)


def run_ray(config: ServeConfig, replicas: int, num_cpus: float, num_gpus: float, host: str, port: int,
            address: str | None = None) -> int:
    """``sdfast serve --ray``: start (or join) Ray, deploy, serve until SIGTERM/SIGINT, then shut
    Serve down, which lets each replica's in-flight requests finish. Returns the exit status."""
    try:
        import ray
        from ray import serve
    except ModuleNotFoundError:
        raise InvalidArgument("ray: Ray Serve is not installed; pip install 'sdfast[ray]'") from None
    from .ray_proxy import PROXY_ENV

    app = deployment(config, replicas, num_cpus, num_gpus)
    # Ray's proxies answer in OpenAI's error shape when a replica cannot (ray_proxy.py); a callback
    # the user set in the environment wins. Passed as the job's env: the proxies Serve starts get it.
    env = {k: os.environ.get(k, v) for k, v in PROXY_ENV.items()}
    ray.init(address=address or None, include_dashboard=False, runtime_env={"env_vars": env})
    stop = threading.Event()
    received: list[int] = []

    def on_signal(sig, frame):
        received.append(sig)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="sdfast", route_prefix="/", blocking=False)
        log.warning("sdfast on Ray Serve: %d replica(s) at http://%s:%d", replicas, host, port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 130 if signal.SIGINT in received else 0
