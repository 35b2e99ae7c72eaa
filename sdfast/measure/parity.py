"""Parity of any backend against eager fp32: the promise sdfast sells, measured.

Tier 1 compares each component on the same inputs (real text embeddings, U-Net calls at several
timesteps, VAE decode and encode); tiers 2/3 run the whole guided loop with the same seed and
compare latents and images. Tolerances are docs/architecture.md's:

- fp32 components: text encoder ≤ 1e-3, U-Net ≤ 1e-4, VAE ≤ 3e-4 max abs difference;
- fp32 end to end: ≤ 2/255 max pixel difference;
- fp16 (tier 3): PSNR ≥ 35 dB end to end and no NaN or inf anywhere. fp16 components are
  reported but gated only on finiteness: DESIGN sets no per-component fp16 bound, and fp16
  error is only meaningful in what reaches the image.
- int8 (tier 3, an export whose manifest gives a component a ``quantization`` record,
  export/int8.py): PSNR ≥ 30 dB end to end and finite; the quantized components
  are gated on finiteness only, the others as their own precision.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..model.components import FAMILY_SPECS, Precision, ShapeProfile

#: tier-1 max-abs bounds for fp32 components (docs/architecture.md, "Parity"): each spec's atol.
FP32_COMPONENT_ATOL = {n: spec.atol for specs in FAMILY_SPECS.values() for n, spec in specs.items()}
FP32_MAX_PIXEL = 2  # of 255
FP16_MIN_PSNR = 35.0  # dB
INT8_MIN_PSNR = 30.0  # dB
#: PSNR of identical images is infinite; reports cap it so JSON stays standard.
PSNR_CAP = 100.0
UNET_TIMESTEP_FRACTIONS = (0.999, 0.5, 0.02)  # early, middle and late in the schedule
PARITY_PROMPTS = ("a red circle on a blue background", "a photo of an astronaut riding a horse")
DEFAULT_SCHEDULERS = ("lms", "euler_a")


@dataclass
class Row:
    tier: str  # "1" (component) or "e2e"
    name: str
    precision: str
    metrics: dict[str, float]
    limit: str
    passed: bool


@dataclass
class ParityReport:
    backend: str
    engines: str | None
    model: str
    device: str
    rows: list[Row] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_json(self) -> str:
        return json.dumps({"backend": self.backend, "engines": self.engines, "model": self.model,
                           "device": self.device, "passed": self.passed, "rows": [asdict(r) for r in self.rows]},
                          indent=2)

    def table(self) -> str:
        cols = ("tier", "check", "prec", "max abs", "mean abs", "cosine", "PSNR dB", "max px", "limit", "result")
        lines = []
        for r in self.rows:
            m = r.metrics
            lines.append((r.tier, r.name, r.precision, _fmt(m.get("max_abs")), _fmt(m.get("mean_abs")),
                          _fmt(m.get("cosine"), 6), _fmt(m.get("psnr_db"), 1), _fmt(m.get("max_pixel"), 0),
                          r.limit, "ok" if r.passed else "FAIL"))
        widths = [max(len(str(x)) for x in col) for col in zip(cols, *lines, strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*cols), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*row) for row in lines]
        out.append(f"parity {'PASSED' if self.passed else 'FAILED'}: {self.backend} vs eager fp32 "
                   f"({sum(r.passed for r in self.rows)}/{len(self.rows)} checks)")
        return "\n".join(out)


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if digits == 0:
        return str(int(v))
    return f"{v:.{digits}f}" if digits in (1, 6) else f"{v:.{digits}g}"


def tensor_metrics(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    ref, out = ref.detach().double().cpu().flatten(), out.detach().double().cpu().flatten()
    finite = bool(torch.isfinite(out).all())
    d = (out - ref).abs()
    cos = torch.nn.functional.cosine_similarity(ref, out, dim=0).item() if finite else float("nan")
    return {"max_abs": d.max().item() if finite else float("inf"), "mean_abs": d.mean().item() if finite else float("inf"),
            "cosine": cos, "finite": float(finite)}


def image_metrics(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    """uint8 (B, H, W, 3) images → PSNR (capped) and max pixel difference."""
    diff = ref.astype(np.int64) - out.astype(np.int64)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))
    return {"psnr_db": psnr, "max_pixel": float(np.abs(diff).max()), "mean_pixel": float(np.abs(diff).mean())}


def _component_row(name: str, label: str, precision: Precision, ref: torch.Tensor, out: torch.Tensor) -> Row:
    m = tensor_metrics(ref, out)
    if precision is Precision.FP32:
        atol = FP32_COMPONENT_ATOL[name]
        return Row("1", label, precision.value, m, f"max abs <= {atol:g}", bool(m["finite"]) and m["max_abs"] <= atol)
    return Row("1", label, precision.value, m, "finite", bool(m["finite"]))


@torch.inference_mode()
def component_parity(ref_pipe, pipe, profile: ShapeProfile, precisions: dict[str, Precision]) -> list[Row]:
    """Tier 1: each engine of ``pipe`` against the eager fp32 engine of ``ref_pipe`` on equal
    inputs: the text encoders on the guided call's tokens, the U-Net on the conditioning the
    model family builds from them (SDXL: pooled text and size ids too), the VAE both ways."""
    from ..request import Request

    info = ref_pipe.info
    b, h, w = profile.opt_batch, profile.opt_height, profile.opt_width
    f = info.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(0)
    rows = []

    def both(name: str, **inputs: torch.Tensor) -> None:
        ref = ref_pipe.engines[name](**inputs)
        out = pipe.engines[name](**{k: v.to(pipe.device) for k, v in inputs.items()})
        for key in ref_pipe.engines[name].spec.output_names:  # every output, e.g. SDXL's pooled text too
            label = name if len(ref) == 1 else f"{name}.{key}"
            rows.append(_component_row(name, label, precisions[name], ref[key].cpu(), out[key].cpu()))
        return ref

    prompts = [PARITY_PROMPTS[i % len(PARITY_PROMPTS)] for i in range(b)]
    req = Request.build(info, prompt=prompts, negative_prompt="", height=h, width=w, long_prompt="truncate")
    batch = ref_pipe.text.prepare([req], True, "truncate")  # the guided call's distinct texts
    encoders = [c for c, spec in info.specs.items() if spec.is_text]
    for name, ids in zip(encoders, batch.ids, strict=True):
        both(name, input_ids=ids.reshape(-1, ids.shape[-1]).cpu())  # (U, S)
    cond = {k: v.cpu() for k, v in ref_pipe.text.encode(ref_pipe.engines, batch).items()}  # the U-Net's inputs

    latents = torch.randn((2 * b, info.unet_in_channels, h // f, w // f), generator=g)  # (2B, Cu, h, w)
    n_train = int(info.scheduler_config.get("num_train_timesteps", 1000))
    for frac in UNET_TIMESTEP_FRACTIONS:
        t = torch.tensor([float(round(frac * (n_train - 1)))])
        n = len(rows)
        both("unet", sample=latents, timestep=t, **cond)
        rows[n].name = f"unet t={int(t.item())}"

    z = torch.randn((b, info.latent_channels, h // f, w // f), generator=g)  # (B, C, h, w), unscaled
    ref_img = both("vae_decoder", latent=z)["image"].cpu()
    image = ref_img[:1].clamp(-1, 1)  # (1, 3, H, W): a decoded image, as img2img feeds the encoder
    both("vae_encoder", image=image)
    return rows


def end_to_end_parity(ref_pipe, pipe, profile: ShapeProfile, precision: Precision,
                      schedulers: tuple[str, ...] = DEFAULT_SCHEDULERS, steps: int = 10, seed: int = 0) -> list[Row]:
    """Tiers 2/3: the guided loop, same seed and scheduler, on both pipelines."""
    rows = []
    b = profile.opt_batch
    prompts = [PARITY_PROMPTS[i % len(PARITY_PROMPTS)] for i in range(b)]
    kw = dict(height=profile.opt_height, width=profile.opt_width, steps=steps, seed=seed)
    for name in schedulers:
        ref = ref_pipe.generate(prompts, scheduler=name, **kw)
        out = pipe.generate(prompts, scheduler=name, **kw)
        m = tensor_metrics(ref.latents, out.latents)
        ref_px = np.stack([np.asarray(im) for im in ref.images])
        out_px = np.stack([np.asarray(im) for im in out.images])
        metrics = {"max_abs": m["max_abs"], "mean_abs": m["mean_abs"], "cosine": m["cosine"], "finite": m["finite"],
                   **image_metrics(ref_px, out_px)}
        if precision is Precision.FP32:
            limit = f"max px <= {FP32_MAX_PIXEL}"
            ok = bool(m["finite"]) and metrics["max_pixel"] <= FP32_MAX_PIXEL
        elif precision is Precision.INT8:
            limit = f"PSNR >= {INT8_MIN_PSNR:g}, finite"
            ok = bool(m["finite"]) and metrics["psnr_db"] >= INT8_MIN_PSNR
        else:
            limit = f"PSNR >= {FP16_MIN_PSNR:g}, finite"
            ok = bool(m["finite"]) and metrics["psnr_db"] >= FP16_MIN_PSNR
        rows.append(Row("e2e", f"pipeline {name} {steps} steps", precision.value, metrics, limit, ok))
    return rows


def run_parity(model: str, backend: str, engines: str | None = None, device: str = "cpu",
               dtype: str | None = None, steps: int = 10, schedulers: tuple[str, ...] = DEFAULT_SCHEDULERS,
               seed: int = 0) -> ParityReport:
    """Load eager fp32 and ``backend`` on the same model and measure every tier."""
    from .. import load
    from ..hardware import resolve_device

    candidate_dtype = dtype
    profile = None
    precisions: dict[str, Precision] | None = None
    if engines is not None:
        from ..artifacts import read_manifest

        manifest = read_manifest(engines)
        profile = manifest.profile
        # int8 components (a quantization record) are graded as int8; their I/O precision loads them
        precisions = {c: Precision.INT8 if rec.get("quantization") else manifest.precision(c)
                      for c, rec in manifest.components.items()}
        candidate_dtype = candidate_dtype or manifest.precision("unet").value
    candidate_dtype = candidate_dtype or "fp32"
    pipe = load(model, backend=backend, device=device, dtype=candidate_dtype, engines=engines)
    ref = load(pipe.info.path, backend="torch", device="cpu", dtype="fp32")
    if profile is None:
        n = pipe.info.native_size
        profile = ShapeProfile.static(1, n, n)
    if precisions is None:
        precisions = {c: Precision(candidate_dtype) for c in pipe.engines}
    report = ParityReport(backend=backend, engines=engines, model=str(model), device=str(resolve_device(device)))
    report.rows += component_parity(ref, pipe, profile, precisions)
    e2e = Precision.INT8 if Precision.INT8 in precisions.values() else Precision(candidate_dtype)
    report.rows += end_to_end_parity(ref, pipe, profile, e2e, schedulers, steps, seed)
    return report
