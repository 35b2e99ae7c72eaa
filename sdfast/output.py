"""What one generation returns: its images, latents, timings and the record its PNGs carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

    from .request import Request


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    latents: torch.Tensor  # (B, C, H/f, W/f) final latents, before VAE decode
    timings: dict[str, float]  # seconds per stage (of the whole batch the request ran in)
    request: Request = field(repr=False)
    steps: int = 0  # denoising steps that ran (img2img runs fewer than request.steps)
    model: str = ""
    backend: str = ""
    dtype: str = ""
    #: every approximation this image was made with (few-step model or scheduler, guidance_until,
    #: DeepCache, ...), one line each; empty for the exact computation
    approximations: list[str] = field(default_factory=list)
    #: the LoRAs fused into the weights it ran on: name, sha256 of the file, scale, format (lora.Lora.record)
    loras: list[dict[str, Any]] = field(default_factory=list)
    #: how the masked request was inpainted ("9-channel U-Net" | "latent blending"); "" otherwise
    inpainting: str = ""

    def metadata(self, k: int = 0) -> dict[str, Any]:
        """What the PNG of image ``k`` records (A1111-style generation parameters)."""
        from . import __version__

        r = self.request
        meta: dict[str, Any] = {
            "prompt": r.prompts[k], "negative_prompt": r.negative_prompts[k], "seed": r.seed, "steps": r.steps,
            "guidance_scale": r.guidance_scale, "scheduler": r.scheduler, "height": r.height, "width": r.width,
            "model": self.model, "backend": self.backend, "dtype": self.dtype, "sdfast_version": __version__,
        }
        if r.prompts_2 != r.prompts or r.negative_prompts_2 != r.negative_prompts:  # SDXL's second encoder
            meta.update(prompt_2=r.prompts_2[k], negative_prompt_2=r.negative_prompts_2[k])
        meta.update(r.size_cond.metadata())
        if r.batch > 1:
            meta["batch_index"] = k
        if r.image is not None:
            meta["strength"] = r.strength
        if r.inpainting:
            meta["inpainting"] = self.inpainting
            if r.paste_unmasked:
                meta["paste_unmasked"] = True
        for key in ("guidance_until", "cache_interval"):
            if getattr(r, key) is not None:
                meta[key] = getattr(r, key)
        if r.cache_interval is not None:
            meta["cache_branch"] = r.cache_branch
        if self.approximations:
            meta["approximations"] = list(self.approximations)
        if self.loras:
            meta["loras"] = [dict(lora) for lora in self.loras]
        return meta

    def save(self, path: str | Path) -> list[Path]:
        """Write the images as PNGs with their generation metadata: ``path`` for one image,
        ``stem-0.png``, ``stem-1.png``, ... for several. Returns the paths written."""
        from .media import save_png

        path = Path(path)
        paths = [path] if len(self.images) == 1 else \
            [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(len(self.images))]
        for k, (image, p) in enumerate(zip(self.images, paths, strict=True)):
            save_png(image, p, self.metadata(k))
        return paths


@dataclass
class PartialImage:
    """A streamed partial image of one request (``Pipeline.run(..., partial_images=K)``): the
    loop's current clean-sample estimate, decoded by the VAE, after ``step`` of its ``steps``."""

    index: int  # 0-based partial_image_index (the OpenAI Images API's name)
    step: int  # denoising steps done when it was made (1 .. steps - 1)
    steps: int  # steps the request runs (img2img and inpainting run fewer than it asks)
    images: list[Image.Image]  # one per image of the request
    request: Request = field(repr=False)
