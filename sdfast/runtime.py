"""The classifier-free-guided denoising loop over four Engines.

No backend-specific branch lives here: the loop calls ``engine(**inputs)`` and gets tensors.
Latents and all scheduler math stay float32 whatever the engines' precision.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .components import Precision
from .engines import Engine, check_request, load_engines
from .errors import InvalidArgument
from .graphs import GraphRunner
from .models import ModelInfo, load_tokenizer, resolve_model
from .request import Request
from .safety import DecodeFallback, StepFlags
from .schedulers import Scheduler, make_scheduler

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

#: callback(step_index, timestep, latents) after every step; latents are (B, C, h, w) float32.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    latents: torch.Tensor  # (B, C, H/f, W/f) final latents, before VAE decode
    timings: dict[str, float]  # seconds per stage
    request: Request = field(repr=False)


class StageTimer:
    """Adds wall time per stage. On CUDA it synchronizes only when ``sync`` is set, so the
    default run has no host sync inside the loop (the totals are then enqueue times)."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.totals: dict[str, float] = {}

    def __call__(self, stage: str):
        return _Stage(self, stage)


class _Stage:
    def __init__(self, timer: StageTimer, stage: str):
        self.timer, self.stage = timer, stage

    def __enter__(self):
        if self.timer.sync:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.timer.sync:
            torch.cuda.synchronize()
        t = self.timer.totals
        t[self.stage] = t.get(self.stage, 0.0) + time.perf_counter() - self.t0


class Pipeline:
    """Text → image (and image → image) on a set of engines."""

    def __init__(self, info: ModelInfo, engines: dict[str, Engine], device: torch.device,
                 precision: Precision, backend: str, tokenizer=None, cuda_graphs: bool = False,
                 fp32_vae_decoder: Callable[[], Engine] | None = None):
        self.info = info
        self.engines = dict(engines)
        self.device = device
        self.precision = precision
        self.backend = backend
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(info)
        # HF tokenizers are not re-entrant ("Already borrowed"); tokenizing is microseconds.
        self._tokenizer_lock = threading.Lock()
        # cuda_graphs: the static-buffer loop (captured on CUDA, plain calls on CPU); see graphs.py.
        self.graphs: GraphRunner | None = None
        if cuda_graphs:
            self.graphs = GraphRunner(self.engines["unet"], device, device.type == "cuda",
                                      info.scheduler_config, self.denoise)
            for name in ("text_encoder", "vae_decoder"):
                self.engines[name] = self.graphs.wrap(self.engines[name])
        self._decode_fallback = DecodeFallback(fp32_vae_decoder if precision is not Precision.FP32 else None)

    # -- stages ------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B,) strings → (B, S) token ids, truncated with a warning that quotes the dropped text."""
        s = self.info.max_tokens
        with self._tokenizer_lock:
            ids = self.tokenizer(texts, padding="max_length", max_length=s, truncation=True,
                                 return_tensors="pt").input_ids  # (N, S)
            for text in texts:
                full = self.tokenizer(text, verbose=False).input_ids  # its own over-length warning is ours
                if len(full) > s:
                    # Kept: BOS + the first S-2 tokens + EOS. Quote what fell off, like diffusers.
                    dropped = self.tokenizer.decode(full[s - 1 : -1])
                    log.warning("prompt truncated to %d tokens, the text encoder's limit; dropped: %r",
                                s, dropped)
        return ids.to(self.device)

    def encode_text(self, prompts: list[str], negatives: list[str], guided: bool) -> torch.Tensor:
        """→ (2B, S, D) as [uncond..., cond...] under guidance, else (B, S, D)."""
        texts = negatives + prompts if guided else prompts
        ids = self.tokenize(texts)  # (2B|B, S)
        return self.engines["text_encoder"](input_ids=ids)["last_hidden_state"]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents → (B, 3, H, W) float image in [0, 1]."""
        z = latents / self.info.scaling_factor
        image = self._decode_fallback(self.engines["vae_decoder"](latent=z)["image"], z)
        return (image / 2 + 0.5).clamp(0, 1)

    def to_pil(self, image: torch.Tensor) -> list[Image.Image]:
        from PIL import Image

        arr = image.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, 3)
        return [Image.fromarray(a) for a in (arr * 255).round().astype(np.uint8)]

    def encode_image(self, image: Image.Image, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """PIL image → scaled latents (B=1), sampling the posterior with the seed's generator."""
        from PIL import Image

        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        x = (2 * x - 1).to(self.device)  # (1, 3, H, W) in [-1, 1]
        moments = self.engines["vae_encoder"](image=x)["moments"]  # (1, 2C, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(self.device)
        return (mean + std * eps) * self.info.scaling_factor

    def warmup(self, height: int | None = None, width: int | None = None, batch: int = 1, steps: int = 2,
               guidance_scale: float = 7.5, scheduler: str = "lms") -> float:
        """Pay one-time costs (allocation, lazy init, compile, CUDA-graph capture) for this shape
        now, with a short generation at exactly the shape later calls use (the U-Net sees 2·batch
        rows under guidance, batch rows without). Returns the seconds it took."""
        t0 = time.perf_counter()
        self.generate([""] * batch, height=height, width=width, steps=steps, guidance_scale=guidance_scale,
                      scheduler=scheduler)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # -- the loop ----------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, steps: int = 50,
                 guidance_scale: float = 7.5, seed: int = 0, scheduler: str = "lms",
                 image: Image.Image | str | Path | None = None, strength: float = 0.8,
                 callback: StepCallback | None = None, progress: bool = False,
                 profile: bool = False) -> GenerationOutput:
        """Run the guided loop. ``profile`` synchronizes CUDA around each stage for exact timings."""
        req = Request.build(self.info, prompt, negative_prompt, height, width, steps, guidance_scale,
                            seed, scheduler, image, strength)
        return self.run(req, callback=callback, progress=progress, profile=profile)

    def run(self, req: Request, callback: StepCallback | None = None, progress: bool = False,
            profile: bool = False) -> GenerationOutput:
        check_request(self.engines, req.batch, req.height, req.width, req.guided)
        timer = StageTimer(self.device, sync=profile)
        t_start = time.perf_counter()
        b, f = req.batch, self.info.vae_scale_factor
        shape = (b, self.info.latent_channels, req.height // f, req.width // f)  # (B, C, h, w)

        with timer("text_encoder"):
            text = self.encode_text(req.prompts, req.negative_prompts, req.guided)  # (2B|B, S, D)

        sched = make_scheduler(req.scheduler, self.info.scheduler_config)
        sched.set_timesteps(req.steps, self.device)
        generator = torch.Generator("cpu").manual_seed(req.seed)
        first = req.start_step
        if req.image is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
            latents = latents * sched.init_noise_sigma
        else:
            with timer("vae_encode"):
                init = self.encode_image(req.image, req.height, req.width, generator).expand(shape)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
            latents = sched.add_noise(init, noise, first)
        # Ancestral noise for every remaining step, drawn now from the same generator (in the
        # order diffusers draws it inside step), uploaded once: the loop never touches the host RNG.
        step_noise = None
        if sched.needs_noise:
            step_noise = torch.stack(
                [torch.randn(shape, generator=generator, dtype=torch.float32) for _ in range(first, req.steps)]
            ).to(self.device)
        sched.begin(latents)

        flags = StepFlags(len(sched.timesteps), self.device)
        denoise = self.denoise if self.graphs is None else self.graphs.denoise
        latents = denoise(sched, latents, text, req.guidance_scale, req.guided, first, step_noise,
                          timer, callback, progress, flags.flags)
        flags.check(first, sched.timesteps, "try dtype='fp32' or a lower guidance_scale")

        with timer("vae_decode"):
            image = self.decode(latents)
        images = self.to_pil(image)
        timer.totals["total"] = time.perf_counter() - t_start
        timer.totals["steps"] = float(req.steps - first)
        return GenerationOutput(images=images, latents=latents, timings=timer.totals, request=req)

    def denoise(self, sched: Scheduler, latents: torch.Tensor, text: torch.Tensor, guidance_scale: float,
                guided: bool, first: int, step_noise: torch.Tensor | None, timer: StageTimer,
                callback: StepCallback | None, progress: bool, finite: torch.Tensor | None = None) -> torch.Tensor:
        from tqdm.auto import tqdm

        unet = self.engines["unet"]
        for k, i in enumerate(tqdm(range(first, len(sched.timesteps)), disable=not progress, unit="step")):
            t = sched.timesteps[i : i + 1]  # (1,)
            with timer("scheduler"):
                x = torch.cat([latents, latents]) if guided else latents  # (2B|B, C, h, w)
                x = sched.scale_model_input(x, i)
            with timer("unet"):
                eps = unet(sample=x, timestep=t, encoder_hidden_states=text)["noise_pred"]
            with timer("scheduler"):
                if guided:
                    uncond, cond = eps.chunk(2)
                    eps = uncond + guidance_scale * (cond - uncond)  # u + g·(t − u)
                latents = sched.step(eps, i, latents, None if step_noise is None else step_noise[k])
                if finite is not None:
                    finite[i] = torch.isfinite(latents).all()  # device write; checked after the loop
            if callback is not None:
                callback(i, t, latents)
        return latents


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InvalidArgument(f"device: {device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device: 'cuda' was asked for but no CUDA device is available; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"device: {dev.type!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def load(model: str | Path | ModelInfo = "tiny", backend: str = "torch", device: str | torch.device = "cpu",
         dtype: str | Precision = "fp32", engines: str | Path | None = None, attention: str = "sdpa",
         cuda_graphs: bool | None = None) -> Pipeline:
    """Load a model for generation. See DESIGN.md's API contract.

    dtype: "fp32" (the parity reference, default), "fp16", "bf16", or "auto": fp16 on CUDA, bf16
    on CPUs with bf16 units, else fp32; with ``engines``, the precision they were exported in.

    attention: "sdpa" | "xformers" | "math" for the torch backend (other backends ignore it).
    cuda_graphs: None = on for CUDA, off for CPU; True on CPU runs the static-buffer loop
    uncaptured (how the tests check the graphed step's logic).
    """
    dev = resolve_device(device)
    info = model if isinstance(model, ModelInfo) else resolve_model(model)
    if dtype == "auto" and engines is not None:
        # Exported graphs fix their precision: "auto" takes the one they were built with.
        from .artifacts import read_manifest

        precision = read_manifest(engines, info).precision("unet")
    else:
        precision = Precision.resolve(dtype, dev)
    engine_set = load_engines(info, backend, dev, precision, None if engines is None else str(engines),
                              options={"attention": attention})
    if cuda_graphs is None:
        cuda_graphs = dev.type == "cuda"

    def fp32_vae_decoder() -> Engine:  # the fp16-overflow fallback, built on first need
        from .engines.torch import load_component

        return load_component(info, "vae_decoder", dev, Precision.FP32)

    return Pipeline(info, engine_set, dev, precision, backend, cuda_graphs=cuda_graphs,
                    fp32_vae_decoder=fp32_vae_decoder)
