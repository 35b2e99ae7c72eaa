"""A replica lost mid-burst: `sdfast serve --ray` on a two-node Ray cluster on this machine.

Two ``ray start --block`` processes (a head and a worker node, 1 CPU each, their own temp dirs
and ports; Ray binds the machine's address) hold one replica each. A burst of 12 concurrent
requests (each its own seed) is sent; once the worker node's replica is computing, its process is killed (SIGKILL).
Every request must then end in its own image (the pixels the library makes for its seed) or in a
clean retryable error (503, OpenAI's error shape, Retry-After), which the client retries; no more
requests fail than the killed replica can hold; and the deployment heals (a new replica on the
worker node, both answering). The figures go to $SDFAST_RAY_FAULTS_JSON when it is set
(bench/results/ray-faults-tiny-2nodes.json, docs/serve.md).
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

BURST = 12
STEPS = 30  # ~1-2 s a request on one core here: long enough to kill a replica mid-request
PROMPT = "a red circle"
CLIENT_TIMEOUT_S = 120  # every call is bounded: a hang fails the test instead of stalling it
MAX_BATCH = 4  # the server's default; a replica holds up to 2 * MAX_BATCH requests (ray.py)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_node(tmp: Path, name: str, env: dict, head_port: int, head: bool) -> subprocess.Popen:
    """One Ray node in the foreground (--block): terminating it takes its raylet and workers."""
    ports = [f"--{flag}={free_port()}" for flag in (
        "node-manager-port", "object-manager-port", "metrics-export-port", "runtime-env-agent-port",
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port")]
    args = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--num-cpus=1",
            f"--temp-dir={tmp / name}", "--disable-usage-stats", *ports]
    if head:
        args += ["--head", f"--port={head_port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                 f"--dashboard-port={free_port()}"]
    else:
        args += [f"--address=127.0.0.1:{head_port}"]
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process we started (ray start --block stops its node's processes), then
    SIGKILL whatever of their process trees is left; never `ray stop`, which stops every Ray here."""
    trees = []
    for p in procs:
        try:
            trees += psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            pass
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for child in trees:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def health_pids(url: str, want: int, deadline: float, log: Path, exclude: frozenset = frozenset()) -> set[int]:
    """Poll /health (Ray routes each call to one replica) until `want` distinct ready replicas answer."""
    pids: set[int] = set()
    while len(pids) < want:
        assert time.monotonic() < deadline, log.read_text()[-4000:]
        for name in ("head", "worker"):  # a node that could not start fails the test now, with its log
            node_log = log.with_name(f"{name}.log")
            text = node_log.read_text() if node_log.exists() else ""
            assert "PANIC" not in text and "Traceback" not in text, text[-4000:]
        try:
            r = httpx.get(f"{url}/health", timeout=10)
            if r.status_code == 200 and r.json()["pid"] not in exclude:
                pids.add(r.json()["pid"])
            else:
                time.sleep(0.2)
        except httpx.TransportError:
            time.sleep(0.5)
    return pids


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.slow  # two Ray nodes, two replicas, a replacement: ~2 min here
def test_a_replica_killed_mid_burst_costs_only_its_requests_which_get_a_retryable_error():
    # The cluster's own token: Ray >= 2.5x turns token auth on whenever ~/.ray/auth_token exists, and
    # any other Ray on the machine (ray.init() writes that file) can replace it between our head's
    # start and the worker's join, which then fails with InvalidAuthToken.
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    head_port, port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    nodes = Path(tempfile.mkdtemp(prefix="sdray-", dir="/tmp"))  # Ray's socket paths must fit in 107 bytes
    procs = [ray_node(nodes, "head", env, head_port, head=True)]
    log = nodes / "serve.log"
    try:
        time.sleep(3)  # the worker node joins a head whose GCS is up; Ray retries the join meanwhile
        procs.append(ray_node(nodes, "worker", env, head_port, head=False))
        with open(log, "w") as f:
            server = subprocess.Popen(
                [sys.executable, "-m", "sdfast.cli", "serve", "--ray", "--ray-address", f"127.0.0.1:{head_port}",
                 "--replicas", "2", "--num-cpus", "1", "--model", "tiny", "--dtype", "fp32", "--port", str(port),
                 "--max-batch", str(MAX_BATCH)], stdout=f, stderr=subprocess.STDOUT, env=env)
        procs.insert(0, server)  # stopped first: Serve shuts down while its cluster is still up
        pids = health_pids(url, 2, time.monotonic() + 300, log)
        raylets = {pid: psutil.Process(pid).parent() for pid in pids}
        assert len({r.pid for r in raylets.values()}) == 2, "the two replicas share a node"
        head_raylet = [c for c in psutil.Process(procs[1].pid).children() if c.name() == "raylet"][0].pid
        victim = next(pid for pid, r in raylets.items() if r.pid != head_raylet)  # the worker node's replica
        victim_raylet = raylets[victim].pid
        import sdfast

        lib = sdfast.load("tiny", dtype="fp32")  # the model the replicas serve, in this process
        refs = {s: np.asarray(lib.generate(PROMPT, steps=STEPS, seed=s).images[0]) for s in range(BURST)}

        def one(seed: int) -> list[tuple[int, str, str | None, bytes]]:
            attempts = []
            for _ in range(5):  # a client retries a retryable answer after Retry-After, a bounded number of times
                r = httpx.post(f"{url}/v1/images/generations", timeout=CLIENT_TIMEOUT_S,
                               json={"prompt": PROMPT, "size": "64x64", "seed": seed, "steps": STEPS})
                attempts.append((r.status_code, r.headers.get("content-type", ""), r.headers.get("retry-after"),
                                 r.content))
                if r.status_code != 503:
                    break
                time.sleep(float(r.headers.get("retry-after", "1")))
            return attempts

        cpu0 = sum(psutil.Process(victim).cpu_times()[:2])
        with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
            futures = {s: pool.submit(one, s) for s in range(BURST)}
            deadline = time.monotonic() + 120
            while sum(psutil.Process(victim).cpu_times()[:2]) - cpu0 < 0.5:  # it is computing a request
                assert time.monotonic() < deadline, "Ray never routed a request to the worker node's replica"
                time.sleep(0.02)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            still_running = sum(not f.done() for f in futures.values())
            results = {s: f.result(timeout=CLIENT_TIMEOUT_S * 5 + 30) for s, f in futures.items()}

        lost = []
        for seed, attempts in results.items():
            *retried, last = attempts
            for status, kind, retry_after, body in retried:  # each refusal: a retryable error, in OpenAI's shape
                assert status == 503 and kind.startswith("application/json") and retry_after, (status, body[:300])
                assert json.loads(body)["error"]["code"] == "replica_unavailable", body[:300]
            assert last[0] == 200, (seed, last[0], last[3][:300])
            png = base64.b64decode(json.loads(last[3])["data"][0]["b64_json"])
            assert np.array_equal(pixels(png), refs[seed]), f"seed {seed}: not the library's image"
            if retried:
                lost.append(seed)
        # The kill cost the requests in flight on that replica (at least the one it was computing),
        # never more than it can hold; the rest were served by the other replica or routed to it.
        assert 1 <= len(lost) <= 2 * MAX_BATCH, lost

        new = health_pids(url, 1, time.monotonic() + 300, log, exclude=frozenset(pids))
        recovery_s = time.monotonic() - killed_at
        both = health_pids(url, 2, time.monotonic() + 60, log, exclude=frozenset({victim}))
        assert new <= both and not psutil.pid_exists(victim)
        assert psutil.Process(next(iter(new))).parent().pid == victim_raylet  # back on the worker node
        after = httpx.post(f"{url}/v1/images/generations", timeout=CLIENT_TIMEOUT_S,
                           json={"prompt": PROMPT, "size": "64x64", "seed": 0, "steps": STEPS})
        assert after.status_code == 200
        assert np.array_equal(pixels(base64.b64decode(after.json()["data"][0]["b64_json"])), refs[0])

        if os.environ.get("SDFAST_RAY_FAULTS_JSON"):
            figures = {
                "what": "sdfast serve --ray, 2 replicas (tiny model, fp32, 1 CPU each) on a 2-node Ray cluster "
                        "on one machine; the worker node's replica SIGKILLed while computing, mid-burst",
                "load": f"{BURST} concurrent requests, 64x64, {STEPS} steps, one seed each; clients retry a 503 "
                        "after Retry-After (at most 5 tries)",
                "command": "SDFAST_RAY_FAULTS_JSON=bench/results/ray-faults-tiny-2nodes.json python -m pytest "
                           "-m slow tests/test_serve_ray_faults.py",
                "sent": BURST, "unanswered_at_kill": still_running,
                "succeeded_first_try": BURST - len(lost), "failed_then_retried": len(lost),
                "succeeded_after_retry": len(lost), "failed_finally": 0,
                "retry_status": 503, "recovery_s": round(recovery_s, 1),
                "recovery": "kill to the replacement replica answering /health (Ray restarts it on the "
                            "worker node: process start, model load, warm-up)",
                "ray": ray.__version__, "python": platform.python_version(),
                "cpu_count": os.cpu_count(), "loadavg": Path("/proc/loadavg").read_text().split()[:3],
                "date": time.strftime("%Y-%m-%d", time.gmtime()),
            }
            Path(os.environ["SDFAST_RAY_FAULTS_JSON"]).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if procs and procs[0] is not None and procs[0].args[:3] == [sys.executable, "-m", "sdfast.cli"]:
            procs[0].send_signal(signal.SIGTERM)
            try:
                procs[0].wait(60)
            except subprocess.TimeoutExpired:
                pass
        stop(procs)
        shutil.rmtree(nodes, ignore_errors=True)
