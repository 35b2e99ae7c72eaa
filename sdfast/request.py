"""A generation request, checked before any work is done.

``Request.build`` applies every rule of the API contract and raises ``InvalidArgument`` /
``MissingFile`` with a message naming the argument, the rule and the fix, so the CLI can refuse
bad input before it creates a single output file.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import rules
from .errors import InvalidArgument
from .images import load_init_image  # the one reader of init images (formats, bombs, arrays)
from .inpaint import check_masked_model, load_mask
from .lora import Lora, as_loras
from .rules import MAX_SIDE, MIN_SIDE  # noqa: F401  (re-exported: the sides every request may have)
from .schedulers import SCHEDULERS, scheduler_for_config

#: how prompts longer than the text encoder's window are encoded (see Pipeline.token_chunks).
LONG_PROMPT = ("chunk", "truncate")
#: samplers built for few-step consistency models: an approximation of the model's ODE, listed
#: in every output's approximations
FEW_STEP_SCHEDULERS = ("lcm", "tcd")

if TYPE_CHECKING:
    from PIL import Image

    from .model.info import ModelInfo


#: img2img's strength when none is given (with a mask: 1)
IMG2IMG_STRENGTH = 0.8


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's size conditioning, in diffusers' argument names: original (h, w), crop (top, left) and
    target (h, w) of the image and of the negative rows. None sizes default to the request's size."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None

    def time_ids(self, size: tuple[int, int], img2img: bool) -> tuple[list[float], list[float]]:
        """(negative, positive) time ids: original + crop + target. Text to image (diffusers'
        StableDiffusionXLPipeline): the negative equals the positive unless both negative sizes are
        given. With an init image (its img2img and inpaint pipelines): each negative size defaults to
        its positive one, and the negative takes the positive crop (diffusers does not read
        negative_crops_coords_top_left there)."""
        pos = [*(self.original_size or size), *self.crops_coords_top_left, *(self.target_size or size)]
        if img2img:
            neg = [*(self.negative_original_size or self.original_size or size), *self.crops_coords_top_left,
                   *(self.negative_target_size or self.target_size or size)]
        elif self.negative_original_size is None or self.negative_target_size is None:
            neg = pos
        else:
            neg = [*self.negative_original_size, *self.negative_crops_coords_top_left, *self.negative_target_size]
        return [float(v) for v in neg], [float(v) for v in pos]

    def metadata(self) -> dict[str, list[int]]:
        """The fields set away from their defaults, as PNG metadata records them."""
        return {f.name: list(v) for f in fields(self)
                if (v := getattr(self, f.name)) is not None and v != (0, 0)}


@dataclass(frozen=True)
class Request:
    prompts: list[str]
    negative_prompts: list[str]
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str
    image: Image.Image | None
    strength: float
    #: images per prompt; ``prompts`` holds each prompt this many times in a row (diffusers' order)
    num_images_per_prompt: int = 1
    #: prompts past the text encoder's length: "chunk" (encoded in chunks, A1111-style) or
    #: "truncate" (diffusers' behaviour, the parity reference)
    long_prompt: str = "chunk"
    # SDXL (diffusers' names): the second text encoder's prompts (default: the same prompts),
    # whether a negative prompt was given at all (none: zero embeddings), the size conditioning.
    prompts_2: list[str] = field(default_factory=list)
    negative_prompts_2: list[str] = field(default_factory=list)
    negative_given: bool = True
    size_cond: SizeConditioning = field(default_factory=SizeConditioning)
    #: approximations, all off by default (see ``approximations``): classifier-free guidance only
    #: for the first fraction of the steps that run, then conditional-only steps (None: every step)
    guidance_until: float | None = None
    #: DeepCache (sdfast.deepcache): the full U-Net every N calls, a shallow pass between (None: off)
    cache_interval: int | None = None
    #: DeepCache's skip branch: 0 the shallowest (fastest, DeepCache's default for SD), deeper
    #: branches rerun more of the U-Net on shallow steps
    cache_branch: int = 0
    #: the model's U-Net takes the guidance scale as an embedding (an LCM-distilled U-Net's
    #: ``timestep_cond``): one U-Net batch per step, no uncond rows
    guidance_embedded: bool = False
    #: the LoRA set to run with (lora.Lora, in order; () the base model); None: whatever set the
    #: pipeline has (Pipeline.set_loras). A pipeline switches its set to a request's before running.
    loras: tuple[Lora, ...] | None = None
    #: inpainting (sdfast/inpaint.py): the grey mask, white = repaint (None: not inpainting), and
    #: whether the kept pixels of the init image are copied over the decoded result
    mask: Image.Image | None = None
    paste_unmasked: bool = False

    @property
    def inpainting(self) -> bool:
        return self.mask is not None

    @property
    def lora_key(self) -> tuple[tuple[str, float], ...] | None:
        """The LoRA set by (file sha256, scale): requests batched together must share it."""
        return None if self.loras is None else tuple((lo.file.sha256, lo.scale) for lo in self.loras)

    @property
    def guidance_cut(self) -> int | None:
        """The step index from which the U-Net runs the conditional rows only (guidance_until),
        or None when every step that runs is guided as asked. Of the steps that run (img2img
        runs fewer), the first ceil(F × that many) are guided."""
        if not self.guided or self.guidance_until is None:
            return None
        k = self.steps - self.start_step
        cut = self.start_step + math.ceil(round(self.guidance_until * k, 9))
        return None if cut >= self.steps else cut

    def approximations(self) -> list[str]:
        """What this request runs that is not the exact computation it asks for (never silent:
        GenerationOutput and the PNG metadata list them)."""
        out = []
        if self.guidance_embedded:
            out.append("LCM-distilled U-Net: a few-step consistency model, guidance learned as an embedding of "
                       "the scale (no uncond pass)")
        if self.scheduler in FEW_STEP_SCHEDULERS:
            out.append(f"scheduler {self.scheduler}: few-step consistency sampling")
        if self.guidance_cut is not None:
            out.append(f"guidance_until {self.guidance_until:g}: classifier-free guidance for steps "
                       f"{self.start_step}..{self.guidance_cut - 1} only, conditional-only steps after")
        if self.cache_interval is not None and self.cache_interval > 1:
            out.append(f"cache_interval {self.cache_interval}: DeepCache, the full U-Net every "
                       f"{self.cache_interval} calls, a shallow pass reusing cached features between "
                       f"(branch {self.cache_branch})")
        return out

    def time_ids(self) -> tuple[list[float], list[float]]:
        """SDXL's (negative, positive) size conditioning (see ``SizeConditioning.time_ids``)."""
        return self.size_cond.time_ids((self.height, self.width), self.image is not None)

    @property
    def batch(self) -> int:
        """Images this request makes (prompts × num_images_per_prompt)."""
        return len(self.prompts)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance (an uncond batch) runs only when it changes the result
        (diffusers: g > 1), and never for a U-Net that takes the scale as an embedding."""
        return self.guidance_scale > 1.0 and not self.guidance_embedded

    @property
    def start_step(self) -> int:
        """First step that runs: 0 for txt2img, later for img2img (diffusers' get_timesteps)."""
        if self.image is None:
            return 0
        return self.steps - min(int(self.steps * self.strength), self.steps)

    @classmethod
    def build(cls, info: ModelInfo, *, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
              height: int | None = None, width: int | None = None, steps: int = 50,
              guidance_scale: float = 7.5, seed: int = 0, scheduler: str | None = None,
              image: Image.Image | str | Path | None = None, strength: float | None = None,
              num_images_per_prompt: int = 1, long_prompt: str = "chunk",
              prompt_2: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
              original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
              target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
              negative_crops_coords_top_left: tuple[int, int] = (0, 0),
              negative_target_size: tuple[int, int] | None = None, guidance_until: float | None = None,
              cache_interval: int | None = None, cache_branch: int = 0, loras: Any = None,
              mask: Any = None, paste_unmasked: bool = False) -> Request:
        """Check every rule of the API contract against ``info``'s model (keywords only).
        ``scheduler`` None: the one the model folder's scheduler_config.json names
        (``schedulers.scheduler_for_config``; lms where sdfast has no equal of its class).
        ``loras``: None (the pipeline's set), or LoRA files / (file, scale) pairs / lora.Lora to run
        with ([] : the base model); files are read and checked here (lora.as_loras), their fit to
        the model when the pipeline applies them. ``mask`` (with ``image``): inpaint, white
        repaints (sdfast/inpaint.py). ``strength`` None: 0.8 for img2img, 1 (all of the schedule,
        diffusers' inpainting default) with a mask."""
        sdxl = dict(prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, original_size=original_size,
                    crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                    negative_original_size=negative_original_size,
                    negative_crops_coords_top_left=negative_crops_coords_top_left,
                    negative_target_size=negative_target_size)
        if not info.family_record.size_conditioning:
            # an argument at its default asks for nothing SDXL-only, as a tuple or the list JSON gives
            given = [k for k, v in sdxl.items() if (tuple(v) if isinstance(v, list) else v) != _SDXL_DEFAULTS.get(k)]
            if given:
                raise InvalidArgument(f"{given[0]}: only SDXL models take it, and {info.name!r} is an SD 1.x/2.x "
                                      "model; drop it, or use an SDXL model folder")
        prompts = _prompts(prompt, "prompt")
        if not prompts:
            raise InvalidArgument("prompt: the list is empty; pass a string or a non-empty list of strings")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _prompts(negative_prompt, "negative_prompt")
            if isinstance(negative_prompt, str):
                negatives = negatives * len(prompts)
            elif len(negatives) != len(prompts):
                raise InvalidArgument(
                    f"negative_prompt: a list must have one entry per prompt, but has {len(negatives)} "
                    f"for {len(prompts)} prompts; pass {len(prompts)} negative prompts or one string"
                )
        prompts_2 = prompts if prompt_2 is None else _per_prompt(prompt_2, "prompt_2", len(prompts))
        negatives_2 = negatives if negative_prompt_2 is None else \
            _per_prompt(negative_prompt_2, "negative_prompt_2", len(prompts))
        for arg in ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                    "negative_crops_coords_top_left", "negative_target_size"):
            sdxl[arg] = _pair(arg, sdxl[arg])
        n = rules.check_int("num_images_per_prompt", num_images_per_prompt, 1, rules.MAX_IMAGES,
                            "ask for fewer images per call (each one is a row of every U-Net call)")
        prompts_2 = [p for p in prompts_2 for _ in range(n)]
        negatives_2 = [p for p in negatives_2 for _ in range(n)]
        # diffusers' num_images_per_prompt order: each prompt's images next to each other, and
        # one latent draw for the whole (prompts × n) batch, so the same seed gives its latents.
        prompts = [p for p in prompts for _ in range(n)]
        negatives = [p for p in negatives for _ in range(n)]
        steps = rules.check_steps(steps, int(info.scheduler_config.get("num_train_timesteps", 1000)))
        guidance_scale = rules.check_guidance(guidance_scale)
        seed = rules.check_int("seed", seed, 0, rules.MAX_SEED, hi_text="2**64-1")
        if scheduler is None:
            scheduler = scheduler_for_config(info.scheduler_config)
        rules.check_choice("scheduler", scheduler, SCHEDULERS)
        rules.check_choice("long_prompt", long_prompt, LONG_PROMPT)
        embedded = info.timestep_cond_dim is not None
        if embedded and negative_prompt is not None and any(_prompts(negative_prompt, "negative_prompt")):
            raise InvalidArgument("negative_prompt: this model's U-Net is LCM-distilled: it takes the guidance scale "
                                  "as an embedding and runs no uncond pass, so there is nothing to steer away "
                                  "from (diffusers' LatentConsistencyModelPipeline takes none either); drop it")
        if embedded and guidance_until is not None:
            raise InvalidArgument("guidance_until: this model's U-Net is LCM-distilled and runs no uncond pass to "
                                  "cut; drop it")
        if guidance_until is not None:
            if not rules.is_number(guidance_until) or not math.isfinite(guidance_until) or not 0 <= guidance_until <= 1:
                raise InvalidArgument(f"guidance_until: must be a fraction of the steps in [0, 1] but is "
                                      f"{guidance_until!r}; 1 guides every step (the exact run), 0 none")
            guidance_until = float(guidance_until)
        if cache_interval is not None:
            cache_interval = rules.check_int("cache_interval", cache_interval, 1, None,
                                             "1 runs the full U-Net every step (no caching), 2-5 are usual")
        cache_branch = rules.check_int("cache_branch", cache_branch, 0, None,
                                       "0 is the shallowest and fastest branch (DeepCache's default)")
        if cache_branch != 0 and (cache_interval is None or cache_interval < 2):
            raise InvalidArgument(f"cache_branch: {cache_branch} has no effect without DeepCache; set "
                                  "cache_interval to 2 or more (--cache-interval), or drop cache_branch")

        if strength is None:
            strength = 1.0 if mask is not None else IMG2IMG_STRENGTH
        strength = rules.check_strength(strength)  # also without an init image: a wrong value is wrong anyway
        check_masked_model(info, image is not None, mask is not None)
        if not isinstance(paste_unmasked, bool):
            raise InvalidArgument(f"paste_unmasked: must be True or False, not {paste_unmasked!r}")
        if paste_unmasked and mask is None:
            raise InvalidArgument("paste_unmasked: copies the init image's kept pixels, and there is no mask; pass "
                                  "mask= too, or drop paste_unmasked")
        mask_image = load_mask(mask) if mask is not None else None
        init = None
        if image is not None:
            if int(steps * strength) < 1:
                raise InvalidArgument(
                    f"strength: steps × strength must be at least 1 step but is {steps} × {strength}; "
                    "raise --steps or --strength"
                )
            if tuple(sdxl["negative_crops_coords_top_left"]) != (0, 0):
                raise InvalidArgument("negative_crops_coords_top_left: has no effect with an init image (SDXL's "
                                      "img2img and inpainting condition the negative on the positive crop, as "
                                      "diffusers does); drop it, or set crops_coords_top_left")
            init = load_init_image(image)
            f = info.vae_scale_factor
            # Like diffusers: the init image's own size, rounded down to the VAE factor, unless asked.
            height = height if height is not None else init.height - init.height % f
            width = width if width is not None else init.width - init.width % f
        height = info.native_size if height is None else height
        width = info.native_size if width is None else width
        for arg, v in (("height", height), ("width", width)):
            rules.check_side(arg, v, info.vae_scale_factor, "the VAE scale factor")
        return cls(prompts, negatives, height, width, steps, guidance_scale, seed, scheduler, init, float(strength),
                   n, long_prompt, prompts_2, negatives_2, negative_prompt is not None,
                   SizeConditioning(**{f.name: sdxl[f.name] for f in fields(SizeConditioning)}),
                   guidance_until=guidance_until, cache_interval=cache_interval,
                   cache_branch=cache_branch,
                   guidance_embedded=embedded, loras=None if loras is None else tuple(as_loras(loras)),
                   mask=mask_image, paste_unmasked=paste_unmasked)


def _per_prompt(value: str | list[str], arg: str, n: int) -> list[str]:
    """One string for every prompt, or a list with one entry per prompt."""
    texts = _prompts(value, arg)
    if isinstance(value, str):
        return texts * n
    if len(texts) != n:
        raise InvalidArgument(f"{arg}: a list must have one entry per prompt, but has {len(texts)} for {n} prompts; "
                              f"pass {n} strings or one string")
    return texts


#: Request.build's SDXL-only arguments whose default is not None (SD 1.x's behaviour too).
_SDXL_DEFAULTS = {"crops_coords_top_left": (0, 0), "negative_crops_coords_top_left": (0, 0)}


def _pair(arg: str, value) -> tuple[int, int] | None:
    """An SDXL size / crop as (height, width) or (top, left): two integers >= 0."""
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(rules.is_int(v) and v >= 0 for v in value):
        raise InvalidArgument(f"{arg}: must be two integers >= 0, (height, width) or (top, left), but is {value!r}")
    return (int(value[0]), int(value[1]))


def _prompts(value: str | list[str], arg: str) -> list[str]:
    if isinstance(value, str):
        _check_text(arg, value)
        return [value]
    if isinstance(value, list | tuple) and all(isinstance(p, str) for p in value):
        for k, text in enumerate(value):
            _check_text(f"{arg}[{k}]", text)
        return list(value)
    raise InvalidArgument(f"{arg}: must be a string or a list of strings, not {type(value).__name__}")


def _check_text(arg: str, text: str) -> None:
    """A prompt the tokenizer can read: valid Unicode. A lone surrogate (U+D800..U+DFFF, what a
    broken UTF-16 decode or ``surrogateescape`` leaves in a str) has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(f"{arg}: holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}, "
                              "which is not valid Unicode; decode the text correctly or drop that character") from None


def request_defaults() -> dict[str, Any]:
    """Every option of ``Request.build`` with its default, read from its signature: the one place
    the request surface and its defaults are written. The CLI, serve and ``Pipeline.generate`` read
    them from here (``DEFAULTS``) instead of restating them."""
    params = inspect.signature(Request.build).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


#: option -> default of every generation option (``Request.build``'s keywords).
DEFAULTS: dict[str, Any] = request_defaults()
