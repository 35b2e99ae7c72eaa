"""One spec per exported component: input/output names, dtypes and symbolic dims.

Export, every engine, and the shape checks read these specs; nothing else restates a shape.
Dim names:

- ``B``  batch of the component call (the U-Net's is 2×images under guidance, images without)
- ``S``  tokens per prompt (the tokenizer's ``model_max_length``)
- ``D``  text-embedding width (the text encoder's ``hidden_size``)
- ``C``  latent channels, ``h``/``w`` latent height/width, ``H``/``W`` image height/width
  (``H = h × f`` with ``f`` the VAE scale factor)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        try:
            return cls(value)
        except ValueError:
            from .errors import InvalidArgument

            raise InvalidArgument(
                f"dtype: {value!r} is not a precision; use one of {', '.join(p.value for p in cls)}"
            ) from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str, ...]
    #: "float" tensors take the engine's precision; "int64" stay integer.
    kind: str = "float"


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


TEXT_ENCODER = ComponentSpec(
    "text_encoder",
    inputs=(TensorSpec("input_ids", ("B", "S"), "int64"),),
    outputs=(TensorSpec("last_hidden_state", ("B", "S", "D")),),
)
UNET = ComponentSpec(
    "unet",
    inputs=(
        TensorSpec("sample", ("B", "C", "h", "w")),
        # One timestep for the whole batch: every image of a call is at the same step.
        TensorSpec("timestep", ("1",)),
        TensorSpec("encoder_hidden_states", ("B", "S", "D")),
    ),
    outputs=(TensorSpec("noise_pred", ("B", "C", "h", "w")),),
)
VAE_DECODER = ComponentSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent", ("B", "C", "h", "w")),),
    outputs=(TensorSpec("image", ("B", "3", "H", "W")),),
)
VAE_ENCODER = ComponentSpec(
    "vae_encoder",
    inputs=(TensorSpec("image", ("B", "3", "H", "W")),),
    # Mean and log-variance of the posterior, concatenated on channels (diffusers' "moments").
    outputs=(TensorSpec("moments", ("B", "2C", "h", "w")),),
)

SPECS: dict[str, ComponentSpec] = {s.name: s for s in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}
