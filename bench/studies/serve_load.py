"""Load benchmark for `sdfast serve`: N concurrent `openai` clients against a server on loopback,
beside sequential `Pipeline.generate` of the same requests in the same run.

    python bench/studies/serve_load.py --model tiny --clients 8 --requests 32 --steps 10
    python bench/studies/serve_load.py --model tiny --replicas 2          # the Ray Serve deployment
    python bench/studies/serve_load.py --model random-sd15 --size 256x256 --steps 10 --requests 8

It starts the server itself (`python -m sdfast.cli serve` on 127.0.0.1 and a free port; never
any other address), waits for /health, fires the requests, stops the server with SIGTERM, and
prints one table row per configuration plus a JSON file. Bounded: --requests in all, and the
load stops sending after --max-seconds (requests already sent finish).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"  # loopback only, by construction


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def sequential(args, prompts: list[tuple[str, int]]) -> dict:
    """The baseline: the same requests one after another through Pipeline.generate, in this process."""
    if args.kernels == "batch-invariant":
        from sdfast.serve.invariance import use_batch_invariant_kernels

        use_batch_invariant_kernels()
    import sdfast

    h, w = args.height, args.width
    pipe = sdfast.load(args.model, dtype=args.dtype)
    pipe.warmup(height=h, width=w, steps=2)
    latencies = []
    t0 = time.perf_counter()
    for prompt, seed in prompts:
        if time.perf_counter() - t0 > args.max_seconds:
            break
        t = time.perf_counter()
        pipe.generate(prompt, height=h, width=w, steps=args.steps, seed=seed)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"mode": "sequential Pipeline.generate", "images": len(latencies), "wall_s": wall,
            "images_per_s": len(latencies) / wall, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "mean_batch": 1.0, "errors": 0, "dtype": pipe.precision.value}


def start_server(args, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sdfast.cli", "serve", "--model", args.model, "--dtype", args.dtype,
           "--host", HOST, "--port", str(port), "--max-batch", str(args.max_batch), "--max-wait-ms",
           str(args.max_wait_ms), "--kernels", args.kernels, "--batch-invariance", args.batch_invariance,
           "--max-queue", str(max(64, args.requests)), "--warmup-size", f"{args.width}x{args.height}"]
    if args.replicas:
        cmd += ["--ray", "--replicas", str(args.replicas), "--num-cpus", str(args.num_cpus)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)


def load(args, url: str, prompts: list[tuple[str, int]]) -> dict:
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    size = f"{args.width}x{args.height}"
    t0 = time.perf_counter()

    def one(item):
        prompt, seed = item
        if time.perf_counter() - t0 > args.max_seconds:
            return None  # bounded in time: not sent
        t = time.perf_counter()
        try:
            r = client.images.generate(prompt=prompt, size=size, extra_body={"seed": seed, "steps": args.steps})
        except openai.OpenAIError as e:
            return ("error", type(e).__name__)
        assert base64.b64decode(r.data[0].b64_json).startswith(b"\x89PNG")
        return ("ok", time.perf_counter() - t, r.model_extra["sdfast"]["batch_requests"])

    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        results = [r for r in pool.map(one, prompts) if r is not None]
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[0] == "ok"]
    errors: dict[str, int] = {}
    for r in results:
        if r[0] == "error":
            errors[r[1]] = errors.get(r[1], 0) + 1
    loops = None
    if not args.replicas:  # one server: its own loop count; Ray's /metrics is one replica's
        text = httpx.get(f"{url}/metrics", timeout=10).text
        vals = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
                if ln.startswith(("sdfast_batch_size_sum", "sdfast_batch_size_count"))}
        loops = vals.get("sdfast_batch_size_count")
    label = f"serve, {args.clients} clients" + (f", Ray x{args.replicas}" if args.replicas else "")
    label += f", max-batch {args.max_batch}, kernels {args.kernels}"
    return {"mode": label, "images": len(ok), "wall_s": wall, "images_per_s": len(ok) / wall,
            "p50_s": percentile([r[1] for r in ok], 50), "p99_s": percentile([r[1] for r in ok], 99),
            # request-weighted: the batch each answered request ran in (loops: from /metrics)
            "mean_batch": statistics.fmean(r[2] for r in ok) if ok else float("nan"),
            "loops": loops, "errors": sum(errors.values()), "errors_by_kind": errors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--size", default=None, help="WxH (default: the model's native size)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--clients", type=int, default=8, help="concurrent openai clients (at most 64)")
    p.add_argument("--requests", type=int, default=32, help="requests in all (at most 1000)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="stop sending after this long")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-wait-ms", type=float, default=25.0)
    p.add_argument("--kernels", default="fast", choices=["fast", "batch-invariant"])
    p.add_argument("--batch-invariance", default="allow", choices=["require", "allow"],
                   help="allow (default here): batch even where rows are not bit-identical, to measure it")
    p.add_argument("--replicas", type=int, default=0, help="0: one uvicorn server; N: Ray Serve with N replicas")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per Ray replica")
    p.add_argument("--no-sequential", action="store_true", help="skip the Pipeline.generate baseline")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 1 <= args.requests <= 1000:
        p.error("--clients must be 1..64 and --requests 1..1000 (a bounded benchmark)")

    from sdfast.model.info import resolve_model

    native = resolve_model(args.model).native_size
    w, _, h = (args.size or f"{native}x{native}").partition("x")
    args.width, args.height = int(w), int(h)
    prompts = [(f"a red circle {k % 7}", k) for k in range(args.requests)]

    rows = []
    if not args.no_sequential:
        rows.append(sequential(args, prompts))  # before the server starts: they never share the CPU
    port = free_port()
    url = f"http://{HOST}:{port}"
    log = Path(args.json or "serve_load").with_suffix(".server.log")
    proc = start_server(args, port, log)
    try:
        wait_healthy(proc, url, log, timeout=600)
        rows.append(load(args, url, prompts))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"\nmodel {args.model} {args.width}x{args.height}, {args.steps} steps, dtype {args.dtype}, "
          f"{args.requests} requests, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    print(f"{'mode':58s} {'img':>4s} {'img/s':>7s} {'p50 s':>7s} {'p99 s':>7s} {'batch':>6s} {'err':>4s}")
    for r in rows:
        print(f"{r['mode']:58s} {r['images']:4d} {r['images_per_s']:7.2f} {r['p50_s']:7.3f} {r['p99_s']:7.3f} "
              f"{r['mean_batch']:6.2f} {r['errors']:4d}")
    if args.json:
        out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               "config": {k: v for k, v in vars(args).items() if k != "json"}, "results": rows}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
