"""`sdfast bench`: per-stage timings of each backend and of diffusers on one model and shape."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import InvalidArgument

DESCRIPTION = """Benchmark sdfast backends against diffusers' StableDiffusionPipeline.

Every backend and dtype asked for, plus diffusers on the same torch modules, runs the same
prompt, scheduler, steps, size and seed in this process: --warmup untimed runs, then --repeat
timed runs. The table gives p50 (p90) per stage, latency p50/p99, images/s, peak memory,
achieved TFLOP/s and share of the device peak, and the speed-up over diffusers. Backends that
need engines are exported into the cache first (or read from --engines); export time is shown
apart. Models named random-* have random weights: every output says so.
"""

EXAMPLES = """examples:
  sdfast bench --model tiny --backends torch --steps 4 --height 64 --width 64
  sdfast bench --model random-sd15 --backends torch,onnxruntime --dtype fp32,bf16 \\
      --steps 10 --height 256 --width 256 --repeat 3 --json bench.json --plot bench.png
"""


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(x) for x in text.split(",") if x.strip()]
    return parse


def register(sub: argparse._SubParsersAction) -> None:
    from ..backends import BACKENDS
    from ..model.components import Precision
    from ..model.info import builtin_models
    from ..schedulers import SCHEDULERS

    precisions = ", ".join(p.value for p in Precision if p is not Precision.INT8)  # int8: an export precision
    p = sub.add_parser("bench", help="time backends against diffusers, stage by stage",
                       description=DESCRIPTION, epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ", ".join(builtin_models())
    p.add_argument("--model", default="tiny", help=f"diffusers model folder, hub id, or built-in ({names}); default tiny")
    p.add_argument("--backends", default="torch", metavar="B[,B...]",
                   help=f"comma-separated backends, from {', '.join(BACKENDS)} (default torch)")
    p.add_argument("--dtype", default="fp32", metavar="T[,T...]",
                   help=f"comma-separated precisions, from {precisions} (default fp32)")
    p.add_argument("--batch", default=["1"], nargs="+", metavar="B",
                   help="images per call; several sizes as '1,4' or '1 4' (default 1)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps (default 10)")
    p.add_argument("--height", type=int, default=None, help="image height (default: the model's native size)")
    p.add_argument("--width", type=int, default=None, help="image width (default: the model's native size)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per row (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them (default 1)")
    p.add_argument("--scheduler", default="lms", choices=list(SCHEDULERS), help="sampling algorithm (default lms)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="guidance scale (default 7.5: U-Net batch 2B)")
    p.add_argument("-s", "--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--prompt", default=None, help="prompt (default: a fixed astronaut prompt)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--engines", default=None, metavar="DIR",
                   help="artifact folder from `sdfast export` for the non-torch backends (default: export into the cache)")
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers reference rows")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="bar chart of the stages (needs matplotlib)")
    p.set_defaults(handler=run)


def build_config(args: argparse.Namespace):
    from ..measure.bench import DEFAULT_PROMPT, BenchConfig

    try:
        batches = [b for text in args.batch for b in _csv(int)(text)]
    except ValueError:
        raise InvalidArgument(f"batch: {' '.join(args.batch)!r} is not a list of integers; use e.g. --batch 1,4") from None
    return BenchConfig(
        model=args.model, backends=_csv(str.strip)(args.backends), dtypes=_csv(str.strip)(args.dtype),
        batches=batches, steps=args.steps, height=args.height, width=args.width, repeat=args.repeat,
        warmup=args.warmup, scheduler=args.scheduler, guidance_scale=args.guidance_scale, seed=args.seed,
        device=args.device, engines=args.engines, prompt=args.prompt or DEFAULT_PROMPT,
        diffusers=not args.no_diffusers,
    )


def run(args: argparse.Namespace) -> int:
    from ..measure.bench import run_bench, validate
    from ..measure.report import check_plot_available, format_table, write_json, write_plot

    cfg = build_config(args)
    for flag, path, suffix in (("json", args.json, ".json"), ("plot", args.plot, ".png")):
        if path is None:
            continue
        if Path(path).suffix.lower() != suffix:
            raise InvalidArgument(f"{flag}: {path!r} must end in {suffix}")
        if Path(path).is_dir():
            raise InvalidArgument(f"{flag}: {path!r} is a folder; pass a file path")
    if args.plot:
        check_plot_available()
    validate(cfg)  # every rule before the (long) run
    report = run_bench(cfg, progress=lambda line: print(f"sdfast bench: {line}", file=sys.stderr, flush=True))
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
