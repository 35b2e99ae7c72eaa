"""`sdfast serve` as its own process: exact batching on batch-invariant kernels, and SIGTERM drain.

Both need a fresh process: ``--kernels batch-invariant`` sets MKL's strict reproducibility mode,
which MKL reads once, before its first GEMM, and SIGTERM ends the process. The model is the
packaged toy "tiny": tiny-random's odd CLIP width (37) puts row boundaries inside SIMD vectors, so
its text encoder is not batch-invariant even on these kernels (see sdfast/serve/service.py).
"""

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

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

STEPS = 3
pytestmark = pytest.mark.slow  # ~30 s on a shared 2-core machine: the server starts and warms up once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not hasattr(__import__("sdfast.runtime", fromlist=["Pipeline"]).Pipeline, "run_batch"):
        pytest.skip("this Pipeline has no run_batch yet: nothing is batched")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sdfast.cli", "serve", "--model", "tiny",
                                 "--dtype", "fp32", "--kernels", "batch-invariant", "--max-batch", "4",
                                 "--max-wait-ms", "400", "--port", str(port)], stdout=f, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def request(url: str, seed: int, steps: int = STEPS) -> tuple[bytes, int]:
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=300)
    r = c.images.generate(prompt=f"a red circle {seed}", size="64x64",
                          extra_body={"seed": seed, "steps": steps, "guidance_scale": 4.0 + seed})
    return base64.b64decode(r.data[0].b64_json), r.model_extra["sdfast"]["batch_requests"]


def test_batched_images_are_bit_identical_to_lone_ones(server):
    url, _, log = server
    # --kernels batch-invariant makes the CPU kernels batch-invariant where they can be (measured
    # on a Xeon with AVX-512); elsewhere (e.g. an AVX2-only CPU) the warm-up probe finds batched
    # rows differ, and the server must then keep batching off. Either way, what a client gets
    # concurrently is bit for bit what it gets alone.
    health = httpx.get(f"{url}/health").json()
    assert health["batch_invariant"] in (True, False), (health, log.read_text())
    assert health["max_batch"] == (4 if health["batch_invariant"] else 1)  # what /health says it will do
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(lambda s: request(url, s), range(8)))  # 8 concurrent: all succeed
    if health["batch_invariant"]:
        assert max(n for _, n in batched) > 1  # at least one loop was shared
    else:
        assert "batching is off" in log.read_text()
        assert [n for _, n in batched] == [1] * 8  # the probe said no: nothing was batched
    for seed, (png, _) in enumerate(batched):
        lone, n = request(url, seed)  # one at a time: each runs its own loop
        assert n == 1
        assert lone == png, f"seed {seed}: batched PNG differs from the lone one"


def test_sigterm_drains_in_flight_requests_and_exits_0(server):
    url, proc, log = server
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(request, url, k, 40) for k in range(3)]
        deadline = time.monotonic() + 60
        while _gauge(url, "sdfast_in_flight") < 3:  # all three inside the server
            assert time.monotonic() < deadline and not any(f.done() for f in futures)
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # while their 40-step loop runs
        results = [f.result() for f in futures]
    assert all(len(png) > 0 for png, _ in results)
    assert proc.wait(120) == 0, log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health")


def _gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")
