"""The classifier-free-guided denoising loop over four Engines.

No backend-specific branch lives here: the loop calls ``engine(**inputs)`` and gets tensors.
Latents and all scheduler math stay float32 whatever the engines' precision. The guided step
itself is ``loop.guided_step``; this module prepares its inputs (text, seeded noise), runs
the plain or the graphed loop, and decodes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import inpaint
from .engines import Engine, check_request, load_engines
from .errors import InvalidArgument
from .graphs import GraphRunner
from .hardware import resolve_device
from .inpaint import Start, is_inpaint_unet
from .loop import LoopState, StepCallback, denoise, guidance_embedding
from .lora import GROUPS, FusedLoras, Lora, as_loras
from .lora_refit import RefitLoras
from .lora_slots import SlotLoras
from .model.components import Precision
from .model.info import COMPONENT_MODULE, ModelInfo, load_tokenizer, resolve_model
from .output import GenerationOutput, PartialImage  # noqa: F401  (GenerationOutput: re-exported)
from .request import DEFAULTS, Request
from .safety import DecodeFallback, check_finite
from .schedulers import Scheduler, make_scheduler
from .stream import check_partial_images, partial_steps
from .text import TEXT, token_chunks

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

#: on_partial(PartialImage): a streamed partial image (sdfast/stream.py)
PartialCallback = Callable[[PartialImage], None]

__all__ = ["GenerationOutput", "PartialImage", "Pipeline", "StepCallback", "load", "resolve_device"]


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


#: what requests must share to run in one loop (one U-Net call per step over all their rows);
#: long_prompt too: the text batch is encoded under one policy, so a "truncate" request batched after a "chunk" one would get the other's encoding.
BATCH_KEYS = ("height", "width", "steps", "scheduler", "guided", "start_step", "long_prompt", "guidance_cut",
              "cache_interval", "cache_branch", "lora_key", "inpainting")


def check_batchable(requests: list[Request]) -> None:
    if not requests:
        raise InvalidArgument("requests: the list is empty; pass at least one Request")
    for r in requests:
        if not isinstance(r, Request):
            raise InvalidArgument(f"req: must be a Request but is {type(r).__name__}; build one with "
                                  "Request.build(pipe.info, prompt, ...) or call pipe.generate(prompt, ...)")
    first = requests[0]
    for r in requests[1:]:
        for key in BATCH_KEYS:
            if getattr(r, key) != getattr(first, key):
                raise InvalidArgument(
                    f"requests: a batch must share {', '.join(BATCH_KEYS)}, but {key} is {getattr(first, key)!r} "
                    f"and {getattr(r, key)!r}; run those requests in separate batches"
                )


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
        #: the export's manifest as ``load`` read it (None for eager engines)
        self.manifest = None
        self.engines_dir: Path | None = None  # its folder; DeepCache's two graphs load from it on first use
        self.cache_engines: dict[int, dict[str, Engine]] = {}  # branch -> unet_deep, unet_shallow (deepcache.py)
        text = TEXT[info.family]
        tokenizers = [tokenizer if tokenizer is not None and k == 0 else load_tokenizer(info, folder)
                      for k, folder in enumerate(text.tokenizer_folders)]
        self.tokenizer = tokenizers[0]
        self.text = text(info, tokenizers, device)  # prompts -> the U-Net's conditioning inputs
        # cuda_graphs: the static-buffer loop (captured on CUDA, plain calls on CPU); see graphs.py.
        self.graphs: GraphRunner | None = None
        if cuda_graphs:
            self.graphs = GraphRunner(self.engines["unet"], device, device.type == "cuda", info.scheduler_config)
            for name in [n for n, spec in info.specs.items() if spec.graphed]:
                self.engines[name] = self.graphs.wrap(self.engines[name])
        # The fp16 black-image guard: only a reduced-precision VAE decoder needs it.
        vae_precision = self.engines["vae_decoder"].precision
        self._decode_fallback = DecodeFallback(fp32_vae_decoder, enabled=vae_precision is not Precision.FP32)
        self._fused: FusedLoras | SlotLoras | None = None  # the LoRA set fused into the weights (set_loras)

    # -- LoRA --------------------------------------------------------------------------------
    @property
    def loras(self) -> tuple[Lora, ...]:
        """The LoRAs fused into the weights now, in the order given (empty: the base model)."""
        return () if self._fused is None else self._fused.active

    @property
    def lora_key(self) -> tuple[tuple[str, float], ...]:
        """The active set by (file sha256, scale), as ``Request.lora_key`` spells a request's."""
        return tuple((lo.file.sha256, lo.scale) for lo in self.loras)

    def set_loras(self, loras=None) -> None:
        """Fuse ``loras`` (paths, ``(path, scale)`` pairs or ``lora.Lora``; see sdfast/lora.py) into
        the weights in place of the set before; ``[]`` or None returns bit-exactly to the base
        weights. All files are read and checked against the model before any weight changes: a
        refused set leaves the pipeline as it was. Torch: the modules that run change in place;
        inductor: the packages' weights are replaced; ONNX Runtime / OpenVINO engines exported with
        ``--lora-rank`` take the set as slot inputs; TensorRT plans built with ``--refit`` refit."""
        items = as_loras(loras)
        if self._fused is None and not items:
            return
        self._lora_target().set(items)

    def check_loras(self, loras) -> None:
        """Refuse, as ``set_loras`` would, LoRAs that do not fit this model; changes nothing."""
        items = as_loras(loras)
        if items:
            self._lora_target().check(items)

    def _lora_target(self) -> FusedLoras | SlotLoras | RefitLoras:
        """The modules a LoRA changes (unet, text encoders): the eager engines' own, or for engines
        that can replace their weights (``load_weights``), a base copy whose changes they follow;
        for engines exported with LoRA slots, the slots' inputs (sdfast/lora_slots.py)."""
        if self._fused is not None:
            return self._fused
        engines = {COMPONENT_MODULE[n]: self._unwrapped(e) for n, e in self.engines.items()
                   if COMPONENT_MODULE[n] in GROUPS}
        if self.backend == "torch":
            mods = {}
            for group, engine in engines.items():
                (mods[group],) = engine.module.children()  # a fixed-I/O wrapper holds the one module it calls
            self._fused = FusedLoras(mods, self.info.family)
        elif all(getattr(e, "lora_slots", None) is not None for e in engines.values()):
            self._fused = SlotLoras(engines, self.info.family)
        elif self.backend == "tensorrt":  # plans built with --refit; others refuse (sdfast/lora_refit.py)
            self._fused = RefitLoras.of(engines, self.info.family)
        elif all(hasattr(e, "load_weights") for e in engines.values()):
            if self.graphs is not None and self.graphs.mode == "captured":
                raise InvalidArgument("loras: replacing a compiled package's weights under captured CUDA graphs is "
                                      "not verified; load with cuda_graphs=False (--no-cuda-graphs) to swap LoRAs")
            from .model.info import load_torch_modules

            base = load_torch_modules(self.info, parts=tuple(engines))  # fp32 on the CPU: the weights' base
            self._fused = FusedLoras(base, self.info.family, engines=engines)
        else:
            raise InvalidArgument(f"loras: this pipeline runs {self.backend} engines exported without LoRA slots, "
                                  "whose weights are compiled in: export with slots (sdfast export --lora-rank 64, "
                                  "onnx and openvino) to swap LoRAs on them, or with the set fused (sdfast export "
                                  "--lora FILE[:SCALE]) and load with the same set (load(model_info.with_loras(...))); "
                                  "the torch and inductor backends swap as they are")
        return self._fused

    @staticmethod
    def _unwrapped(engine):
        while hasattr(engine, "engine"):  # the CUDA-graph wrapper calls through to the engine it wraps
            engine = engine.engine
        return engine

    def _lora_modules(self) -> dict[str, torch.nn.Module]:
        """The torch modules a LoRA set is fused into (the tests read the weights there)."""
        return self._lora_target().modules

    # -- stages ------------------------------------------------------------------------------
    def token_chunks(self, texts: list[str], long_prompt: str = "truncate") -> torch.Tensor:
        """(N,) strings → (N, K, S) token ids of the first tokenizer (see ``text.token_chunks``)."""
        with self.text._lock:
            return token_chunks(self.tokenizer, texts, self.info.max_tokens, long_prompt).to(self.device)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(N,) strings → (N, S) token ids, truncated as diffusers does (see ``text.token_chunks``)."""
        return self.token_chunks(texts, "truncate")[:, 0]

    def chunks(self, req: Request) -> int:
        """Text-encoder chunks ``req``'s prompts take (1 unless long prompts are chunked);
        requests batched together must agree on it, as on ``BATCH_KEYS``."""
        return self.text.prepare([req], req.guided, req.long_prompt).chunks

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
        return self.encode_pixels(self.image_tensor(image, height, width), generator)

    def image_tensor(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """PIL image → (1, 3, H, W) in [-1, 1] on the device, resized with Lanczos (diffusers' preprocess)."""
        from PIL import Image

        if image.size != (width, height):
            image = image.resize((width, height), resample=Image.LANCZOS)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        return (2 * x - 1).to(self.device)

    def encode_pixels(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] → scaled latents, sampling the posterior with ``generator``."""
        moments = self.engines["vae_encoder"](image=x)["moments"]  # (1, 2C, h, w)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(self.device)
        return (mean + std * eps) * self.info.scaling_factor

    def warmup(self, height: int | None = None, width: int | None = None, batch: int = 1, steps: int = 2,
               guidance_scale: float = DEFAULTS["guidance_scale"], scheduler: str | None = DEFAULTS["scheduler"]
               ) -> float:
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
    def generate(self, prompt: str | list[str], *, callback: StepCallback | None = None, progress: bool = False,
                 profile: bool = False, partial_images: int = 0, on_partial: PartialCallback | None = None,
                 **options: Any) -> GenerationOutput:
        """Run the guided loop on ``prompt``. ``options`` are ``Request.build``'s keywords, with
        its defaults (``request.DEFAULTS``: negative_prompt, height, width, steps, guidance_scale,
        seed, scheduler, image, strength, num_images_per_prompt, long_prompt, and SDXL's prompt_2
        ... negative_target_size); an unknown one is refused naming it. ``profile`` synchronizes
        CUDA around each stage for exact timings. ``partial_images`` / ``on_partial``: streamed
        partial images (sdfast/stream.py)."""
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise InvalidArgument(f"{unknown[0]}: not an option of generate; the options are "
                                  f"{', '.join(DEFAULTS)}")
        req = Request.build(self.info, prompt=prompt, **options)
        return self.run(req, callback=callback, progress=progress, profile=profile, partial_images=partial_images,
                        on_partial=on_partial)

    def run(self, req: Request, callback: StepCallback | None = None, progress: bool = False,
            profile: bool = False, partial_images: int = 0, on_partial: PartialCallback | None = None
            ) -> GenerationOutput:
        """Run one checked request; ``on_partial(PartialImage)`` up to ``partial_images`` (0-3)
        times during the loop (sdfast/stream.py)."""
        return self.run_batch([req], callback=callback, progress=progress, profile=profile,
                              partial_images=partial_images, on_partial=on_partial)[0]

    @property
    def inpainting(self) -> str:
        """How this pipeline's model inpaints (sdfast/inpaint.py)."""
        return "9-channel U-Net" if is_inpaint_unet(self.info) else "latent blending"

    def _initial_latents(self, req: Request, sched: Scheduler, shape: tuple[int, ...], timer: StageTimer
                         ) -> tuple[torch.Tensor, torch.Tensor | None, Start | None]:
        """A request's starting latents (B, C, h, w), ancestral noise (N, B, C, h, w) or None and
        inpainting inputs or None, all drawn from its own seed's generator in diffusers' order:
        latents (img2img: the VAE posterior sample, then the noise; inpainting: see
        sdfast/inpaint.py), then one draw per remaining step."""
        generator = torch.Generator("cpu").manual_seed(req.seed)
        first = req.start_step
        start = None
        if req.inpainting:
            latents, start = inpaint.initial_latents(self, req, sched, shape, generator, timer)
        elif req.image is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
            latents = latents * sched.init_noise_sigma
        else:
            with timer("vae_encode"):
                init = self.encode_image(req.image, req.height, req.width, generator).expand(shape)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
            latents = sched.add_noise(init, noise, first)
        if not sched.needs_noise:
            return latents, None, start
        # Uploaded once, indexed by the absolute step: the loop never touches the host RNG.
        step_noise = torch.zeros((len(sched.timesteps), *shape), dtype=torch.float32)
        for i in range(first, len(sched.timesteps)):
            step_noise[i] = torch.randn(shape, generator=generator, dtype=torch.float32)
        return latents, step_noise.to(self.device), start

    def run_batch(self, requests: list[Request], callback: StepCallback | None = None, progress: bool = False,
                  profile: bool = False, partial_images: int = 0, on_partial: PartialCallback | None = None
                  ) -> list[GenerationOutput]:
        """Run several checked requests in one loop, one U-Net call per step over all their rows.

        They must share ``BATCH_KEYS``; each keeps its own prompts, seed (its latents and noise
        come from its own generator, exactly what it draws alone) and guidance scale (per-row
        guidance). Whether a row is bit-identical to its lone run then depends only on whether
        the engines compute a row independently of the batch size (see sdfast/serve). Partial
        images (``on_partial``) come once per request, each with that request's rows."""
        check_batchable(requests)
        partial_images = check_partial_images(partial_images)
        if partial_images and on_partial is None:
            raise InvalidArgument("on_partial: partial_images asks for partial images but no on_partial callback "
                                  "receives them; pass on_partial=fn (or use sdfast.stream.stream)")
        head = requests[0]
        unet = self.engines["unet"]
        if head.cache_interval is not None and head.cache_interval > 1:  # DeepCache: torch, onnx, openvino
            from .deepcache import for_pipeline

            unet = for_pipeline(self, head.cache_interval, head.cache_branch)  # a fresh cache for this run
        batch = sum(r.batch for r in requests)
        timer = StageTimer(self.device, sync=profile)
        t_start = time.perf_counter()
        if head.loras is not None and head.lora_key != self.lora_key:
            with timer("lora_swap"):  # the request's LoRA set in place of the pipeline's
                self.set_loras(list(head.loras))
        f = self.info.vae_scale_factor
        prepared = self.text.prepare(requests, head.guided, head.long_prompt)
        if len(requests) > 1 and prepared.chunks > 1:  # a row's result depends on its text's length
            k = sorted({self.chunks(r) for r in requests})
            if len(k) > 1:
                raise InvalidArgument(f"requests: a batch must share its prompts' chunk count, but they need {k} "
                                      "chunks (long prompts); run those requests in separate batches")
        check_request(self.engines, batch, head.height, head.width, head.guided, chunks=prepared.chunks)

        with timer("text_encoder"):
            cond = self.text.encode(self.engines, prepared)  # encoder_hidden_states (2B|B, K·S, D), ...
        guidance = [r.guidance_scale for r in requests for _ in range(r.batch)]
        if head.guidance_embedded:  # an LCM U-Net: each row's scale as its timestep_cond (B, E)
            cond["timestep_cond"] = guidance_embedding(torch.tensor(guidance), self.info.timestep_cond_dim
                                                       ).to(self.device)
        sched = make_scheduler(head.scheduler, self.info.scheduler_config)
        sched.set_timesteps(head.steps, self.device)
        parts = [self._initial_latents(r, sched, (r.batch, self.info.latent_channels, r.height // f, r.width // f),
                                       timer) for r in requests]
        latents = torch.cat([lat for lat, _, _ in parts])  # (B, C, h, w)
        noise = None if parts[0][1] is None else torch.cat([n for _, n, _ in parts], dim=1)  # (N, B, C, h, w)
        starts = [st for _, _, st in parts if st is not None]
        extra = inpaint.unet_extra(starts, head.guided) if starts and is_inpaint_unet(self.info) else None
        blending = inpaint.blend(starts) if starts and extra is None else None
        sched.begin(latents)
        state = LoopState.create(latents, cond, guidance, head.guided, noise, len(sched.timesteps),
                                 cut=head.guidance_cut, unet_extra=extra, blend=blending)

        first = head.start_step
        if partial_images:
            state.estimate = True
            callback = self._partials(requests, state, first, partial_images, on_partial, timer, callback)
        # DeepCache's call schedule is host state: it runs the plain loop; inpainting's extra
        # inputs and the partial images' estimate are not in the captured graphs' state (CUDA
        # graphs: not verified), so they do too
        plain = self.graphs is None or unet is not self.engines["unet"] or starts or partial_images
        run = denoise if plain else self.graphs.denoise
        latents = run(unet, sched, state, first, timer, callback, progress)
        check_finite(state.finite, first, sched.timesteps, self._numerics_hint(head))

        with timer("vae_decode"):
            images = self.to_pil(self.decode(latents))
        timer.totals["total"] = time.perf_counter() - t_start
        outs, row = [], 0
        for r in requests:
            if r.paste_unmasked:
                images[row : row + r.batch] = [inpaint.paste(im, r.image, r.mask) for im in images[row : row + r.batch]]
            outs.append(GenerationOutput(images=images[row : row + r.batch], latents=latents[row : row + r.batch],
                                         timings=dict(timer.totals), request=r, steps=r.steps - first,
                                         model=self.info.name, backend=self.backend, dtype=self.precision.value,
                                         approximations=self.approximations(r),
                                         loras=[lora.record() for lora in (*self.info.loras, *self.loras)],
                                         inpainting=self.inpainting if r.inpainting else ""))
            row += r.batch
        return outs

    def _partials(self, requests: list[Request], state: LoopState, first: int, k: int, on_partial: PartialCallback,
                  timer: StageTimer, callback: StepCallback | None) -> StepCallback:
        """The step callback that decodes the estimate into partial images at ``partial_steps``."""
        at = partial_steps(first, len(state.finite), k)

        def step_done(i: int, t: torch.Tensor, latents: torch.Tensor) -> None:
            if callback is not None:
                callback(i, t, latents)
            if i not in at:
                return
            with timer("partial_images"):
                images = self.to_pil(self.decode(state.x0))
            row = 0
            for r in requests:
                on_partial(PartialImage(index=at.index(i), step=i - first + 1, steps=r.steps - first,
                                        images=images[row : row + r.batch], request=r))
                row += r.batch

        return step_done

    def approximations(self, req: Request) -> list[str]:
        """Every approximation ``req`` runs with on this pipeline (see ``Request.approximations``)."""
        return req.approximations()

    def _numerics_hint(self, req: Request) -> str:
        """What could actually help when the latents blow up, given this pipeline's settings."""
        hints = []
        if self.precision is not Precision.FP32:
            hints.append(f"load the pipeline with dtype='fp32' (this run was {self.precision.value})")
        if req.guided and req.guidance_scale > 15:
            hints.append(f"lower guidance_scale ({req.guidance_scale:g}; 5-10 is the usual range)")
        if not hints:
            hints.append("the model's weights or the engines are likely broken: check them with `sdfast parity`")
        return "; or ".join(hints)


def load(model: str | Path | ModelInfo = "tiny", backend: str | None = "torch", device: str | torch.device = "cpu",
         dtype: str | Precision = "fp32", engines_dir: str | Path | None = None, attention: str = "sdpa",
         cuda_graphs: bool | None = None, modules: dict[str, torch.nn.Module] | None = None, *,
         engines: str | Path | None = None, loras=None) -> Pipeline:
    """Load a model for generation: the one way a Pipeline is assembled (the CLI, bench and the
    device check all come here, so they run with the safety setup users get). See
    docs/architecture.md's API contract.

    engines_dir: the folder of `sdfast export` (``engines=`` is the same argument under its older
    name); its manifest is read once here (the engines' loader then verifies it) and kept as
    ``pipe.manifest``. backend: None takes the
    backend that folder was exported for (torch without one).

    dtype: "fp32" (the parity reference, default), "fp16", "bf16", or "auto": fp16 on CUDA, bf16
    on CPUs with bf16 units, else fp32; with ``engines_dir``, the precision they were exported in.

    attention: "sdpa" | "xformers" | "math" for the torch backend (other backends ignore it).
    cuda_graphs: None = on for CUDA, off for CPU; True on CPU runs the static-buffer loop
    uncaptured (how the tests check the graphed step's logic).
    modules: torch backend only: already loaded torch modules to run (bench shares them with
    diffusers' pipeline) instead of loading the folder again.
    loras: LoRA files (or ``(file, scale)`` pairs) fused into the weights; see ``Pipeline.set_loras``.
    """
    from . import backends

    if engines is not None:
        if engines_dir is not None and str(engines_dir) != str(engines):
            raise InvalidArgument("engines_dir: given twice (engines_dir and its older name engines); pass one")
        engines_dir = engines
    info = model if isinstance(model, ModelInfo) else resolve_model(model)
    manifest = None
    if engines_dir is not None:
        from .artifacts import read_manifest

        manifest = read_manifest(engines_dir, info, "onnx" if backend is None else backends.get(backend).format)
    if backend is None:
        backend = "torch" if manifest is None else backends.for_format(manifest.format).name
    record = backends.get(backend)
    dev = resolve_device(device)
    if dtype == "auto" and manifest is not None:
        precision = manifest.precision("unet")  # exported graphs fix their precision: "auto" takes theirs
    else:
        precision = Precision.resolve(dtype, dev)
    engine_set = load_engines(info, backend, dev, precision, None if engines_dir is None else str(engines_dir),
                              options={"attention": attention, "modules": modules})
    if cuda_graphs is None:
        cuda_graphs = dev.type == "cuda"
    fallback = None
    if record.eager_vae_fallback:
        def fallback() -> Engine:  # the fp16-overflow fallback, built on first need
            from .engines.torch import load_component

            return load_component(info, "vae_decoder", dev, Precision.FP32)

    pipe = Pipeline(info, engine_set, dev, precision, backend, cuda_graphs=cuda_graphs, fp32_vae_decoder=fallback)
    pipe.manifest, pipe.engines_dir = manifest, None if engines_dir is None else Path(engines_dir)
    pipe.set_loras(loras)
    return pipe
