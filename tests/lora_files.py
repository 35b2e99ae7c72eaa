"""LoRA files for the tests, made in code with seeded random weights in each format sdfast reads.

``layers``: (group, dotted module name) pairs of the model they are for; each gets a rank-``rank``
pair sized from that module's weight, so a file fits exactly the model it was made from.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

#: the first text encoder layer's LoRA-able linears (diffusers infers a text-encoder LoRA's format
#: from its out_proj keys, so a file must carry the whole layer as real files do)
TEXT_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def module_weight(modules: dict[str, torch.nn.Module], group: str, name: str) -> torch.Tensor:
    return modules[group].get_submodule(name.removeprefix("text_model.")
                                        if not hasattr(modules[group], "text_model") else name).weight


def sd_layers(text_groups=("text_encoder",), conv: bool = True) -> list[tuple[str, str]]:
    """U-Net attention linears of both levels, the 1x1 proj_in and a 3x3 resnet conv (conv=True),
    and the first layer of each text encoder in ``text_groups``."""
    unet = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
            "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
            "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"]
    if conv:
        unet += ["down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1"]
    return [("unet", n) for n in unet] + [(g, f"text_model.encoder.layers.0.{m}") for g in text_groups
                                          for m in TEXT_LAYER]


def make_lora(path: Path, modules: dict[str, torch.nn.Module], layers: list[tuple[str, str]], fmt: str,
              seed: int = 0, rank: int = 4, alpha: float | None = 2.0, amplitude: float = 0.2,
              metadata_alpha: bool = False) -> Path:
    """Write a LoRA in ``fmt``: "kohya" (lora_unet_…, lora_te…_, .alpha), "diffusers" (unet.….lora.down/up)
    or "peft" (unet.….lora_A/B). ``alpha`` None writes no alpha (alpha = rank); metadata_alpha
    writes it as diffusers' lora_adapter_metadata instead of .alpha keys (diffusers reads .alpha
    keys in kohya files only)."""
    g = torch.Generator().manual_seed(seed)
    tensors, meta = {}, {"format": "pt"}
    sdxl = any(group == "text_encoder_2" for group, _ in layers)
    for group, name in layers:
        w = module_weight(modules, group, name)
        ks = tuple(w.shape[2:])
        down = torch.randn((rank, w.shape[1], *ks), generator=g) * amplitude
        up = torch.randn((w.shape[0], rank, *((1,) * len(ks))), generator=g) * amplitude
        if fmt == "kohya":
            prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[group]
            stem = prefix + name.replace(".", "_")
            tensors[stem + ".lora_down.weight"], tensors[stem + ".lora_up.weight"] = down, up
            if alpha is not None:
                tensors[stem + ".alpha"] = torch.tensor(float(alpha))
        else:
            # diffusers' own spelling: .lora.down/up in the U-Net, .lora_linear_layer.down/up in text encoders
            d, u = ((".lora.down.weight", ".lora.up.weight") if group == "unet" else
                    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")) if fmt == "diffusers" \
                else (".lora_A.weight", ".lora_B.weight")
            stem = f"{group}.{name}"
            tensors[stem + d], tensors[stem + u] = down, up
            if alpha is not None and not metadata_alpha:
                tensors[stem + ".alpha"] = torch.tensor(float(alpha))
    if metadata_alpha and alpha is not None:
        groups = sorted({gr for gr, _ in layers})
        meta["lora_adapter_metadata"] = json.dumps(
            {f"{gr}.{k}": v for gr in groups for k, v in (("r", rank), ("lora_alpha", alpha),
                                                          ("target_modules", sorted({n.rsplit('.', 1)[-1] for g2, n in layers if g2 == gr})))})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path
