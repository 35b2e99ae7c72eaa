"""Command line: `sdfast generate | export | parity | bench | serve | info` (also `python -m sdfast`).

A user error (bad value, missing file, size outside an engine's profile) prints one line that
names the argument, the rule and the fix, and exits 2: never a traceback, never a partial output
file. Each subcommand lives in its own module and registers itself through `COMMANDS`.

Start-up is lazy: `sdfast --help` (and `sdfast` with no command, which prints the same help)
imports none of the commands' modules, so neither torch; a command's module, and whatever it
imports, loads only when that command is asked for.

Threads: every command takes `--threads N` (also `sdfast --threads N COMMAND`); the default is
`hardware.default_threads()`: the cores this process may use, less the load other processes put
on them, at least 1 (a 2-core machine at load 8 runs the quick start in 0.7 s on 1 thread and
7 s on 2). An OMP_NUM_THREADS in the environment is respected as the default.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import InvalidArgument, MissingFile, NoSpace

#: subcommand -> (module under sdfast that defines `register(subparsers)`, its one-line help).
#: The help is repeated here so that `sdfast --help` lists the commands without importing them;
#: tests/test_cli.py checks it is the text each module registers.
COMMANDS = {
    "generate": ("generate", "generate an image from a prompt"),
    "export": ("export", "export engines for a model ({formats})"),
    "parity": ("parity", "measure a backend against eager fp32 (exit 1 on a missed tolerance)"),
    "bench": ("bench", "time backends against diffusers, stage by stage"),
    "info": ("info", "show versions, devices, backends and built-in models"),
    "serve": ("serve", "serve the OpenAI Images API over HTTP, with request batching"),
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
  sdfast serve --model tiny --port 8000
  sdfast info

`sdfast COMMAND --help` lists each command's flags with their defaults.
"""

THREADS_HELP = ("CPU threads of torch, ONNX Runtime and OpenVINO (default: the cores this process may use, "
                "less the load other processes put on them, at least 1; or $OMP_NUM_THREADS when set)")


def _backends_epilog() -> str:
    from ..backends import BACKENDS

    rows = []
    for b in BACKENDS.values():
        fmt = b.format or "(no export)"
        rows.append(f"  {b.name:<12} {fmt:<12} {b.summary}")
    return "\n".join(rows)


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of threads, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 but is {n}")
    return n


def build_parser(full: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``full`` names the commands registered with all their flags (None: every
    command). The others are listed with their one-line help only, so their modules stay
    unimported."""
    parser = argparse.ArgumentParser(
        prog="sdfast", description="Fast Stable Diffusion inference with measured parity against eager PyTorch.",
        epilog=EPILOG.format(backends=_backends_epilog()), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sdfast {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--threads", dest="global_threads", type=_threads, default=None, metavar="N",
                        help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if full is None or name in full:
            importlib.import_module(f".{module}", __package__).register(sub)
            p = sub.choices[name]
            if not any("--threads" in a.option_strings for a in p._actions):
                p.add_argument("--threads", type=_threads, default=None, metavar="N", help=THREADS_HELP)
        else:
            from ..backends import FORMATS

            sub.add_parser(name, help=help_text.format(formats=", ".join(FORMATS)))
    return parser


def command_in(argv: list[str]) -> str | None:
    """The subcommand ``argv`` asks for: its first word that names one (a global flag's value
    is a number, never a command name)."""
    for word in argv:
        if word == "--":
            return None
        if word in COMMANDS:
            return word
    return None


def apply_threads(args: argparse.Namespace) -> int:
    """Set the thread count a command runs with (--threads, else the default); returns it."""
    from ..hardware import default_threads

    n = getattr(args, "threads", None) or args.global_threads
    if n is None:
        n, why = default_threads()
        logging.getLogger(__name__).debug("threads: %d (%s)", n, why)
    import torch

    torch.set_num_threads(n)
    return n


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = command_in(argv)
    parser = build_parser(full=[command] if command else [])
    args = parser.parse_args(argv)
    if args.command is None:  # `sdfast` alone: the help, not an error
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    import torch

    previous = torch.get_num_threads()  # main() called in-process (tests) leaves torch as it was
    try:
        apply_threads(args)
        return int(args.handler(args) or 0)
    except (InvalidArgument, MissingFile) as e:
        print(f"sdfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NoSpace as e:  # not the user's input, nor a bug: the machine; 1 like any failed write
        print(f"sdfast {args.command}: error: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sdfast {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    sys.exit(main())
