"""sdfast's own torch modules for small SD 1.x models: the quick start without diffusers or transformers.

Importing diffusers and transformers costs ~4 s of CPU (they pull in peft, scipy, sympy,
torch._dynamo and torch.distributed), eight times what the built-in ``tiny`` model's 20 steps
take. For a text-to-image run on the torch backend, ``models.load_lite_modules`` builds these
modules instead: the same layers under the same parameter names (the folder's safetensors load
as they are), whose forward passes repeat diffusers' and transformers' operations in the same
order on the same memory layouts, so the image is bit-identical (tests/test_quickstart_lite.py
compares every module and the whole image with the libraries'). They cover one configuration,
the one ``unsupported`` accepts (CLIP text encoder, a U-Net of cross-attention blocks, an
AutoencoderKL decoder, SDPA attention); anything else (other blocks, LoRA, DeepCache, img2img,
other attention, export) loads the libraries' modules as before.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .lite_text import LiteCLIPTextModel, _Lite

#: UNet2DConditionModel config values the lite U-Net reproduces (any other value: the library's model).
UNET_FIXED = {
    "act_fn": "silu", "addition_embed_type": None, "attention_type": "default", "center_input_sample": False,
    "class_embed_type": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None,
    "dropout": 0.0, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_only_cross_attention": None, "num_class_embeds": None,
    "only_cross_attention": False, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": 1,
    "upcast_attention": False, "use_linear_projection": False, "num_attention_heads": None,
    "reverse_transformer_layers_per_block": None, "mid_block_scale_factor": 1, "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None, "class_embeddings_concat": False,
}
VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None, "layers_per_block": 1,
             "mid_block_add_attention": True, "shift_factor": None, "use_post_quant_conv": True,
             "use_quant_conv": True, "in_channels": 3, "out_channels": 3}
CLIP_FIXED = {"hidden_act": "quick_gelu", "attention_dropout": 0.0}


def unsupported(info) -> str | None:
    """Why the lite modules cannot stand in for ``info``'s (None: they can)."""
    fam = info.family_record  # one CLIP, no size conditioning: what the lite modules reproduce
    if len(fam.text_encoders) != 1 or fam.size_conditioning or info.random_weights:
        return "not an SD 1.x/2.x folder with weights"
    u, v, t = info.unet_config, info.vae_config, info.text_encoder_config
    for name, cfg, fixed in (("unet", u, UNET_FIXED), ("vae", v, VAE_FIXED), ("text_encoder", t, CLIP_FIXED)):
        for key, want in fixed.items():
            if cfg.get(key, want) != want:
                return f"{name} {key}={cfg.get(key)!r}"
    if u.get("_class_name") != "UNet2DConditionModel" or v.get("_class_name") != "AutoencoderKL":
        return "other model classes"
    n = len(u["block_out_channels"])
    if (list(u["down_block_types"]) != ["CrossAttnDownBlock2D"] * n
            or list(u["up_block_types"]) != ["CrossAttnUpBlock2D"] * n):
        return "blocks other than cross-attention ones"
    if not isinstance(u["attention_head_dim"], int) or not isinstance(u["layers_per_block"], int):
        return "per-block head or layer counts"
    if not isinstance(u["cross_attention_dim"], int):
        return "per-block cross-attention widths"
    m = len(v["block_out_channels"])
    if (list(v["down_block_types"]) != ["DownEncoderBlock2D"] * m
            or list(v["up_block_types"]) != ["UpDecoderBlock2D"] * m):
        return "VAE blocks other than the usual ones"
    if t.get("model_type", "clip_text_model") != "clip_text_model":
        return "not a CLIP text model"
    return None


# -- diffusers building blocks ------------------------------------------------------------

class _Resnet(nn.Module):
    """ResnetBlock2D (time_embedding_norm "default", output_scale_factor 1)."""

    def __init__(self, cin: int, cout: int, temb: int | None, groups: int, eps: float, groups_out: int | None = None):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout) if temb is not None else None
        self.norm2 = nn.GroupNorm(groups_out or groups, cout, eps=eps, affine=True)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, stride=1, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=1, padding=0) if cin != cout else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / 1.0


class _Attention(nn.Module):
    """diffusers' Attention run by AttnProcessor2_0 (no masks: SD pipelines pass none)."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross: int | None = None, bias: bool = False,
                 groups: int | None = None, eps: float = 1e-5, residual: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.group_norm = nn.GroupNorm(groups, dim, eps=eps, affine=True) if groups else None
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(cross or dim, inner, bias=bias)
        self.to_v = nn.Linear(cross or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True), nn.Dropout(0.0)])
        self.residual_connection = residual

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[0]
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = self.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key = self.to_k(encoder_hidden_states)
        value = self.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // self.heads
        query = query.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, self.heads, head_dim).transpose(1, 2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                                       is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, self.heads * head_dim)
        hidden_states = self.to_out[0](hidden_states.to(query.dtype))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if self.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / 1.0


class _GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(h).chunk(2, dim=-1)
        return h * F.gelu(gate)


class _FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([_GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim)])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            h = module(h)
        return h


class _TransformerBlock(nn.Module):
    """BasicTransformerBlock: layer norms, self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-5)
        self.attn1 = _Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim, 1e-5, True)
        self.attn2 = _Attention(dim, heads, dim_head, cross=cross)
        self.norm3 = nn.LayerNorm(dim, 1e-5, True)
        self.ff = _FeedForward(dim)

    def forward(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.attn1(self.norm1(h)) + h
        h = self.attn2(self.norm2(h), context) + h
        return self.ff(self.norm3(h)) + h


class _Transformer2D(nn.Module):
    """Transformer2DModel on continuous input with 1x1 conv projections."""

    def __init__(self, heads: int, dim_head: int, channels: int, cross: int, groups: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(channels, inner, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([_TransformerBlock(inner, heads, dim_head, cross)])
        self.proj_out = nn.Conv2d(inner, channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        inner = h.shape[1]
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.reshape(batch, height, width, inner).permute(0, 3, 1, 2).contiguous()
        return self.proj_out(h) + x


class _Down(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=padding)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            h = F.pad(h, (0, 1, 0, 1), mode="constant", value=0)
        return self.conv(h)


class _Up(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, h: torch.Tensor, size=None) -> torch.Tensor:
        h = F.interpolate(h, scale_factor=2.0, mode="nearest") if size is None else F.interpolate(h, size=size, mode="nearest")
        return self.conv(h)


class _CrossAttnDown(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, layers: int, heads: int, cross: int, groups: int, eps: float,
                 downsample: bool, padding: int):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(cin if i == 0 else cout, cout, temb, groups, eps) for i in range(layers)])
        self.attentions = nn.ModuleList([_Transformer2D(heads, cout // heads, cout, cross, groups) for _ in range(layers)])
        self.downsamplers = nn.ModuleList([_Down(cout, padding)]) if downsample else None

    def forward(self, h, temb, context):
        states = ()
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            h = attn(resnet(h, temb), context)
            states = states + (h,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                h = down(h)
            states = states + (h,)
        return h, states


class _CrossAttnMid(nn.Module):
    def __init__(self, channels: int, temb: int, heads: int, cross: int, groups: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(channels, channels, temb, groups, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([_Transformer2D(heads, channels // heads, channels, cross, groups)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            h = resnet(attn(h, context), temb)
        return h


class _CrossAttnUp(nn.Module):
    def __init__(self, cin: int, cout: int, prev: int, temb: int, layers: int, heads: int, cross: int, groups: int,
                 eps: float, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            _Resnet((prev if i == 0 else cout) + (cin if i == layers - 1 else cout), cout, temb, groups, eps)
            for i in range(layers)])
        self.attentions = nn.ModuleList([_Transformer2D(heads, cout // heads, cout, cross, groups) for _ in range(layers)])
        self.upsamplers = nn.ModuleList([_Up(cout)]) if upsample else None

    def forward(self, h, skips, temb, context, size=None):
        for resnet, attn in zip(self.resnets, self.attentions, strict=True):
            h = torch.cat([h, skips[-1]], dim=1)
            skips = skips[:-1]
            h = attn(resnet(h, temb), context)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                h = up(h, size)
        return h


class _TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int, cond: int | None):
        super().__init__()
        self.linear_1 = nn.Linear(cin, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.cond_proj = nn.Linear(cond, cin, bias=False) if cond else None

    def forward(self, sample, condition=None):
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(sample)))


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, shift: float) -> torch.Tensor:
    """diffusers' get_timestep_embedding (scale 1, max_period 10000)."""
    half_dim = dim // 2
    exponent = -math.log(10000) * torch.arange(start=0, end=half_dim, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half_dim - shift)
    emb = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = 1 * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1, 0, 0))
    return emb


class LiteUNet(_Lite):
    """UNet2DConditionModel of cross-attention down / mid / up blocks (``unsupported`` says which)."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        c = config
        ch, layers, heads = list(c["block_out_channels"]), c["layers_per_block"], c["attention_head_dim"]
        groups, eps, cross = c["norm_num_groups"], c["norm_eps"], c["cross_attention_dim"]
        self.flip, self.shift = c["flip_sin_to_cos"], c["freq_shift"]
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(c["in_channels"], ch[0], kernel_size=3, padding=1)
        self.time_embedding = _TimestepEmbedding(ch[0], temb, c.get("time_cond_proj_dim"))
        self.down_blocks = nn.ModuleList([
            _CrossAttnDown(ch[max(i - 1, 0)], ch[i], temb, layers, heads, cross, groups, eps, i < len(ch) - 1,
                           c["downsample_padding"]) for i in range(len(ch))])
        self.mid_block = _CrossAttnMid(ch[-1], temb, heads, cross, groups, eps)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList([
            _CrossAttnUp(rev[min(i + 1, len(ch) - 1)], rev[i], rev[max(i - 1, 0)], temb, layers + 1, heads, cross,
                         groups, eps, i < len(ch) - 1) for i in range(len(ch))])
        self.num_upsamplers = len(ch) - 1
        self.conv_norm_out = nn.GroupNorm(num_channels=ch[0], num_groups=groups, eps=eps)
        self.conv_out = nn.Conv2d(ch[0], c["out_channels"], kernel_size=3, padding=1)
        self.time_channels = ch[0]

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, return_dict: bool = False):
        factor = 2**self.num_upsamplers
        forward_upsample_size = any(d % factor != 0 for d in sample.shape[-2:])
        timesteps = timestep
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.float64 if isinstance(timestep, float) else torch.int64,
                                     device=sample.device)
        elif len(timesteps.shape) == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps.expand(sample.shape[0])
        t_emb = timestep_embedding(timesteps, self.time_channels, self.flip, self.shift).to(dtype=sample.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)
        sample = self.conv_in(sample)
        skips = (sample,)
        for block in self.down_blocks:
            sample, states = block(sample, emb, encoder_hidden_states)
            skips += states
        sample = self.mid_block(sample, emb, encoder_hidden_states)
        size = None
        for i, block in enumerate(self.up_blocks):
            res = skips[-len(block.resnets):]
            skips = skips[: -len(block.resnets)]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                size = skips[-1].shape[2:]
            sample = block(sample, res, emb, encoder_hidden_states, size)
        sample = self.conv_out(F.silu(self.conv_norm_out(sample)))
        return (sample,)


# -- AutoencoderKL's decoder --------------------------------------------------------------

class _VAEMid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(channels, channels, None, groups, 1e-6) for _ in range(2)])
        self.attentions = nn.ModuleList([_Attention(channels, 1, channels, bias=True, groups=groups, eps=1e-6,
                                                    residual=True)])

    def forward(self, h):
        h = self.resnets[0](h, None)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            h = resnet(attn(h), None)
        return h


class _VAEUp(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(cin if i == 0 else cout, cout, None, groups, 1e-6) for i in range(layers)])
        self.upsamplers = nn.ModuleList([_Up(cout)]) if upsample else None

    def forward(self, h):
        for resnet in self.resnets:
            h = resnet(h, None)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                h = up(h)
        return h


class _Decoder(nn.Module):
    def __init__(self, latent: int, ch: list[int], groups: int, layers: int, out: int):
        super().__init__()
        self.conv_in = nn.Conv2d(latent, ch[-1], kernel_size=3, stride=1, padding=1)
        self.mid_block = _VAEMid(ch[-1], groups)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList([_VAEUp(rev[max(i - 1, 0)], rev[i], layers + 1, groups, i < len(ch) - 1)
                                        for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(num_channels=ch[0], num_groups=groups, eps=1e-6)
        self.conv_out = nn.Conv2d(ch[0], out, 3, padding=1)

    def forward(self, z):
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class LiteVAE(_Lite):
    """AutoencoderKL's decode path (post_quant_conv, decoder); the encoder is not built, since the
    lite path is text-to-image only."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        latent = config["latent_channels"]
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)
        self.decoder = _Decoder(latent, list(config["block_out_channels"]), config["norm_num_groups"],
                                config["layers_per_block"], config["out_channels"])

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return (self.decoder(self.post_quant_conv(z)),)


LITE_CLASSES = {"text_encoder": LiteCLIPTextModel, "unet": LiteUNet, "vae": LiteVAE}
#: each module's weight file in its folder
LITE_WEIGHTS = {"text_encoder": "model.safetensors", "unet": "diffusion_pytorch_model.safetensors",
                "vae": "diffusion_pytorch_model.safetensors"}


def load_lite_module(part: str, config: dict[str, Any], weights, dtype: torch.dtype) -> nn.Module:
    """``part``'s lite module with the tensors of the safetensors file ``weights`` (strict: every
    parameter present, none left over, except the VAE encoder's which the lite VAE does not build)."""
    from safetensors.torch import load_file

    # Built on the CPU and its random init overwritten: the meta device would skip the init, but
    # its first use imports torch._dynamo (1.4 s), 20 times what initialising the toy's weights costs.
    module = LITE_CLASSES[part](config)
    state = load_file(str(weights))
    if part == "vae":
        state = {k: v for k, v in state.items() if not k.startswith(("encoder.", "quant_conv."))}
    module.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def lite_info(info):
    """``info`` marked to load the lite modules and tokenizer (``ModelInfo.lite``) when they
    reproduce its configuration and its folder holds their files; else ``info`` itself."""
    import dataclasses

    from .lite_text import tokenizer_unsupported

    files = [info.path / part / name for part, name in LITE_WEIGHTS.items()]
    if (info.loras or info.variant is not None or not all(f.is_file() for f in files) or unsupported(info)
            or tokenizer_unsupported(info.path / "tokenizer")):
        return info
    return dataclasses.replace(info, lite=True)


def load_lite_modules(info, dtype: torch.dtype, device, parts) -> dict[str, nn.Module] | None:
    """The lite modules of ``parts``, on ``device``; None when the folder's tensors are named or
    shaped otherwise (the libraries' loaders then load them)."""
    try:
        return {part: load_lite_module(part, getattr(info, f"{part}_config"), info.path / part / LITE_WEIGHTS[part],
                                       dtype).to(device) for part in parts}
    except (RuntimeError, KeyError) as e:
        logging.getLogger(__name__).debug("lite modules do not fit %s (%s)", info.path, e)
        return None
