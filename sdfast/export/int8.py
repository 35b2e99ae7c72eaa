"""int8 OpenVINO components through NNCF post-training quantization.

``sdfast export --format openvino --precision int8 [--int8-mode MODE]`` converts every component
as the fp32 / bf16 export does, then quantizes the U-Net (``--int8-components`` for more)
calibrated on real inputs: the eager fp32 loop is run on a caption set and every call of the
component is recorded (``capture_calibration``). Modes (``MODES``):

- ``hybrid`` (default): optimum-intel's hybrid quantization for diffusion models. Every MatMul
  with a constant weight (attention projections, feed-forwards, time embedding) gets int8 weights
  only (``nncf.compress_weights`` INT8_ASYM: weights stored int8, decompressed for the float math),
  and ``nncf.quantize`` (``model_type=TRANSFORMER``, SmoothQuant off, those MatMuls in the ignored
  scope) quantizes weights *and* activations of the rest: the convolutions and the attention op.
- ``smoothquant``: full static quantization (every MatMul and convolution, weights and activations
  int8) with NNCF's SmoothQuant on the MatMuls (``AdvancedSmoothQuantParameters(matmul=alpha)``,
  ``--int8-sq-alpha``, NNCF's default 0.95), which moves activation outliers into the weights.
- ``weights``: ``nncf.compress_weights`` INT8_ASYM on every weighted op (MatMul and convolution),
  activations untouched: saves memory and bandwidth, not arithmetic; the comparison row.

What int8 leaves in float (the U-Net's unquantized ops, softmax, norms, and the other components)
computes in ``--int8-base`` (fp32 by default, the export's normal precision; bf16 asks the CPU
plugin for bf16 there). The component's record in the manifest keeps that base as its
``precision`` (its real I/O and inference hint, which the OpenVINO engine loads unchanged) and
adds ``quantization``: the mode, its NNCF settings, the calibration set and the nncf version.
``sdfast parity`` grades such an export at tier 3 (``parity.INT8_MIN_PSNR``).

Calibration captions: the toy captions for the shipped toy models (held-out evaluation captions
of tests/test_toy_model.py excluded, ``toy_calibration_prompts``), else ``DEFAULT_PROMPTS``, or
one caption per line from ``--int8-calibration FILE``. The capture is seeded (generation ``i``
uses ``seed + i``), so the same options record the same samples.

Whether int8 pays is the CPU's business, so export measures it: ``speed_check`` times a call of
the quantized component against the unquantized one in bf16 (fp32 without bf16 units) on the
tuned shape, and when int8 is not faster it logs a warning and writes ``quantization.note`` (also
when the CPU lacks int8 dot-product instructions, VNNI / AMX-INT8). Measured speed per mode and
machine is in bench/README.md ("int8").
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgument
from ..model.components import Precision

if TYPE_CHECKING:
    from ..model.components import ShapeProfile
    from ..model.info import ModelInfo

log = logging.getLogger(__name__)

#: mode -> what it does, for --help and errors.
MODES: dict[str, str] = {
    "hybrid": "int8 weights everywhere; int8 activations only at convolutions and attention (optimum-intel's "
              "hybrid SD recipe)",
    "smoothquant": "full static int8 (MatMuls and convolutions, weights and activations) with SmoothQuant",
    "weights": "int8 weights only (nncf.compress_weights INT8_ASYM), activations in float",
}
DEFAULT_MODE = "hybrid"
#: what the unquantized rest computes in.
BASES = (Precision.FP32, Precision.BF16)
#: components int8 may quantize (the VAE is not offered: its decoder makes the pixels).
QUANTIZABLE = ("unet", "text_encoder", "text_encoder_2")
DEFAULT_COMPONENTS = ("unet",)
#: NNCF's own default SmoothQuant alpha for MatMuls.
DEFAULT_SQ_ALPHA = 0.95
DEFAULT_CALIBRATION_PROMPTS = 8
DEFAULT_CALIBRATION_STEPS = 10
#: The default caption set for models other than the toy: varied subjects, styles and scenes.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse at dawn",
    "a bowl of ramen on a wooden table, studio lighting",
    "portrait of an old fisherman, dramatic light, 85mm",
    "a futuristic city skyline at night, neon, rain",
    "a red fox in a snowy forest, national geographic",
    "an oil painting of sunflowers in a vase",
    "a cozy living room with a fireplace, interior design",
    "a mountain lake reflecting pine trees, golden hour",
    "a cartoon robot waving, flat illustration",
    "a close-up of a hummingbird drinking nectar",
    "a medieval castle on a cliff above the sea",
    "a plate of sushi, top-down food photography",
    "a vintage car parked on a desert road",
    "a pencil sketch of a cat sleeping on a windowsill",
    "an aerial view of a tropical island",
)
#: Seeds of the toy model's held-out evaluation captions (tests/test_toy_model.py's eval_combos).
TOY_EVAL_SEED, TOY_EVAL_N = 0, 24


@dataclass(frozen=True)
class Int8Options:
    mode: str = DEFAULT_MODE
    base: Precision = Precision.FP32
    components: tuple[str, ...] = DEFAULT_COMPONENTS
    #: a file with one caption per line; None: the toy captions or DEFAULT_PROMPTS
    calibration_file: str | None = None
    calibration_prompts: int = DEFAULT_CALIBRATION_PROMPTS
    calibration_steps: int = DEFAULT_CALIBRATION_STEPS
    seed: int = 0
    sq_alpha: float = DEFAULT_SQ_ALPHA
    #: time the quantized component against the unquantized one at export (``speed_check``)
    speed_check: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(f"int8-mode: {self.mode!r} is not an int8 mode; use one of {', '.join(MODES)}")
        if Precision(self.base) not in BASES:
            raise InvalidArgument(f"int8-base: int8 leaves the rest in fp32 or bf16, not {Precision(self.base).value}; "
                                  "pass --int8-base fp32 or bf16")
        bad = [c for c in self.components if c not in QUANTIZABLE]
        if bad or not self.components:
            raise InvalidArgument(f"int8-components: {bad[0] if bad else 'nothing'!r} cannot be quantized; "
                                  f"name some of {', '.join(QUANTIZABLE)} (the VAE stays in float)")
        if self.calibration_prompts < 1 or self.calibration_steps < 1:
            raise InvalidArgument("int8-calibration-prompts / int8-calibration-steps: must be at least 1")
        if not 0 < self.sq_alpha < 1:
            raise InvalidArgument(f"int8-sq-alpha: {self.sq_alpha} is outside (0, 1); NNCF's default is "
                                  f"{DEFAULT_SQ_ALPHA}")

    def flags(self) -> list[str]:
        """The export-command flags that rebuild these options."""
        out = ["--int8-mode", self.mode, "--int8-base", Precision(self.base).value,
               "--int8-components", ",".join(self.components),
               "--int8-calibration-prompts", str(self.calibration_prompts),
               "--int8-calibration-steps", str(self.calibration_steps), "--int8-seed", str(self.seed)]
        if self.calibration_file:
            out += ["--int8-calibration", str(self.calibration_file)]
        if self.mode == "smoothquant":
            out += ["--int8-sq-alpha", f"{self.sq_alpha:g}"]
        if not self.speed_check:
            out += ["--int8-no-speed-check"]
        return out


def require_nncf():
    try:
        import nncf
    except ImportError:
        raise InvalidArgument("precision: int8 needs NNCF, not installed; pip install 'sdfast[int8]' "
                              "(or pip install nncf)") from None
    return nncf


# -- calibration captions and samples ----------------------------------------------------------

def is_toy(info: ModelInfo) -> bool:
    """The shipped trained toy models (their captions are the toy world's)."""
    from ..model.info import PACKAGED_TINY, PACKAGED_TINY_LCM

    return any(Path(info.path).resolve() == p.resolve() for p in (PACKAGED_TINY, PACKAGED_TINY_LCM) if p.exists())


def toy_eval_prompts() -> list[str]:
    """The toy model's held-out evaluation captions (tests/test_toy_model.py draws the same 24)."""
    from .. import toy

    everything = toy.combos()
    pick = np.random.default_rng(TOY_EVAL_SEED).choice(len(everything), size=TOY_EVAL_N, replace=False)
    return [toy.TEMPLATES[0].format(colour=c, shape=s, background=b) for s, c, b in (everything[i] for i in sorted(pick))]


def toy_calibration_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` toy captions (templates rotating) whose combination is not a held-out evaluation one."""
    from .. import toy

    held = set(toy_eval_prompts())
    rng = np.random.default_rng(1000 + seed)
    out = []
    for k, i in enumerate(rng.permutation(len(toy.combos()))):
        s, c, b = toy.combos()[i]
        if toy.TEMPLATES[0].format(colour=c, shape=s, background=b) in held:
            continue
        out.append(toy.TEMPLATES[k % len(toy.TEMPLATES)].format(colour=c, shape=s, background=b))
        if len(out) == n:
            break
    return out


def calibration_prompts(info: ModelInfo, options: Int8Options) -> tuple[list[str], str]:
    """(captions, where they came from)."""
    n = options.calibration_prompts
    if options.calibration_file:
        path = Path(options.calibration_file)
        try:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"int8-calibration: cannot read {path} ({e}); pass a UTF-8 file, one caption "
                                  "per line") from None
        if not lines:
            raise InvalidArgument(f"int8-calibration: {path} holds no caption; one caption per line")
        return [lines[i % len(lines)] for i in range(n)], f"file {path}"
    if is_toy(info):
        return toy_calibration_prompts(n, options.seed), "toy captions (held-out evaluation captions excluded)"
    return [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(n)], "sdfast.export.int8.DEFAULT_PROMPTS"


@dataclass
class Calibration:
    prompts: list[str]
    source: str
    steps: int
    seed: int
    #: component -> one list of input arrays (spec order) per recorded call
    samples: dict[str, list[list[np.ndarray]]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "prompts": len(self.prompts), "steps": self.steps, "seed": self.seed,
                "samples": {k: len(v) for k, v in self.samples.items()}}


def capture_calibration(info: ModelInfo, profile: ShapeProfile, options: Int8Options,
                        components: tuple[str, ...] | None = None) -> Calibration:
    """Run the eager fp32 loop on the calibration captions at the profile's tuned shape (batch
    ``opt_batch`` prompts a call, so the guided U-Net sees its tuned ``2 × batch`` rows) and keep
    every input of ``components`` (default ``options.components``)."""
    import torch

    from .. import load
    from ..engines.base import WrappedEngine

    components = components or options.components
    prompts, source = calibration_prompts(info, options)
    cal = Calibration(prompts, source, options.calibration_steps, options.seed, {c: [] for c in components})
    pipe = load(info, backend="torch", device="cpu", dtype="fp32")

    def recorder(name: str, engine):
        names = engine.spec.input_names

        def call(**inputs):
            cal.samples[name].append([inputs[n].detach().float().cpu().contiguous().numpy().copy() for n in names])
            return engine(**inputs)
        return WrappedEngine(engine, call)

    for c in components:
        pipe.engines[c] = recorder(c, pipe.engines[c])
    b = profile.opt_batch
    with torch.inference_mode():
        for k, i in enumerate(range(0, len(prompts), b)):
            chunk = prompts[i:i + b]
            chunk += chunk[:1] * (b - len(chunk))  # the last call at the tuned batch too
            pipe.generate(chunk, height=profile.opt_height, width=profile.opt_width,
                          steps=options.calibration_steps, seed=options.seed + k)
    del pipe
    log.info("int8 calibration: %s", ", ".join(f"{len(v)} {k} calls" for k, v in cal.samples.items()))
    return cal


# -- quantization ------------------------------------------------------------------------------

def _const_input(op, port: int) -> bool:
    """Whether input ``port`` of ``op`` comes from a constant (through Convert / Reshape / FakeQuantize),
    as optimum-intel's ``_get_operation_const_op`` reads it."""
    node = op.input_value(port).get_node()
    while True:
        kind = node.get_type_name()
        if kind == "Constant":
            return True
        if kind not in ("Convert", "FakeQuantize", "Reshape") or not node.inputs():
            return False
        node = node.input_value(0).get_node()


def weighted_matmuls(model) -> list[str]:
    """Friendly names of the MatMuls with a constant operand (linear layers) and of embedding
    Gathers: hybrid mode compresses their weights and keeps their activations in float."""
    out = []
    for op in model.get_ops():
        kind = op.get_type_name()
        if kind == "MatMul" and (_const_input(op, 0) or _const_input(op, 1)):
            out.append(op.get_friendly_name())
        elif kind == "Gather" and op.input_value(0).get_element_type().get_type_name() in ("f16", "f32", "f64") \
                and _const_input(op, 0):
            out.append(op.get_friendly_name())
    return out


def quantize_model(model, samples: list[list[np.ndarray]], options: Int8Options):
    """``model`` (an fp32-I/O ``ov.Model``) quantized per ``options.mode``; (model, settings record)."""
    nncf = require_nncf()
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    logging.getLogger("nncf").setLevel(logging.WARNING)  # its per-op INFO lines would flood the export log
    n = len(samples)
    if options.mode == "weights":
        out = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        return out, {"weights": "int8 asym per channel (nncf.compress_weights INT8_ASYM), every weighted op",
                     "activations": "float"}
    dataset = nncf.Dataset(samples)
    if options.mode == "hybrid":
        matmuls = weighted_matmuls(model)
        has_conv = any(op.get_type_name() == "Convolution" for op in model.get_ops())
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                           ignored_scope=nncf.IgnoredScope(types=["Convolution"]) if has_conv else None)
        out = nncf.quantize(compressed, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=n,
                            ignored_scope=nncf.IgnoredScope(names=matmuls, validate=False),
                            advanced_parameters=AdvancedQuantizationParameters(
                                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
        return out, {"weights": "int8: MatMuls weight-only (INT8_ASYM), convolutions int8 (nncf.quantize)",
                     "activations": "int8 at convolutions and attention; float at the weight-only MatMuls",
                     "weight_only_ops": len(matmuls), "model_type": "transformer", "smooth_quant": False,
                     "subset_size": n}
    out = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=n,
                        advanced_parameters=AdvancedQuantizationParameters(
                            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=options.sq_alpha)))
    return out, {"weights": "int8 (nncf.quantize), MatMuls and convolutions",
                 "activations": "int8 at every MatMul, convolution and attention",
                 "model_type": "transformer", "smooth_quant": {"matmul": options.sq_alpha}, "subset_size": n}


def cpu_int8_note() -> str | None:
    """Why int8 may not pay on this CPU (no int8 dot-product units), or None."""
    try:
        import openvino as ov

        caps = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    except Exception:  # noqa: BLE001 -- no openvino CPU plugin: nothing to say
        return None
    from ..hardware import cpu_flags

    flags = cpu_flags()
    if "INT8" not in caps or not ({"avx512_vnni", "avx_vnni", "amx_int8"} & flags):
        return ("this CPU has no int8 dot-product instructions (VNNI / AMX-INT8): int8 runs emulated and is "
                "expected to be slower than bf16 / fp32 here; measure before using it")
    return None


#: calls per model of the export's speed check (interleaved; the median is kept)
SPEED_CALLS = 3


def speed_check(quantized, reference, options: Int8Options, threads: int | None = None) -> dict[str, Any]:
    """Time one call of ``quantized`` (with ``options.base``'s hint) against the unquantized
    ``reference`` in bf16 (fp32 on a CPU without bf16 units) on the tuned shape, interleaved,
    median of SPEED_CALLS, process CPU time and wall; ``note`` says when int8 is not faster."""
    import time

    import openvino as ov
    import torch

    from ..engines.openvino import compile_config
    from ..hardware import cpu_bf16_supported

    ref_hint = "bf16" if cpu_bf16_supported() else "f32"
    threads = threads or torch.get_num_threads()
    core = ov.Core()
    reqs = {}
    for key, model, hint in (("int8", quantized, {"fp32": "f32", "bf16": "bf16"}[Precision(options.base).value]),
                             (ref_hint, reference, ref_hint)):
        req = core.compile_model(model, "CPU", compile_config(hint, threads)).create_infer_request()
        rng = np.random.default_rng(0)
        for i, port in enumerate(req.model_inputs):
            shape = [d.get_length() if d.is_static else d.get_min_length() for d in port.get_partial_shape()]
            req.set_input_tensor(i, ov.Tensor(rng.standard_normal(shape).astype(np.float32)))
        req.infer()  # warm-up
        reqs[key] = req
    cpu: dict[str, list[float]] = {k: [] for k in reqs}
    wall: dict[str, list[float]] = {k: [] for k in reqs}
    for _ in range(SPEED_CALLS):
        for k, req in reqs.items():
            w, c = time.perf_counter(), time.process_time()
            req.infer()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)
    med = {k: float(np.median(v)) for k, v in cpu.items()}
    ratio = med[ref_hint] / med["int8"]
    out = {"threads": threads, "calls": SPEED_CALLS, "against": ref_hint, "int8_cpu_s": med["int8"],
           f"{ref_hint}_cpu_s": med[ref_hint], "int8_wall_s": float(np.median(wall["int8"])),
           f"{ref_hint}_wall_s": float(np.median(wall[ref_hint])), "speedup": ratio}
    note = speed_note(options.mode, ratio, ref_hint)
    if note:
        out["note"] = note
    return out


def speed_note(mode: str, speedup: float, against: str) -> str | None:
    """What the export says when int8 is not faster than ``against`` on this machine."""
    if speedup >= 1.0:
        return None
    return (f"int8 {mode} measured {1 / speedup:.2f}x slower than {against} per call on this CPU at export; "
            f"--precision {'bf16' if against == 'bf16' else 'fp32'} is faster here")


def record(mode_settings: dict[str, Any], options: Int8Options, cal: Calibration | None,
           speed: dict[str, Any] | None = None) -> dict[str, Any]:
    from ..artifacts import package_version

    rec = {"mode": options.mode, "base": Precision(options.base).value, **mode_settings,
           "calibration": cal.record() if cal is not None else None, "nncf": package_version("nncf")}
    notes = [n for n in (cpu_int8_note(), (speed or {}).get("note")) if n]
    if speed is not None:
        rec["speed_check"] = speed
    if notes:
        rec["note"] = "; ".join(notes)
    return rec


def options_record(options: Int8Options) -> dict[str, Any]:
    d = asdict(options)
    d["base"] = Precision(options.base).value
    d["components"] = list(options.components)
    return d
