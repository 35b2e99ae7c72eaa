"""`sdfast parity`: a backend against eager fp32, per component and end to end; exit 1 on a miss."""

from __future__ import annotations

import argparse

from ..errors import InvalidArgument

DESCRIPTION = """Measure a backend against eager PyTorch fp32 on the same model and seed.

Compares each exported component with its eager twin (tier 1), then whole runs end to end for
each scheduler. Prints one row per check with its tolerance; exits 0 when every check passes,
1 on a miss, 2 on bad input.
"""


def register(sub: argparse._SubParsersAction) -> None:
    from ..backends import BACKENDS
    from ..measure.parity import DEFAULT_SCHEDULERS

    p = sub.add_parser("parity", help="measure a backend against eager fp32 (exit 1 on a missed tolerance)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="the model the engines were exported from (default tiny)")
    p.add_argument("--engines", default=None, metavar="DIR", help="artifact folder from `sdfast export`")
    p.add_argument("--backend", default="onnxruntime", choices=list(BACKENDS), metavar="NAME",
                   help=f"backend under test: {', '.join(BACKENDS)} (default onnxruntime)")
    p.add_argument("--device", default="cpu", help="device of the backend under test (default cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="precision of the backend under test (default: the export's)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps of the end-to-end runs (default 10)")
    p.add_argument("--schedulers", default=",".join(DEFAULT_SCHEDULERS),
                   help=f"comma-separated schedulers for the end-to-end runs (default {','.join(DEFAULT_SCHEDULERS)})")
    p.add_argument("-s", "--seed", type=int, default=0, help="seed of the end-to-end runs (default 0)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the report as JSON to OUT.json")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..measure.parity import run_parity
    from ..media import atomic_path
    from ..rules import check_choice, check_steps
    from ..schedulers import SCHEDULERS

    schedulers = tuple(s for s in args.schedulers.split(",") if s)
    if not schedulers:
        raise InvalidArgument(f"schedulers: the list is empty; choose from {', '.join(SCHEDULERS)}")
    for name in schedulers:
        check_choice("schedulers", name, SCHEDULERS)
    check_steps(args.steps)
    report = run_parity(args.model, args.backend, args.engines, args.device, args.dtype, args.steps, schedulers,
                        args.seed)
    print(report.table())
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(report.to_json(), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0 if report.passed else 1
