"""Command line: `sdfast generate | export | parity | bench | info` (also `python -m sdfast`).

A user error (bad value, missing file, size outside an engine's profile) prints one line that
names the argument, the rule and the fix, and exits 2: never a traceback, never a partial output
file. Each subcommand lives in its own module and registers itself through `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import InvalidArgument, MissingFile

#: subcommand -> module under sdfast that defines `register(subparsers)`.
COMMANDS = {
    "generate": "cli_generate",
    "export": "cli_export",
    "parity": "cli_parity",
    "bench": "cli_bench",
    "info": "cli_info",
    "serve": "cli_serve",
}

EPILOG = """backends (`sdfast info` says which can run here):
  name         --format
{backends}

examples:
  sdfast generate "a red circle on a blue background" --scheduler euler --steps 20 --out circle.png
  sdfast generate "a cat" --model ./stable-diffusion-v1-5 --steps 30 --dtype bf16
  sdfast export --model tiny --out engines/tiny --format onnx --precision fp32
  sdfast generate "a white triangle on a green background" --backend onnxruntime --engines engines/tiny
  sdfast parity --engines engines/tiny --backend onnxruntime
  sdfast info

`sdfast COMMAND --help` lists each command's flags with their defaults.
"""


def _backends_epilog() -> str:
    from .backends import BACKENDS

    rows = []
    for b in BACKENDS.values():
        fmt = b.format or "(no export)"
        rows.append(f"  {b.name:<12} {fmt:<12} {b.summary}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdfast", description="Fast Stable Diffusion inference with measured parity against eager PyTorch.",
        epilog=EPILOG.format(backends=_backends_epilog()), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdfast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        importlib.import_module(f".{module}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except (InvalidArgument, MissingFile) as e:
        print(f"sdfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sdfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
