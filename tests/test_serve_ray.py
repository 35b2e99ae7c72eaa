"""`sdfast serve --ray`: the same app as a Ray Serve deployment with 2 CPU replicas on this machine."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_run_builder_takes_config_fields_and_refuses_unknown_ones():
    from sdfast.errors import InvalidArgument
    from sdfast.serve.ray import build

    app = build({"model": "tiny", "replicas": "2", "num_cpus": "1", "max_batch": "8", "max_side": "128",
                 "warmup_sizes": "64x64"})
    dep = app._bound_deployment  # Ray's own record of what it will deploy (private, stable since 2.7)
    assert dep.num_replicas == 2 and dep.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.0}
    (config,) = dep.init_args
    assert (config.model, config.max_batch, config.max_side, config.warmup_sizes) == ("tiny", 8, 128, [(64, 64)])
    with pytest.raises(InvalidArgument, match="stpes: not a serve setting"):
        build({"stpes": "3"})


@pytest.mark.slow  # starting Ray and two replicas takes ~40 s here
def test_two_cpu_replicas_serve_concurrent_requests_and_stop_on_sigterm(tmp_path):
    port = free_port()
    log = tmp_path / "ray.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sdfast.cli", "serve", "--ray", "--replicas", "2",
                                 "--num-cpus", "1", "--model", "tiny", "--dtype", "fp32", "--port", str(port),
                                 "--batch-invariance", "allow"], stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        pids: set[int] = set()
        while len(pids) < 2:  # both replicas answer (Ray routes each call to one of them)
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            try:
                r = httpx.get(f"{url}/health", timeout=10)
                if r.status_code == 200:
                    pids.add(r.json()["pid"])
            except httpx.TransportError:
                time.sleep(0.5)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=120)

        def one(seed: int) -> bytes:
            r = c.images.generate(prompt="a red circle", size="64x64", extra_body={"seed": seed, "steps": 3})
            return base64.b64decode(r.data[0].b64_json)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            pngs = list(pool.map(one, range(8)))
        assert len(set(pngs)) == 8 and all(p.startswith(b"\x89PNG") for p in pngs)
        bad = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "seed": -1}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed"
        # through Ray's proxy too: a streamed answer (server-sent events) and a multipart edit
        events = list(c.images.generate(prompt="a red circle", size="64x64", stream=True, partial_images=1,
                                        extra_body={"seed": 1, "steps": 3}))
        assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
        assert base64.b64decode(events[-1].b64_json).startswith(b"\x89PNG")
        edited = c.images.edit(image=("in.png", pngs[0], "image/png"), prompt="a blue circle",
                               extra_body={"seed": 2, "steps": 3})
        assert base64.b64decode(edited.data[0].b64_json).startswith(b"\x89PNG")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(180) == 0, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
