"""sdfast export: build an artifact folder (ONNX graphs, TensorRT plans, AOTInductor or OpenVINO
packages) for one shape profile, sealed by a hash-verified manifest.

The profile is --batch/--height/--width (the tuned shape) widened by the range flags
--min-X/--max-X (X = batch, height, width, chunks), --min-size/--max-size (both sides) or
--dynamic (batch 1..4, sides from half to twice the model's native size). Without any range
flag the export is static. Run the result with `sdfast generate --engines DIR` and check it
with `sdfast parity --engines DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from ..backends import BACKENDS, FORMATS, LORA_SLOT_FORMATS, ExportJob, for_format
from ..errors import InvalidArgument
from ..export.int8 import (
    DEFAULT_CALIBRATION_PROMPTS,
    DEFAULT_CALIBRATION_STEPS,
    DEFAULT_MODE,
    DEFAULT_SQ_ALPHA,
    MODES,
    QUANTIZABLE,
    Int8Options,
)
from ..model.components import CACHE_FORMATS, Precision, ShapeProfile, size_multiple
from ..rules import MAX_SIDE, MIN_SIDE  # the side limits of every request bound every profile too

log = logging.getLogger(__name__)

#: --dynamic: how far the profile reaches around the tuned shape.
DYNAMIC_MAX_BATCH = 4
DYNAMIC_SIZE_FACTOR = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=f"export engines for a model ({', '.join(FORMATS)})", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="diffusers model folder, hub id or built-in name (default tiny)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="artifact folder to write: new, empty, or an earlier sdfast export (replaced atomically)")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="artifact format (default onnx)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"], help="text encoder and U-Net precision (default fp32; bf16: OpenVINO on CPUs with bf16 units; int8: OpenVINO through NNCF, the U-Net quantized, see --int8-mode)")
    p.add_argument("--vae-precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="VAE precision (default fp32, even with --precision fp16: the SD VAE overflows fp16)")
    p.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="fuse a LoRA into the exported weights (repeatable; recorded with its sha256 in the "
                        "manifest; the engines then run only with the same --lora set)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="onnx, openvino: give the U-Net's attention layers and the text encoders LoRA slots of rank R "
                        "(the summed rank of LoRAs used together, e.g. 64), so generate --lora / serve --lora-dir swap "
                        "LoRAs on these engines without re-export; costs time per U-Net call even without a LoRA "
                        "(see the README's LoRA section; default 0: none)")
    p.add_argument("--batch", type=int, default=1, help="images per call the engines are tuned for (default 1)")
    p.add_argument("--height", type=int, default=None, help="image height tuned for (default: native size)")
    p.add_argument("--width", type=int, default=None, help="image width tuned for (default: native size)")
    for dim in ("batch", "height", "width"):
        p.add_argument(f"--min-{dim}", type=int, default=None, help=f"smallest {dim} served (default: --{dim})")
        p.add_argument(f"--max-{dim}", type=int, default=None, help=f"largest {dim} served (default: --{dim})")
    p.add_argument("--min-size", type=int, default=None, help="smallest height and width served")
    p.add_argument("--max-size", type=int, default=None, help="largest height and width served")
    p.add_argument("--min-chunks", type=int, default=1, metavar="K",
                   help="shortest prompt served, in text-encoder chunks of 75 tokens (default 1)")
    p.add_argument("--max-chunks", type=int, default=1, metavar="K",
                   help="longest prompt served, in chunks of 75 tokens (default 1: up to 75 tokens; long prompts "
                        "are encoded in chunks, see generate --long-prompt)")
    p.add_argument("--dynamic", action="store_true",
                   help=f"batch 1..{DYNAMIC_MAX_BATCH}, sides 1/{DYNAMIC_SIZE_FACTOR}x..{DYNAMIC_SIZE_FACTOR}x native")
    p.add_argument("--cache-branch", type=int, default=None, metavar="B",
                   help="also export DeepCache's two U-Net graphs cut at branch B (unet_deep, unet_shallow; "
                        "--format onnx or openvino): generate then takes --cache-interval N --cache-branch B")
    g = p.add_argument_group("int8 (--format openvino --precision int8; needs pip install 'sdfast[int8]')")
    g.add_argument("--int8-mode", default=None, metavar="MODE",
                   help="how NNCF quantizes: " + "; ".join(f"{k}: {v}" for k, v in MODES.items())
                        + f" (default {DEFAULT_MODE})")
    g.add_argument("--int8-base", default=None, choices=["fp32", "bf16"],
                   help="what int8 leaves in float computes in: the quantized component's other ops and the other "
                        "components (default fp32)")
    g.add_argument("--int8-components", default=None, metavar="C[,C...]",
                   help=f"components to quantize, from {', '.join(QUANTIZABLE)} (default unet)")
    g.add_argument("--int8-calibration", default=None, metavar="FILE",
                   help="calibration captions, one per line (default: the toy captions for the toy model, else "
                        "sdfast.export.int8.DEFAULT_PROMPTS)")
    g.add_argument("--int8-calibration-prompts", type=int, default=None, metavar="N",
                   help=f"captions generated for calibration (default {DEFAULT_CALIBRATION_PROMPTS})")
    g.add_argument("--int8-calibration-steps", type=int, default=None, metavar="S",
                   help=f"steps per calibration generation; every U-Net call is one sample (default "
                        f"{DEFAULT_CALIBRATION_STEPS})")
    g.add_argument("--int8-seed", type=int, default=None, help="seed of the first calibration generation (default 0)")
    g.add_argument("--int8-sq-alpha", type=float, default=None, metavar="A",
                   help=f"smoothquant mode: NNCF's SmoothQuant alpha for MatMuls (default {DEFAULT_SQ_ALPHA})")
    g.add_argument("--int8-no-speed-check", dest="int8_speed_check", action="store_false", default=None,
                   help="skip timing the int8 component against bf16 at export (the manifest then has no "
                        "speed_check, and no note if int8 is slower here)")
    for record in BACKENDS.values():  # each exporter's own flags, from its backend record
        for flag in record.flags:
            flag.add_to(p)
    p.set_defaults(handler=run)


def profile_from_args(args: argparse.Namespace, info) -> ShapeProfile:
    native = info.native_size
    batch = args.batch
    height = args.height if args.height is not None else native
    width = args.width if args.width is not None else native
    m = size_multiple(info)
    if args.dynamic:
        lo_side = max(MIN_SIDE, -(-native // DYNAMIC_SIZE_FACTOR // m) * m)
        hi_side = min(MAX_SIDE, native * DYNAMIC_SIZE_FACTOR // m * m)
        lo = {"batch": 1, "height": min(lo_side, height), "width": min(lo_side, width)}
        hi = {"batch": max(DYNAMIC_MAX_BATCH, batch), "height": max(hi_side, height), "width": max(hi_side, width)}
    else:
        lo = {"batch": batch, "height": height, "width": width}
        hi = dict(lo)
    for side in ("height", "width"):
        if args.min_size is not None:
            lo[side] = args.min_size
        if args.max_size is not None:
            hi[side] = args.max_size
    opt = {"batch": batch, "height": height, "width": width}
    for dim in ("batch", "height", "width"):
        if getattr(args, f"min_{dim}") is not None:
            lo[dim] = getattr(args, f"min_{dim}")
        if getattr(args, f"max_{dim}") is not None:
            hi[dim] = getattr(args, f"max_{dim}")
        if not lo[dim] <= opt[dim] <= hi[dim]:
            raise InvalidArgument(
                f"{dim}: --{dim} {opt[dim]} must lie within --min-{dim} {lo[dim]} .. --max-{dim} {hi[dim]}; "
                f"widen the range or change --{dim}"
            )
    profile = ShapeProfile(lo["batch"], batch, hi["batch"], lo["height"], height, hi["height"],
                           lo["width"], width, hi["width"], args.min_chunks, args.min_chunks, args.max_chunks)
    profile.validate(info)
    return profile


def run(args: argparse.Namespace) -> int:
    from ..export.base import check_export_out
    from ..lora_slots import check_rank
    from ..model.info import resolve_model

    info = resolve_model(args.model)
    if args.lora:
        from ..lora import parse_lora_arg

        info = info.with_loras([parse_lora_arg(text) for text in args.lora])  # read and checked before any work
    if args.cache_branch is not None:
        if args.format not in CACHE_FORMATS:
            raise InvalidArgument(f"cache-branch: DeepCache's graphs are exported for --format "
                                  f"{' or '.join(CACHE_FORMATS)}, not {args.format}; drop --cache-branch, or change --format")
        info = dataclasses.replace(info, cache_branch=args.cache_branch)
        info.specs  # noqa: B018  (refuses a branch outside the U-Net's, before any work)
    profile = profile_from_args(args, info)
    record = for_format(args.format)
    int8 = int8_options(args)
    for flag, value in (("precision", None if int8 else args.precision), ("vae-precision", args.vae_precision)):
        if value is not None and value not in record.precisions:
            raise InvalidArgument(f"{flag}: --format {args.format} builds {' or '.join(record.precisions)}, not {value}; "
                                  f"pass --{flag} {record.precisions[0]}" + (", or --format openvino for bf16 on the CPU"
                                                                           if value == "bf16" else ""))
    check_rank(args.lora_rank, "--lora-rank")
    if args.lora_rank and args.format not in LORA_SLOT_FORMATS:
        raise InvalidArgument(f"--lora-rank: LoRA slots are built for --format {' or '.join(LORA_SLOT_FORMATS)}, not "
                              f"{args.format}; drop --lora-rank (fuse a set at export with --lora) or change --format")
    if getattr(args, "refit", False) and args.format != "tensorrt":
        raise InvalidArgument(f"--refit: refittable plans are built for --format tensorrt, not {args.format}; drop "
                              "--refit (--lora-rank gives onnx and openvino engines LoRA slots)")
    record.require()
    if int8:
        from ..export.int8 import require_nncf

        require_nncf()
    # Before any work: --out is replaced as a whole, so it must be new, empty or an earlier export.
    out_dir = check_export_out(args.out, protect=info.path)
    job = ExportJob(info=info, out=out_dir, profile=profile, precision=Precision(args.precision),
                    vae_precision=Precision(args.vae_precision) if args.vae_precision else None,
                    model_arg=args.model, flags={**{f.dest: getattr(args, f.dest) for f in record.flags},
                                                 **({"int8": int8} if int8 else {})},
                    lora_rank=args.lora_rank)
    out = record.export(job)
    print(f"wrote {out} ({profile.describe()})")
    return 0


#: the formats whose exporters build int8 components (``--precision int8``).
INT8_FORMATS = ("openvino",)
_INT8_FLAGS = ("int8_mode", "int8_base", "int8_components", "int8_calibration", "int8_calibration_prompts",
               "int8_calibration_steps", "int8_seed", "int8_sq_alpha", "int8_speed_check")


def int8_options(args: argparse.Namespace) -> Int8Options | None:
    """The checked int8 options of ``--precision int8``; None otherwise (an --int8-* flag without
    it, or int8 for a format that cannot take it, is refused in one line)."""
    given = [f for f in _INT8_FLAGS if getattr(args, f, None) is not None]
    if args.precision != "int8":
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise InvalidArgument(f"{flag[2:]}: {flag} only applies with --precision int8 (--format openvino); "
                                  f"drop it, or pass --precision int8")
        return None
    if args.format not in INT8_FORMATS:
        raise InvalidArgument(f"precision: --precision int8 is built for --format {' or '.join(INT8_FORMATS)} "
                              f"(NNCF), not {args.format}; pass --format openvino, or --precision fp32")
    comps = tuple(c.strip() for c in args.int8_components.split(",") if c.strip()) if args.int8_components else None
    opts = Int8Options(mode=args.int8_mode or DEFAULT_MODE, base=Precision(args.int8_base or "fp32"),
                       components=comps if comps is not None else Int8Options.components,
                       calibration_file=args.int8_calibration,
                       calibration_prompts=(args.int8_calibration_prompts if args.int8_calibration_prompts is not None
                                            else DEFAULT_CALIBRATION_PROMPTS),
                       calibration_steps=(args.int8_calibration_steps if args.int8_calibration_steps is not None
                                          else DEFAULT_CALIBRATION_STEPS),
                       seed=args.int8_seed or 0,
                       sq_alpha=args.int8_sq_alpha if args.int8_sq_alpha is not None else DEFAULT_SQ_ALPHA,
                       speed_check=args.int8_speed_check is not False)
    opts.validate()
    return opts
