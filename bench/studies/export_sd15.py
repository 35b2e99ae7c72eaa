"""Export cost of an SD 1.5-sized U-Net (random weights) and ORT-CPU vs eager step time.

Not a test: a measurement. Each export runs in its own process so its peak RSS is its own.

    python bench/studies/export_sd15.py [--out DIR] [--threads 1] [--json OUT]

Prints one table and writes JSON: export seconds and peak RSS (fp32, fp16), file sizes, and
the U-Net step time at 256x256 (latents 32x32, batch 2 = one guided image) on ONNX Runtime
CPU and eager PyTorch, both at --threads.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDE = 256
BATCH = 1  # images; the guided U-Net call is 2 × this


def make_unet(dtype):
    from sdfast.model.info import load_torch_modules, resolve_model

    return load_torch_modules(resolve_model("random-sd15"), dtype=dtype, parts=("unet",))["unet"]


def child_export(precision: str, out: Path, threads: int) -> dict:
    """The real export path (`sdfast export ... --precision P`) on the U-Net of random-sd15."""
    import torch

    from sdfast.export.onnx import OnnxExportOptions, export_onnx
    from sdfast.model.components import Precision, ShapeProfile
    from sdfast.model.info import resolve_model

    torch.set_num_threads(threads)
    prec = Precision(precision)
    info = resolve_model("random-sd15")
    t0 = time.perf_counter()
    export_onnx(info, out, ShapeProfile.static(BATCH, SIDE, SIDE), OnnxExportOptions(precision=prec),
                components=("unet",))
    seconds = time.perf_counter() - t0
    return {"precision": precision, "export_s": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "files_mb": {f.name: f.stat().st_size / 2**20 for f in sorted(out.iterdir())}}


def child_steps(onnx_path: Path, threads: int, repeat: int) -> dict:
    import numpy as np
    import torch

    from sdfast.engines.onnxruntime import session_options

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2 * BATCH, 4, SIDE // 8, SIDE // 8, generator=g)  # (2B, C, h, w)
    t = torch.tensor([500.0])
    text = torch.randn(2 * BATCH, 77, 768, generator=g)  # (2B, S, D)

    def timeit(fn) -> float:
        fn()  # warm-up (ORT allocates and plans on the first run)
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), sess_options=session_options(threads),
                                providers=["CPUExecutionProvider"])
    feeds = {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": text.numpy()}
    ort_s = timeit(lambda: sess.run(None, feeds))
    ort_out = torch.from_numpy(sess.run(None, feeds)[0])
    sess = None  # free its arena before the eager model loads
    unet = make_unet(torch.float32)  # diffusers' default attention (SDPA): the eager baseline
    with torch.inference_mode():
        eager_s = timeit(lambda: unet(sample, t, text, return_dict=False))
        ref = unet(sample, t, text, return_dict=False)[0]
    return {"ort_cpu_step_s": ort_s, "eager_step_s": eager_s, "speedup": eager_s / ort_s,
            "max_abs_diff": (ref - ort_out).abs().max().item(), "threads": threads, "repeat": repeat}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="where the exports go (default: a temp folder, removed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, arg = args.child
        res = child_export(kind, Path(arg), args.threads) if kind in ("fp32", "fp16") else \
            child_steps(Path(arg), args.threads, args.repeat)
        print("RESULT " + json.dumps(res))
        return 0
    with tempfile.TemporaryDirectory(prefix="sd15-export-") as scratch:
        root = Path(args.out or scratch)
        results = {}
        for kind, arg in (("fp32", root / "fp32"), ("fp16", root / "fp16"), ("steps", root / "fp32" / "unet.onnx")):
            r = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--repeat", str(args.repeat),
                                "--child", kind, str(arg)], capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode or not line:
                print(f"{kind} failed:\n{r.stderr[-3000:]}", file=sys.stderr)
                return 1
            results[kind] = json.loads(line[0][len("RESULT "):])
    print(f"SD 1.5 U-Net, random weights, {SIDE}x{SIDE}, threads={args.threads}")
    print(f"{'export':<8}{'seconds':>10}{'peak RSS MB':>14}  files (MB)")
    for k in ("fp32", "fp16"):
        r = results[k]
        files = ", ".join(f"{n} {mb:.0f}" for n, mb in r["files_mb"].items())
        print(f"{k:<8}{r['export_s']:>10.1f}{r['peak_rss_mb']:>14.0f}  {files}")
    s = results["steps"]
    print(f"U-Net step (batch {2 * BATCH}, latents {SIDE // 8}x{SIDE // 8}): ORT CPU {s['ort_cpu_step_s']:.3f} s, "
          f"eager {s['eager_step_s']:.3f} s, eager/ORT {s['speedup']:.2f}x, max abs diff {s['max_abs_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
