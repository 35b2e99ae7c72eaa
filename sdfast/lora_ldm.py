"""The original LDM U-Net's layer names (kohya LoRA files of SD 1.x / 2.x / SDXL use them) for
diffusers' U-Net layers: see ``ldm_names``."""

from __future__ import annotations

import re

#: a diffusers resnet's layers under their LDM names (ResBlock: in_layers = norm, act, conv; ...)
_LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
#: the U-Net's layers outside the blocks (SDXL's add_embedding is LDM's label_emb)
_LDM_OUTSIDE = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                "add_embedding.linear_2": "label_emb.0.2"}


def ldm_names(names: list[str]) -> dict[str, str]:
    """The original LDM U-Net's dotted name of each diffusers U-Net layer in ``names`` → that
    name. The block layout (resnets per block, which blocks have attentions and samplers) is read
    from the names themselves, so it follows any SD 1.x / 2.x / SDXL config: LDM counts
    input_blocks from 1 (0 is conv_in), each resnet (with its attention, at .1) and each
    downsampler (.0.op) one entry; middle_block is resnet, attention, resnet; output_blocks count
    from 0, the upsampler inside the block's last entry after the resnet (and attention)."""
    parsed = [(n, re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)"
                           r"\.(.+)$", n)) for n in names]
    blocks: dict[tuple[str, int], dict[str, set[int]]] = {}
    for _, m in parsed:
        if m:
            blocks.setdefault((m[1], int(m[2])), {}).setdefault(m[3], set()).add(int(m[4]))

    def count(kind: str, b: int, part: str) -> int:
        got = blocks.get((kind, b), {}).get(part, set())
        return max(got) + 1 if got else 0

    def start(kind: str, b: int) -> int:  # the LDM index of block b's first entry
        first = 1 if kind == "down_blocks" else 0
        return first + sum(count(kind, k, "resnets") + count(kind, k, "downsamplers") for k in range(b))

    out = {}
    for n, m in parsed:
        if m is None:
            mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", n)
            if mid:
                entry = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}.get(mid.group(1, 2))
                inner = _LDM_RESNET.get(mid[3], None) if mid[1] == "resnets" else mid[3]
                if entry is not None and inner is not None:
                    out[f"middle_block.{entry}.{inner}"] = n
            elif n in _LDM_OUTSIDE:
                out[_LDM_OUTSIDE[n]] = n
            continue
        kind, b, part, k, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        at = "input_blocks" if kind == "down_blocks" else "output_blocks"
        if part == "resnets" and rest in _LDM_RESNET:
            out[f"{at}.{start(kind, b) + k}.0.{_LDM_RESNET[rest]}"] = n
        elif part == "attentions":
            out[f"{at}.{start(kind, b) + k}.1.{rest}"] = n
        elif part == "downsamplers" and rest == "conv":
            out[f"input_blocks.{start(kind, b) + count(kind, b, 'resnets')}.0.op"] = n
        elif part == "upsamplers" and rest == "conv":
            last = start(kind, b) + count(kind, b, "resnets") - 1
            out[f"output_blocks.{last}.{2 if count(kind, b, 'attentions') else 1}.conv"] = n
    return out
