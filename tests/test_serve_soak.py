"""A soak at the queue limit: `sdfast serve` (its own process, loopback) held full for minutes.

Eight clients keep re-sending to a server with ``--max-queue 2``: at every moment more requests
arrive than it holds, so most are refused (429 with Retry-After, OpenAI's error shape) while the
rest are served. Over SOAK_S seconds the server's resident memory and open files (read from
/proc/<pid>/status and /proc/<pid>/fd once a second) must not grow from the first third to the
last: a leak of one 64x64 image (12 KiB) per served request, of 1 KiB per refusal or of one
socket per request (here ~1600 served and ~18 500 refused) would exceed the bounds below. The figures go to
$SDFAST_SOAK_JSON when it is set (docs/serve.md).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

SOAK_S = float(os.environ.get("SDFAST_SOAK_S", "150"))
CLIENTS = 8
MAX_QUEUE = 2
RSS_GROWTH_MIB = 8  # the last third's peak over the first's; measured: 0.1 (515.0 -> 515.1 MiB)
FD_GROWTH = 4  # open files: the listening socket, the clients' connections, the model's files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])
    return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc (Linux)")
@pytest.mark.slow  # SOAK_S (150 s) by construction
def test_a_server_held_at_its_queue_limit_keeps_its_memory_and_open_files(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "sdfast.cli", "serve", "--model", "tiny", "--dtype", "fp32",
                                 "--max-queue", str(MAX_QUEUE), "--max-batch", "2", "--port", str(port)],
                                stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    counts = {200: 0, 429: 0, 503: 0}
    other: list[tuple[int, str]] = []
    depths: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        seed = k * 100_000
        with httpx.Client(timeout=60) as c:  # one keep-alive connection per client, as SDKs do
            while not stop.is_set():
                seed += 1
                r = c.post(f"{url}/v1/images/generations",
                           json={"prompt": "a red circle", "size": "64x64", "steps": 2, "seed": seed})
                with lock:
                    if r.status_code in counts and (r.status_code == 200 or (
                            r.headers.get("retry-after") and r.json()["error"]["code"])):
                        counts[r.status_code] += 1
                    else:
                        other.append((r.status_code, r.text[:200]))
                if r.status_code != 200:
                    stop.wait(0.02)  # re-send at once (not after Retry-After): the queue stays full

    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.2)
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        samples = []
        t0 = time.monotonic()
        while (now := time.monotonic()) - t0 < SOAK_S:
            assert proc.poll() is None, log.read_text()[-4000:]
            samples.append((now - t0, *sample(proc.pid)))
            depths.append(httpx.get(f"{url}/health", timeout=30).json()["queue_depth"])
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join(90)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    third = len(samples) // 3
    first, last = samples[:third], samples[-third:]
    rss0, rss1 = max(s[1] for s in first), max(s[1] for s in last)
    fd0, fd1 = max(s[2] for s in first), max(s[2] for s in last)
    assert not other, other[:5]  # every answer: an image, or a refusal in OpenAI's shape with Retry-After
    assert counts[200] > 0 and counts[429] > counts[200], counts  # served, and held at the limit throughout
    assert max(depths) == MAX_QUEUE, depths
    assert rss1 - rss0 <= RSS_GROWTH_MIB, (rss0, rss1)
    assert fd1 - fd0 <= FD_GROWTH, (fd0, fd1)
    if os.environ.get("SDFAST_SOAK_JSON"):
        Path(os.environ["SDFAST_SOAK_JSON"]).write_text(json.dumps({
            "what": f"sdfast serve (tiny, fp32, 1 thread) with --max-queue {MAX_QUEUE} --max-batch 2, {CLIENTS} "
                    "clients re-sending 20 ms after each refusal (64x64, 2 steps, a new seed each)",
            "seconds": round(samples[-1][0]), "served": counts[200], "refused_429": counts[429],
            "refused_503": counts[503], "rss_mib_first_third_peak": round(rss0, 1),
            "rss_mib_last_third_peak": round(rss1, 1), "fds_first_third_peak": fd0, "fds_last_third_peak": fd1,
            "bounds": {"rss_growth_mib": RSS_GROWTH_MIB, "fd_growth": FD_GROWTH},
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "command": "SDFAST_SOAK_JSON=... python -m pytest -m slow tests/test_serve_soak.py",
        }, indent=2) + "\n")
