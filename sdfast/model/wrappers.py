"""Fixed positional I/O wrappers around the torch modules: what export traces and the eager
engine runs, so an exported graph and the eager engine compute the same function by
construction. One wrapper per component of each model family (``components.FAMILY_SPECS``).
"""

from __future__ import annotations

import torch

from .components import COMPONENT_MODULE  # noqa: F401  (re-exported: which torch module a component runs)


class TextEncoderWrapper(torch.nn.Module):
    """SD 1.x/2.x: the final layer's normalized hidden states."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # (B, S) -> (B, S, D); no attention mask, as SD pipelines call CLIP.
        return self.text_encoder(input_ids, return_dict=False)[0]


class PenultimateTextEncoderWrapper(torch.nn.Module):
    """SDXL's first text encoder: the penultimate layer's hidden states (diffusers' clip_skip=None)."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # (B, S) -> (B, S, D1)
        return self.text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]


class PooledTextEncoderWrapper(torch.nn.Module):
    """SDXL's second text encoder: penultimate hidden states and the pooled projection."""

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, S) -> (B, S, D2), (B, P)
        out = self.text_encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        # (B, C, h, w), (1,), (B, S, D)[, (B, E) for an LCM U-Net] -> (B, C, h, w)
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]


class SDXLUNetWrapper(torch.nn.Module):
    """SDXL's U-Net with its "text_time" conditioning as two more positional inputs."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        # (B, C, h, w), (1,), (B, S, D), (B, P), (B, 6)[, (B, E) for an LCM U-Net] -> (B, C, h, w)
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs=cond, return_dict=False)[0]


class VAEDecoderWrapper(torch.nn.Module):
    """Scaled latents in, image in [-1, 1] out. The 1/scaling_factor stays in the runtime."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        # (B, C, h, w) -> (B, 3, h·f, w·f)
        return self.vae.decode(latent, return_dict=False)[0]


class VAEEncoderWrapper(torch.nn.Module):
    """Image in [-1, 1] in, posterior moments (mean ‖ logvar) out; sampling stays in the runtime."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, 2C, H/f, W/f)
        h = self.vae.encoder(image)
        return self.vae.quant_conv(h) if self.vae.quant_conv is not None else h


#: family -> exported component -> its fixed-I/O wrapper class.
COMPONENT_WRAPPERS = {
    "sd": {"text_encoder": TextEncoderWrapper, "unet": UNetWrapper, "vae_decoder": VAEDecoderWrapper,
           "vae_encoder": VAEEncoderWrapper},
    "sdxl": {"text_encoder": PenultimateTextEncoderWrapper, "text_encoder_2": PooledTextEncoderWrapper,
             "unet": SDXLUNetWrapper, "vae_decoder": VAEDecoderWrapper, "vae_encoder": VAEEncoderWrapper},
}


def family_modules(family: str) -> tuple[str, ...]:
    """The torch modules (folders) a family loads, in order."""
    return tuple(dict.fromkeys(COMPONENT_MODULE[c] for c in COMPONENT_WRAPPERS[family]))


def component_modules(mods: dict[str, torch.nn.Module], family: str = "sd") -> dict[str, torch.nn.Module]:
    """The exportable components whose torch module is in ``mods``, keyed like the family's specs."""
    return {name: wrapper(mods[COMPONENT_MODULE[name]]) for name, wrapper in COMPONENT_WRAPPERS[family].items()
            if COMPONENT_MODULE[name] in mods}
