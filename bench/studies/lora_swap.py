"""LoRA swap cost on the SD 1.5 architecture (random weights), beside what a user does without it.

Not a test: a measurement. A rank-``--rank`` kohya LoRA on every attention and feed-forward linear of
the U-Net and every linear of the text encoder (what a full-coverage style LoRA changes), written
from seeded random weights; then, at ``--threads``:

- read:        reading and checking the file (sdfast.lora.read_lora: safetensors + sha256);
- apply:       Pipeline.set_loras([A]) on the base (the first fuse also copies the touched weights);
- swap A->B:   set_loras([B]) with A fused (restore A's layers + fuse B);
- restore:     set_loras([]) (bit-exact base);
- reload:      sdfast.load of the whole torch pipeline (what a swap would cost without LoRA support);
- diffusers apply / swap A->B: diffusers' load_lora_weights + fuse_lora, and unfuse_lora +
               unload_lora_weights + load_lora_weights(B) + fuse_lora, on modules of its own;
- ort session: building the ONNX Runtime session of the exported U-Net (--onnx DIR, optional): the
               floor of any ONNX Runtime swap that rebuilds its session with overridden weights.

Rounds are interleaved (each row once per round), best and median printed with process CPU time.

    python bench/studies/lora_swap.py [--rank 64] [--threads 1] [--rounds 3] [--onnx DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

UNET_LINEARS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def write_lora(path: Path, modules: dict, rank: int, seed: int) -> Path:
    """A kohya-format LoRA of ``rank`` on the layers a full-coverage style LoRA changes."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for group, prefix, names in (("unet", "lora_unet_", UNET_LINEARS), ("text_encoder", "lora_te_", TEXT_LINEARS)):
        for name, m in modules[group].named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(names):
                continue
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1):
                continue
            w = m.weight
            stem = prefix + ("text_model." + name if group == "text_encoder" else name).replace(".", "_")
            ks = tuple(w.shape[2:])
            tensors[stem + ".lora_down.weight"] = torch.randn((rank, w.shape[1], *ks), generator=g) * 0.01
            tensors[stem + ".lora_up.weight"] = torch.randn((w.shape[0], rank, *((1,) * len(ks))), generator=g) * 0.01
            tensors[stem + ".alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def timed(fn) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def summarize(rows: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    """Each row's best and median wall time and median process CPU time."""
    return {name: {"best_s": min(w for w, _ in v), "median_s": statistics.median(w for w, _ in v),
                   "median_cpu_s": statistics.median(c for _, c in v)} for name, v in rows.items()}


def print_table(summary: dict[str, dict[str, float]], width: int = 16) -> None:
    print(f"{'row':<{width}}{'best s':>9}{'median s':>10}{'cpu s':>8}")
    for name, r in summary.items():
        print(f"{name:<{width}}{r['best_s']:>9.3f}{r['median_s']:>10.3f}{r['median_cpu_s']:>8.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="random-sd15", help="model (default random-sd15, the SD 1.5 architecture)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--onnx", default=None, metavar="DIR", help="an `sdfast export --format onnx` folder of the model")
    ap.add_argument("--json", default=None, metavar="OUT")
    args = ap.parse_args()

    import torch

    import sdfast
    from sdfast.cli.info import cpu_model_name
    from sdfast.hardware import busy_cpus
    from sdfast.lora import read_lora

    torch.set_num_threads(args.threads)
    pipe = sdfast.load(args.model)
    rows: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="lora-swap-") as tmp:
        mods = pipe._lora_modules()
        a = write_lora(Path(tmp) / "a.safetensors", mods, args.rank, 1)
        b = write_lora(Path(tmp) / "b.safetensors", mods, args.rank, 2)
        size_mb = a.stat().st_size / 2**20
        layers = len(read_lora(a).layers)
        from sdfast.measure.bench import diffusers_pipeline
        from sdfast.model.info import load_torch_modules

        ref = diffusers_pipeline(pipe.info, load_torch_modules(pipe.info), "euler")

        def ref_apply():
            ref.load_lora_weights(str(a))
            ref.fuse_lora()

        def ref_swap():
            ref.unfuse_lora()
            ref.unload_lora_weights()
            ref.load_lora_weights(str(b))
            ref.fuse_lora()

        def ref_clear():
            ref.unfuse_lora()
            ref.unload_lora_weights()

        sess = None
        for _ in range(args.rounds):
            rows.setdefault("read", []).append(timed(lambda: read_lora(a)))
            rows.setdefault("apply", []).append(timed(lambda: pipe.set_loras([a])))
            rows.setdefault("swap A->B", []).append(timed(lambda: pipe.set_loras([b])))
            rows.setdefault("restore", []).append(timed(lambda: pipe.set_loras([])))
            pipe._fused = None  # the next apply is a first one again (copies the base)
            rows.setdefault("reload", []).append(timed(lambda: sdfast.load(args.model)))
            rows.setdefault("diffusers apply", []).append(timed(ref_apply))
            rows.setdefault("diffusers A->B", []).append(timed(ref_swap))
            ref_clear()
            if args.onnx:
                import onnxruntime as ort

                from sdfast.engines.onnxruntime import session_options

                sess = None

                def build(onnx_unet=str(Path(args.onnx) / "unet.onnx")):
                    nonlocal sess
                    sess = ort.InferenceSession(onnx_unet, sess_options=session_options(args.threads),
                                                providers=["CPUExecutionProvider"])

                rows.setdefault("ort session", []).append(timed(build))
                sess = None
    summary = summarize(rows)
    cpu = f"{cpu_model_name()}, {busy_cpus():.1f} CPUs busy at the end"
    print(f"{args.model}, rank-{args.rank} LoRA ({layers} layers, {size_mb:.0f} MB), threads={args.threads}, "
          f"{args.rounds} interleaved rounds; {cpu}")
    print_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rank": args.rank, "layers": layers,
                                               "file_mb": size_mb, "threads": args.threads, "rounds": args.rounds,
                                               "cpu": cpu, "rows": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
