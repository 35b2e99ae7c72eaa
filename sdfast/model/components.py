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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .info import ModelInfo


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    #: an export precision only (``sdfast export --format openvino --precision int8``, export/int8.py):
    #: the quantized components compute in int8 where NNCF put it and in fp32 / bf16 elsewhere, and
    #: their manifest record keeps that float precision; never a runtime dtype (``parse`` refuses it).
    INT8 = "int8"

    @property
    def torch_dtype(self) -> torch.dtype:
        if self is Precision.INT8:
            from ..errors import InvalidArgument

            raise InvalidArgument("dtype: int8 is an export precision, not a tensor dtype; load an int8 export "
                                  "with --dtype auto (its float precision)")
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.value]

    @classmethod
    def resolve(cls, value: str | Precision, device: torch.device) -> Precision:
        """``parse``, plus ``"auto"``: the fastest precision this device runs well — fp16 on CUDA,
        bf16 on a CPU with bf16 matrix units (AMX / AVX512-BF16), fp32 elsewhere."""
        if value == "auto":
            from ..hardware import cpu_bf16_supported

            if device.type == "cuda":
                return cls.FP16
            return cls.BF16 if cpu_bf16_supported() else cls.FP32
        return cls.parse(value)

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        from ..errors import InvalidArgument

        try:
            p = cls(value)
        except ValueError:
            raise InvalidArgument(
                f"dtype: {value!r} is not a precision; use one of "
                f"{', '.join(p.value for p in cls if p is not cls.INT8)}, or auto"
            ) from None
        if p is cls.INT8:
            raise InvalidArgument("dtype: int8 is an export precision (sdfast export --format openvino --precision "
                                  "int8), not a runtime dtype; load an int8 export with --dtype auto")
        return p


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str, ...]
    #: "float" tensors take the engine's precision; "int64" stay integer.
    kind: str = "float"


#: How a component's batch dim relates to a call's images (``ShapeProfile.component_dims``):
#: "texts": the call's distinct texts × their chunks (1 .. 2 × images × chunks); "guided": the
#: U-Net's rows, 2 × images under guidance and images without; "init": one init image, expanded
#: after encoding; "images": one row per image.
ROWS = ("texts", "guided", "init", "images")


@dataclass(frozen=True)
class ComponentSpec:
    """Everything known about one component: its tensors, the torch module (folder) it runs,
    and how its batch dim counts rows. Code elsewhere reads these facts, never the name."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: the model folder's torch module it wraps: "text_encoder", "text_encoder_2", "unet", "vae".
    module: str = ""
    rows: str = "images"
    #: tier-1 parity: the max-abs bound an fp32 engine of it is held to against eager.
    atol: float = 1e-4
    #: the bench stage its time and FLOPs count under.
    stage: str = ""
    #: run through the CUDA-graph runner's static buffers when CUDA graphs are on (the U-Net is
    #: captured inside the whole guided step instead, graphs.py).
    graphed: bool = False
    #: one of the two DeepCache graphs of a U-Net (``deepcache_specs``): the branch it was cut at
    cache_branch: int | None = None

    def __post_init__(self):
        assert self.rows in ROWS, self.rows

    @property
    def is_vae(self) -> bool:
        """Part of the VAE: kept in fp32 by exporters unless told otherwise; fp32 VAE fallback."""
        return self.module == "vae"

    @property
    def is_text(self) -> bool:
        """A text encoder: its attention is exported as the eager implementation."""
        return self.module.startswith("text_encoder")

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
    module="text_encoder", rows="texts", atol=1e-3, stage="text_encoder", graphed=True,
)
UNET = ComponentSpec(
    "unet",
    inputs=(
        TensorSpec("sample", ("B", "Cu", "h", "w")),
        # One timestep for the whole batch: every image of a call is at the same step.
        TensorSpec("timestep", ("1",)),
        TensorSpec("encoder_hidden_states", ("B", "S", "D")),
    ),
    outputs=(TensorSpec("noise_pred", ("B", "C", "h", "w")),),
    module="unet", rows="guided", atol=1e-4, stage="unet_step",
)
VAE_DECODER = ComponentSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent", ("B", "C", "h", "w")),),
    outputs=(TensorSpec("image", ("B", "3", "H", "W")),),
    module="vae", atol=3e-4, stage="vae_decode", graphed=True,
)
VAE_ENCODER = ComponentSpec(
    "vae_encoder",
    inputs=(TensorSpec("image", ("B", "3", "H", "W")),),
    # Mean and log-variance of the posterior, concatenated on channels (diffusers' "moments").
    outputs=(TensorSpec("moments", ("B", "2C", "h", "w")),),
    module="vae", rows="init", atol=3e-4, stage="vae_encode",
)

SPECS: dict[str, ComponentSpec] = {s.name: s for s in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}

# SDXL (diffusers' StableDiffusionXLPipeline): two text encoders whose penultimate hidden states
# are concatenated on the feature axis (D = D1 + D2), the second one's pooled projection (P),
# and the U-Net's "text_time" conditioning: that pooled embedding plus six size numbers
# (original size, crop top-left, target size) per row.
SDXL_TEXT_ENCODER = ComponentSpec(
    "text_encoder",
    inputs=(TensorSpec("input_ids", ("B", "S"), "int64"),),
    outputs=(TensorSpec("hidden_states", ("B", "S", "D1")),),  # hidden_states[-2]
    module="text_encoder", rows="texts", atol=1e-3, stage="text_encoder", graphed=True,
)
SDXL_TEXT_ENCODER_2 = ComponentSpec(
    "text_encoder_2",
    inputs=(TensorSpec("input_ids", ("B", "S"), "int64"),),
    outputs=(TensorSpec("hidden_states", ("B", "S", "D2")), TensorSpec("text_embeds", ("B", "P"))),
    module="text_encoder_2", rows="texts", atol=1e-3, stage="text_encoder",
)
SDXL_UNET = ComponentSpec(
    "unet",
    inputs=(*UNET.inputs, TensorSpec("text_embeds", ("B", "P")), TensorSpec("time_ids", ("B", "6"))),
    outputs=UNET.outputs,
    module="unet", rows="guided", atol=1e-4, stage="unet_step",
)

#: A U-Net distilled with guidance as an input (LCM: diffusers' ``time_cond_proj_dim``) takes each
#: row's guidance-scale embedding (E = time_cond_proj_dim wide) as one more input, last.
TIMESTEP_COND = TensorSpec("timestep_cond", ("B", "E"))


def with_timestep_cond(spec: ComponentSpec) -> ComponentSpec:
    """``spec`` (a U-Net's) with the guidance-embedding input appended."""
    return replace(spec, inputs=(*spec.inputs, TIMESTEP_COND))


#: DeepCache's two exported graphs of a U-Net (sdfast/deepcache.py): the full one also emits the
#: feature entering the up layer of the cut branch, the shallow one takes it as its last input.
CACHE_DEEP, CACHE_SHALLOW = "unet_deep", "unet_shallow"
#: the export formats that build them (``sdfast export --cache-branch``)
CACHE_FORMATS = ("onnx", "openvino")


def cache_feature(unet_config: dict, branch: int) -> TensorSpec:
    """The cached feature of ``branch`` (sdfast/deepcache.py's numbering), from the U-Net config:
    the hidden state entering the up layer that consumes down residual ``branch``, so it has that
    residual's resolution and the channels of the layer before it (the mid block's for the deepest)."""
    from ..errors import InvalidArgument

    blocks = list(unet_config["block_out_channels"])
    per = unet_config.get("layers_per_block", 2)
    per = [per] * len(blocks) if isinstance(per, int) else list(per)
    levels = [0]  # residual k's downsampling level: conv_in, then each block's layers and downsampler
    for i, n in enumerate(per):
        levels += [i] * n + ([i + 1] if i < len(blocks) - 1 else [])
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < len(levels):
        raise InvalidArgument(f"cache_branch: this U-Net has branches 0 .. {len(levels) - 1} (0 is the shallowest, "
                              f"fastest one) but {branch!r} was asked for")
    entry = len(levels) - 1 - branch  # up layers consume residuals last-first, one each
    up = [c for c, n in zip(reversed(blocks), reversed(per), strict=True) for _ in range(n + 1)]
    channels = blocks[-1] if entry == 0 else up[entry - 1]
    s = 2 ** levels[branch]
    side = ("h", "w") if s == 1 else (f"h/{s}", f"w/{s}")
    return TensorSpec("feature", ("B", str(channels), *side))


def deepcache_specs(unet: ComponentSpec, unet_config: dict, branch: int) -> dict[str, ComponentSpec]:
    """The two DeepCache graphs of the U-Net ``unet`` cut at ``branch``, as components."""
    feature = cache_feature(unet_config, branch)
    deep = replace(unet, name=CACHE_DEEP, outputs=(*unet.outputs, feature), cache_branch=branch)
    shallow = replace(unet, name=CACHE_SHALLOW, inputs=(*unet.inputs, feature), cache_branch=branch)
    return {CACHE_DEEP: deep, CACHE_SHALLOW: shallow}


def _dim(d: str, known: dict[str, int]) -> int | None:
    """A dim's size from ``known``: a name, ``name/N`` (a downsampled side) or a number."""
    if d in known:
        return known[d]
    if "/" in d:
        base, n = d.split("/")
        return known[base] // int(n) if base in known else None
    return int(d)


@dataclass(frozen=True)
class Family:
    """Everything that differs between model families, so no module outside the specs and
    ``text.py`` branches on a family's name: add a family by adding a record (and its text class)."""

    name: str
    #: its components, in load and export order
    specs: dict[str, ComponentSpec]
    #: the model folder's text encoder folders (each with its tokenizer folder of the same suffix)
    text_encoders: tuple[str, ...] = ("text_encoder",)
    #: takes SDXL's size conditioning and second prompts; reads model_index.json's
    #: force_zeros_for_empty_prompt and honours the VAE config's force_upcast, as diffusers' SDXL
    #: pipelines do (SD 1.x/2.x pipelines ignore both keys)
    size_conditioning: bool = False
    #: diffusers' text-to-image pipeline class of the family (the bench's and the tests' reference)
    diffusers_pipeline: str = "StableDiffusionPipeline"


FAMILIES: dict[str, Family] = {
    "sd": Family("sd", SPECS),
    "sdxl": Family("sdxl", {s.name: s for s in (SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, SDXL_UNET, VAE_DECODER,
                                                VAE_ENCODER)},
                   text_encoders=("text_encoder", "text_encoder_2"), size_conditioning=True,
                   diffusers_pipeline="StableDiffusionXLPipeline"),
}
#: the components of each model family, in load and export order.
FAMILY_SPECS: dict[str, dict[str, ComponentSpec]] = {k: f.specs for k, f in FAMILIES.items()}
#: component name -> the torch module (model folder) it runs, from the specs.
COMPONENT_MODULE: dict[str, str] = {n: s.module for specs in FAMILY_SPECS.values() for n, s in specs.items()}
#: the VAE's components (exporters keep them in fp32 unless told otherwise), from the specs.
VAE_COMPONENTS: frozenset[str] = frozenset(n for specs in FAMILY_SPECS.values() for n, s in specs.items() if s.is_vae)


# -- shape profiles ---------------------------------------------------------------------------

#: A dim's (min, opt, max).
Range = tuple[int, int, int]


@dataclass(frozen=True)
class ShapeProfile:
    """What an engine set serves, in the user's terms: images per call and image sides in pixels.

    ``batch`` counts images (prompts). The text encoder and U-Net see twice that under
    classifier-free guidance and exactly that without, so their batch dim spans
    ``min_batch .. 2 × max_batch`` with ``2 × opt_batch`` as the tuned shape (guidance is the
    common case). ``component_dims`` turns this into every symbolic dim of a component.
    """

    min_batch: int
    opt_batch: int
    max_batch: int
    min_height: int
    opt_height: int
    max_height: int
    min_width: int
    opt_width: int
    max_width: int
    #: prompt length in text-encoder chunks of S tokens (long prompts, ``long_prompt="chunk"``):
    #: the U-Net's text sequence is chunks × S long.
    min_chunks: int = 1
    opt_chunks: int = 1
    max_chunks: int = 1

    @classmethod
    def static(cls, batch: int, height: int, width: int) -> ShapeProfile:
        return cls(batch, batch, batch, height, height, height, width, width, width)

    @property
    def chunks(self) -> Range:
        return (self.min_chunks, self.opt_chunks, self.max_chunks)

    @property
    def batch(self) -> Range:
        return (self.min_batch, self.opt_batch, self.max_batch)

    @property
    def height(self) -> Range:
        return (self.min_height, self.opt_height, self.max_height)

    @property
    def width(self) -> Range:
        return (self.min_width, self.opt_width, self.max_width)

    @property
    def is_static(self) -> bool:
        return all(lo == hi for lo, _, hi in (self.batch, self.height, self.width))

    def validate(self, info: ModelInfo) -> None:
        """Raise InvalidArgument unless min ≤ opt ≤ max and every side fits the U-Net's grid."""
        from ..errors import InvalidArgument
        from ..rules import check_side

        for arg, (lo, opt, hi) in (("batch", self.batch), ("height", self.height), ("width", self.width),
                                   ("chunks", self.chunks)):
            if not 1 <= lo <= opt <= hi:
                raise InvalidArgument(
                    f"{arg}: the profile needs 1 <= min <= opt <= max but has {lo} / {opt} / {hi}; "
                    f"fix --min-{arg} / --{arg} / --max-{arg}"
                )
        m = size_multiple(info)
        for arg, r in (("height", self.height), ("width", self.width)):
            for v in r:
                check_side(f"{arg} (export profile)", v, m, "VAE factor × U-Net downsampling")

    def covers(self, batch: int, height: int, width: int, chunks: int = 1) -> list[str]:
        """The reasons ``(batch, height, width, chunks)`` falls outside; empty when it is served."""
        out = []
        for arg, v, (lo, _, hi) in (("batch", batch, self.batch), ("height", height, self.height),
                                    ("width", width, self.width), ("chunks", chunks, self.chunks)):
            if not lo <= v <= hi:
                out.append(f"{arg} {v} is outside {lo}..{hi}")
        return out

    def describe(self) -> str:
        def r(lo: int, opt: int, hi: int) -> str:
            return str(lo) if lo == hi else f"{lo}..{hi} (opt {opt})"

        text = f", prompt chunks {r(*self.chunks)}" if self.max_chunks > 1 else ""
        return f"batch {r(*self.batch)}, height {r(*self.height)}, width {r(*self.width)}{text}"

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> ShapeProfile:
        # Exports made before prompt chunks existed serve one chunk.
        return cls(**{k: int(d[k]) if k in d or "chunks" not in k else 1 for k in cls.__dataclass_fields__})

    def component_dims(self, spec: ComponentSpec, info: ModelInfo) -> dict[str, Range]:
        """(min, opt, max) of every dim name used by ``spec``'s tensors."""
        f = info.vae_scale_factor
        c = info.latent_channels
        s = info.max_tokens
        seq = (s,) * 3
        if spec.rows == "texts":
            # Rows are the distinct texts of a call (1 when every prompt and negative is the
            # same) times their chunks: up to 2 × max_batch × max_chunks.
            batch = (1, 2 * self.opt_batch * self.opt_chunks, 2 * self.max_batch * self.max_chunks)
        elif spec.rows == "guided":
            batch = (self.min_batch, 2 * self.opt_batch, 2 * self.max_batch)
            seq = tuple(s * k for k in self.chunks)  # chunk embeddings concatenated
        elif spec.rows == "init":
            batch = (1, 1, self.max_batch)  # img2img encodes one init image, then expands it
        else:
            batch = self.batch
        dims: dict[str, Range] = {
            "B": batch,
            "S": seq,
            "D": (info.text_hidden_size,) * 3,
            **{k: (v,) * 3 for k, v in info.text_dims.items()},
            "C": (c,) * 3,
            "Cu": (info.unet_in_channels,) * 3,  # C, or 2C + 1 for an inpainting U-Net (sdfast/inpaint.py)
            "2C": (2 * c,) * 3,
            "E": ((info.timestep_cond_dim or 0),) * 3,
            "H": self.height,
            "W": self.width,
            "h": tuple(v // f for v in self.height),
            "w": tuple(v // f for v in self.width),
        }
        out = {}
        for d in (d for t in spec.inputs + spec.outputs for d in t.dims):
            if d in dims:
                out[d] = dims[d]
            elif "/" in d:  # a downsampled side (a DeepCache feature): h/4
                out[d] = tuple(_dim(d, {d.split("/")[0]: v}) for v in dims[d.split("/")[0]])
            else:
                out[d] = (int(d),) * 3
        return out

    def shapes(self, spec: ComponentSpec, info: ModelInfo, which: str = "inputs") -> dict[str, tuple[tuple[int, ...], ...]]:
        """tensor name -> (min shape, opt shape, max shape): TensorRT's profile triples and buffer sizes."""
        dims = self.component_dims(spec, info)
        tensors = spec.inputs if which == "inputs" else spec.outputs
        return {t.name: tuple(tuple(dims[d][k] for d in t.dims) for k in range(3)) for t in tensors}

    def dynamic_axes(self, spec: ComponentSpec, info: ModelInfo) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes: only the dims whose min and max differ stay symbolic."""
        dims = self.component_dims(spec, info)
        out = {}
        for t in spec.inputs + spec.outputs:
            axes = {i: d for i, d in enumerate(t.dims) if dims[d][0] != dims[d][2]}
            if axes:
                out[t.name] = axes
        return out


def size_multiple(info: ModelInfo) -> int:
    """Image sides an exported U-Net serves: the VAE factor × 2^(U-Net downsamplings).

    Diffusers' U-Net pads odd latent grids by a shape-dependent branch that a traced graph
    freezes, so exported engines only serve sides on the U-Net's full-resolution grid.
    """
    return info.vae_scale_factor * 2 ** (len(info.unet_config["block_out_channels"]) - 1)


def sample_inputs(spec: ComponentSpec, info: ModelInfo, profile: ShapeProfile, which: int = 1,
                  dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs at the profile's min (0), opt (1) or max (2) shape; token ids in the vocabulary."""
    g = torch.Generator("cpu").manual_seed(seed)
    shapes = profile.shapes(spec, info)
    out = {}
    for t in spec.inputs:
        shape = shapes[t.name][which]
        if t.kind == "int64":
            vocab = int(info.text_encoder_config["vocab_size"])
            out[t.name] = torch.randint(0, vocab, shape, generator=g, dtype=torch.int64)
        elif t.name == "timestep":
            # A mid-schedule timestep: export traces one value for the whole batch.
            n = int(info.scheduler_config.get("num_train_timesteps", 1000))
            out[t.name] = torch.full(shape, n // 2, dtype=dtype)
        elif t.name == "time_ids":  # SDXL: (original h, w, crop top, left, target h, w) per row
            side = float(info.native_size)
            out[t.name] = torch.tensor([side, side, 0.0, 0.0, side, side], dtype=dtype).expand(shape).clone()
        else:
            out[t.name] = torch.randn(shape, generator=g).to(dtype)
    return out


def output_shapes(spec: ComponentSpec, info: ModelInfo, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Output shapes implied by concrete input shapes (so engines can allocate before running)."""
    f = info.vae_scale_factor
    known: dict[str, int] = {"S": info.max_tokens, "D": info.text_hidden_size, "C": info.latent_channels,
                             "Cu": info.unet_in_channels, "2C": 2 * info.latent_channels, **info.text_dims}
    if info.timestep_cond_dim:
        known["E"] = info.timestep_cond_dim
    for t in spec.inputs:
        for d, v in zip(t.dims, inputs[t.name], strict=True):
            known[d] = v
    if "h" in known:
        known.setdefault("H", known["h"] * f)
        known.setdefault("W", known["w"] * f)
    if "H" in known:
        known.setdefault("h", known["H"] // f)
        known.setdefault("w", known["W"] // f)
    return {t.name: tuple(_dim(d, known) for d in t.dims) for t in spec.outputs}
