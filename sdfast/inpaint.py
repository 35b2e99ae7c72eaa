"""Inpainting: repaint the masked part of an init image, through the same guided step.

Two kinds of model, run as diffusers' ``StableDiffusionInpaintPipeline`` runs them (and held to
it at tier 2):

- **9-channel inpaint U-Nets** (``unet.config.in_channels`` = 2 × latent channels + 1, e.g.
  stable-diffusion-inpainting): every U-Net call takes the scaled latents, the mask at latent
  size and the latents of the masked image, concatenated on channels (``LoopState.unet_extra``).
- **Ordinary U-Nets** (4 channels): latent blending. After every step the latents outside the
  mask are put back to the init image's latents, noised to the next step's level with the
  request's own initial noise (the last step puts back the clean latents), so only the masked
  part is denoised toward the prompt (``Blend``).

The mask: white repaints, black keeps. It is read like an init image (sdfast/images.py: any mode
or size), made grey, resized to the image size with Lanczos and binarized at 0.5, as diffusers'
mask processor does; a mask with transparent pixels is read by its alpha alone, as the OpenAI
Images API reads its masks: fully transparent repaints, every other pixel is kept whatever its
colour (``load_mask``). The masked image is the init image with the repainted pixels set to 0
(grey, in [-1, 1]). At latent size the mask is the nearest downsample. Random draws follow diffusers' order from the request's seed: the init image's
posterior sample (skipped by a 9-channel U-Net at strength 1, as diffusers skips it), the
initial noise, the masked image's posterior sample (drawn even by blending models, which do not
use it, so the stream stays diffusers'), then one draw per step for ancestral samplers.

VAE decoding does not give back the init image exactly, so the kept region of the result differs
from the input by the VAE's reconstruction error; ``paste_unmasked`` (off by default, like
diffusers) copies the kept pixels of the init image over the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import InvalidArgument
from .schedulers.base import Scheduler

if TYPE_CHECKING:
    from PIL import Image

#: mask values at or above this (after grey conversion and resize, in [0, 1]) are repainted
THRESHOLD = 0.5


def load_mask(mask: Any, arg: str = "mask") -> Image.Image:
    """``mask`` (whatever an init image may be: sdfast/images.py) as an 8-bit grey PIL image,
    white repaints. A mask with transparent pixels is read by its alpha alone, as the OpenAI
    Images API reads it: fully transparent (alpha 0) repaints, any other pixel is kept whatever its
    colour (an OpenAI mask is often the image itself with a hole cut out). A mask without
    transparency (no alpha channel, or alpha 255 everywhere) is read by its grey values, as
    diffusers' mask processor reads it."""
    from PIL import Image

    from .images import load_init_image

    grey = load_init_image(mask, arg).convert("L")  # checks it (and refuses it in one line) first
    alpha = _alpha(mask, arg)
    if alpha is None or alpha.min() == 255:
        return grey
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")


def _alpha(mask: Any, arg: str) -> np.ndarray | None:
    """The (H, W) uint8 alpha channel of a mask ``load_init_image`` has read, upright as it, or
    None when it has none."""
    from PIL import Image, ImageOps

    from .images import load_init_image

    if type(mask).__module__ == "numpy":  # (H, W, 4): its alpha scaled as the colour channels are
        return np.asarray(load_init_image(mask[..., 3], arg))[..., 0] if mask.ndim == 3 and mask.shape[-1] == 4 else None
    if isinstance(mask, Image.Image):
        return _alpha_of(ImageOps.exif_transpose(mask))
    import io

    src = io.BytesIO(bytes(mask)) if isinstance(mask, bytes | bytearray | memoryview) else mask
    with Image.open(src) as im:  # already decoded once by load_init_image: a good image of a safe size
        return _alpha_of(ImageOps.exif_transpose(im))


def _alpha_of(im: Image.Image) -> np.ndarray | None:
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return np.asarray(im.convert("RGBA").getchannel("A"))
    return None


def mask_tensor(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) float32 of 0 (keep) and 1 (repaint): resized with Lanczos, binarized."""
    from PIL import Image

    if mask.size != (width, height):
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return (m >= THRESHOLD).to(torch.float32)


def latent_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The (1, 1, H, W) mask at latent size (nearest, as diffusers' ``interpolate`` default)."""
    return torch.nn.functional.interpolate(mask, size=(h, w))


def check_masked_model(info, has_image: bool, has_mask: bool) -> None:
    """A 9-channel inpaint U-Net runs only with an image and a mask (it has no text-to-image mode)."""
    if is_inpaint_unet(info) and not (has_image and has_mask):
        raise InvalidArgument(f"mask: {info.name!r} has an inpainting U-Net ({info.unet_in_channels} input channels: "
                              "latents, mask and masked image), which only repaints a masked image; pass image= "
                              "and mask= (--init-image and --mask), or use an ordinary model for text to image")
    if has_mask and not has_image:
        raise InvalidArgument("mask: a mask marks what to repaint in an init image, and no image was given; pass "
                              "image= (--init-image) too, or drop the mask")


def is_inpaint_unet(info) -> bool:
    return info.unet_in_channels == 2 * info.latent_channels + 1


@dataclass
class Blend:
    """Latent blending of an ordinary U-Net (see the module doc); rows as the latents'."""

    mask: torch.Tensor  # (B, 1, h, w): 1 repaint, 0 keep
    image_latents: torch.Tensor  # (B, C, h, w): the init image's scaled latents
    noise: torch.Tensor  # (B, C, h, w): the request's initial noise

    def apply(self, latents: torch.Tensor, sched: Scheduler, i: int) -> torch.Tensor:
        """The latents after step ``i`` with the kept region at step ``i + 1``'s noise level
        (inpainting runs the plain loop, so ``i`` is a Python int)."""
        n = len(sched.timesteps)
        if i + 1 < n:
            proper = sched.add_noise(self.image_latents, self.noise, i + 1)
        else:
            proper = self.image_latents
        return (1 - self.mask) * proper + self.mask * latents


@dataclass
class Start:
    """One request's inpainting inputs at latent size, rows as its latents (B = its images)."""

    mask: torch.Tensor  # (B, 1, h, w)
    masked_latents: torch.Tensor  # (B, C, h, w)
    image_latents: torch.Tensor | None  # (B, C, h, w), blending only
    noise: torch.Tensor  # (B, C, h, w)


def unet_extra(starts: list[Start], guided: bool) -> torch.Tensor:
    """The 9-channel U-Net's extra input: (2B|B, 1 + C, h, w), rows [uncond..., cond...] when guided."""
    x = torch.cat([torch.cat([s.mask, s.masked_latents], dim=1) for s in starts])
    return torch.cat([x, x]) if guided else x


def blend(starts: list[Start]) -> Blend:
    return Blend(torch.cat([s.mask for s in starts]), torch.cat([s.image_latents for s in starts]),
                 torch.cat([s.noise for s in starts]))


def paste(result: Image.Image, init: Image.Image, mask: Image.Image) -> Image.Image:
    """``result`` with the kept pixels (mask below the threshold at image size) of ``init``."""
    from PIL import Image

    size = result.size
    init = init if init.size == size else init.resize(size, resample=Image.LANCZOS)
    keep = mask_tensor(mask, size[1], size[0])[0, 0].numpy() < 0.5  # (H, W)
    out = np.asarray(result).copy()
    out[keep] = np.asarray(init.convert("RGB"))[keep]
    return Image.fromarray(out)


def initial_latents(pipe, req, sched: Scheduler, shape: tuple[int, ...], generator: torch.Generator,
                    timer) -> tuple[torch.Tensor, Start]:
    """A request's starting latents and inpainting inputs on ``pipe`` (a runtime.Pipeline), drawn as
    diffusers' inpaint pipeline draws them (see the module doc)."""
    nine = is_inpaint_unet(pipe.info)
    full = req.strength == 1.0  # diffusers' is_strength_max: pure noise, the init image unused for it
    pixels = pipe.image_tensor(req.image, req.height, req.width)  # (1, 3, H, W)
    mask = mask_tensor(req.mask, req.height, req.width).to(pipe.device)  # (1, 1, H, W)
    image_latents = None
    with timer("vae_encode"):
        if not (nine and full):
            image_latents = pipe.encode_pixels(pixels, generator).expand(shape)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(pipe.device)
        masked = pixels * (mask < THRESHOLD)  # the repainted pixels at 0
        if nine:
            masked_latents = pipe.encode_pixels(masked, generator).expand(shape)
        else:  # not used, but drawn: the generator's stream stays diffusers'
            torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)
            masked_latents = torch.zeros(shape, device=pipe.device)
    latents = noise * sched.init_noise_sigma if full else sched.add_noise(image_latents, noise, req.start_step)
    small = latent_mask(mask, shape[2], shape[3]).expand(shape[0], 1, *shape[2:])
    return latents, Start(small, masked_latents, image_latents, noise)

