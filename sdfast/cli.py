"""Command line: ``sdfast generate | export | parity | bench | info``.

A user error (bad value, missing file, size outside an engine's profile) prints one line that
names the argument, the rule and the fix, and exits 2: never a traceback, never a partial output
file. Each subcommand lives in its own module and registers itself through ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import InvalidArgument, MissingFile

#: subcommand -> module under sdfast that defines ``register(subparsers)``.
COMMANDS = {
    "generate": "cli_generate",
    "export": "cli_export",
    "parity": "cli_parity",
    "bench": "cli_bench",
    "info": "cli_info",
}

EPILOG = """examples:
  sdfast generate "a red circle on a blue background" --out circle.png
  sdfast generate "a cat" --model ./stable-diffusion-v1-5 --steps 30 --dtype bf16
  sdfast export --model tiny --out engines/tiny --format onnx --precision fp32
  sdfast generate "a cat" --backend onnxruntime --engines engines/tiny
  sdfast info
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdfast", description="Fast Stable Diffusion inference with measured parity against eager PyTorch.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdfast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(f".{module}", __package__)
        except ModuleNotFoundError as e:
            if e.name == f"{__package__}.{module}":
                continue  # subcommand not part of this build
            raise
        mod.register(sub)
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
