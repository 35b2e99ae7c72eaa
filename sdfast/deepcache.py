"""DeepCache (Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models for Free", 2023) for the
torch backend's U-Net: an opt-in approximation, never a default.

The idea: between neighbouring denoising steps the U-Net's deep, low-resolution features change
little, while its shallow, high-resolution path is cheap. So every ``interval``-th U-Net call runs
the whole network and keeps the feature that enters one chosen up-path layer from below; the calls
in between run only the shallow path — ``conv_in``, the first down-path layers, the matching last
up-path layers, ``conv_out`` — and take that deep feature from the cache.

How the network is cut (written against diffusers' ``UNet2DConditionModel`` blocks). The down path
is a list of *layers*, each emitting one skip residual: ``conv_in`` emits residual 0, then every
(resnet, attention) pair and every downsampler of the down blocks, in order, emit residuals
1, 2, ... The up path consumes them in reverse: every (resnet, attention) pair of the up blocks
concatenates the last unconsumed residual to its input (an up block's upsampler follows its last
pair). **Branch** ``b`` is the skip connection of residual ``b``:

- a full call runs everything and caches the hidden state entering the up layer that consumes
  residual ``b`` (the output of the deeper up layers);
- a shallow call computes residuals ``0 .. b`` (``conv_in`` and the first ``b`` down layers), then
  runs the up layers that consume residuals ``b .. 0`` starting from the cached feature.

Branch 0 is the shallowest (the shallow call is ``conv_in``, the last up layer and ``conv_out``).
For U-Nets with two layers per block and a downsampler (SD 1.x/2.x, SDXL), branch ``b`` is the
``cache_branch_id`` of the ``DeepCache`` package's ``DeepCacheSDHelper`` (its block ``b // 3``,
layer ``b % 3``); for other layer counts that helper's numbering does not apply and ours still does.

Call schedule ("uniform", as the paper's default): counting calls from the last :meth:`reset`,
calls 0, N, 2N, ... are full, the others shallow. A call whose batch (or any input shape) differs
from the cached full call's is run full and restarts the count there, so a change of batch — e.g.
the guided [uncond, cond] batch dropping to the cond rows under a guidance interval — never pairs
a row with another row's features. Every row's features are its own: the cache is indexed by row.

**Reset** the cache at the start of every generation: ``unet.reset()`` (the loop does it before
its first step). Without it, the first call of the next generation would reuse the previous
generation's deep features whenever the shapes agree.

The cut is two torch modules, :class:`DeepUNet` (the whole network, returning the noise
prediction and the feature) and :class:`ShallowUNet` (the shallow path, taking the feature as its
last input), with the U-Net's positional inputs in its spec's order. The torch backend runs them
as they are; ``sdfast export --cache-branch B`` (onnx, openvino) exports them as two more
components, ``unet_deep`` and ``unet_shallow`` (``components.deepcache_specs``: the feature's
shape comes from the U-Net config), hashed and checked like every component, and
:func:`for_pipeline` runs the same schedule over those engines (:class:`ExportedDeepCacheUNet`).

The object is not CUDA-graph safe (the schedule is Python state); it runs on the plain loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .engines.base import engine_inputs
from .errors import InvalidArgument
from .model.components import CACHE_DEEP, CACHE_FORMATS, CACHE_SHALLOW

#: block classes whose structure the cut knows (diffusers' SD 1.x/2.x, SDXL and LCM U-Nets).
_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
#: engine inputs -> UNet2DConditionModel.forward arguments (SDXL's two go in added_cond_kwargs).
_ADDED_COND = ("text_embeds", "time_ids")
_KNOWN_INPUTS = ("sample", "timestep", "encoder_hidden_states", "timestep_cond", *_ADDED_COND)


@dataclass(frozen=True)
class _DownLayer:
    block: int
    index: int  # resnet index, or -1 for the block's downsampler


@dataclass(frozen=True)
class _UpLayer:
    block: int
    index: int  # resnet index within the up block
    residual: int  # which down residual it consumes
    upsample: bool  # the block's upsampler runs after this layer (its last pair)


def find_unet(engine) -> torch.nn.Module:
    """The diffusers ``UNet2DConditionModel`` inside a torch-backend U-Net engine."""
    module = getattr(engine, "module", None)
    unet = getattr(module, "unet", module)
    if unet is None or type(unet).__name__ != "UNet2DConditionModel":
        raise InvalidArgument(
            f"cache_interval: DeepCache runs on the torch backend's U-Net (a diffusers UNet2DConditionModel), "
            f"but this U-Net engine is a {type(engine).__name__}; use --backend torch, or drop --cache-interval")
    return unet


def _structure(unet: torch.nn.Module) -> tuple[list[_DownLayer], list[_UpLayer]]:
    """The down layers (residual k+1 is emitted by layer k) and the up layers in call order."""
    for kind, blocks, known in (("down", unet.down_blocks, _DOWN_BLOCKS), ("up", unet.up_blocks, _UP_BLOCKS)):
        for i, block in enumerate(blocks):
            if type(block).__name__ not in known:
                raise InvalidArgument(
                    f"cache_interval: DeepCache knows the {' and '.join(known)} {kind} blocks, but {kind} block {i} "
                    f"of this U-Net is a {type(block).__name__}; drop --cache-interval for this model")
    if unet.mid_block is not None and type(unet.mid_block).__name__ not in _MID_BLOCKS:
        raise InvalidArgument(f"cache_interval: DeepCache does not know the {type(unet.mid_block).__name__} mid "
                              "block of this U-Net; drop --cache-interval for this model")
    if any(getattr(b, "s1", None) for b in unet.up_blocks):
        raise InvalidArgument("cache_interval: FreeU is enabled on this U-Net; DeepCache's cut does not apply it")
    down = []
    for i, block in enumerate(unet.down_blocks):
        down += [_DownLayer(i, j) for j in range(len(block.resnets))]
        if block.downsamplers is not None:
            down.append(_DownLayer(i, -1))
    up, residual = [], len(down)  # residuals 0 (conv_in) .. len(down)
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        for j in range(n):
            up.append(_UpLayer(i, j, residual, upsample=j == n - 1 and block.upsamplers is not None))
            residual -= 1
    if residual != -1:
        raise InvalidArgument("cache_interval: this U-Net's up path does not consume its down path's residuals "
                              "one for one; DeepCache cannot cut it")
    return down, up


def branch_count(engine) -> int:
    """How many branches the U-Net of ``engine`` has (valid ``branch`` values are 0 .. count-1)."""
    down, _ = _structure(find_unet(engine))
    return len(down) + 1  # residuals 0 .. len(down); the deepest branch skips only the mid block


class _Cut(torch.nn.Module):
    """What both halves of the cut share: the U-Net, the branch, and the layers, embedding, down
    and up paths as diffusers' forward runs them (the same module calls, in the same order)."""

    def __init__(self, unet: torch.nn.Module, branch: int, input_names: list[str]):
        super().__init__()
        unknown = [n for n in input_names if n not in _KNOWN_INPUTS]
        if unknown:
            raise InvalidArgument(f"cache_interval: DeepCache does not know the U-Net input(s) {unknown}; "
                                  "drop --cache-interval for this model")
        self.unet = unet
        self.input_names = tuple(input_names)
        self._down, self._up = _structure(unet)
        count = len(self._down) + 1
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < count:
            raise InvalidArgument(f"cache_branch: this U-Net has branches 0 .. {count - 1} (0 is the shallowest, "
                                  f"fastest one) but {branch!r} was asked for")
        self.branch = branch
        # the up layer that consumes residual `branch`: where the shallow call starts
        self._entry = next(k for k, layer in enumerate(self._up) if layer.residual == branch)

    def _embed(self, args: dict[str, torch.Tensor]):
        """(sample, time embedding, text states, whether upsamplers take explicit sizes)."""
        unet = self.unet
        sample, ehs = args["sample"], args["encoder_hidden_states"]
        added = {k: args[k] for k in _ADDED_COND if k in args} or None
        up_factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(d % up_factor != 0 for d in sample.shape[-2:])
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=args["timestep"]),
                                  args.get("timestep_cond"))
        class_emb = unet.get_class_embed(sample=sample, class_labels=None)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=added)
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ehs = unet.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=added)
        return sample, emb, ehs, forward_upsample_size

    def _down_path(self, sample, emb, ehs, layers) -> list[torch.Tensor]:
        """``conv_in`` and ``layers`` of the down path: the residuals they emit."""
        unet = self.unet
        h = unet.conv_in(sample)
        residuals = [h]
        for layer in layers:
            block = unet.down_blocks[layer.block]
            if layer.index < 0:
                for downsampler in block.downsamplers:
                    h = downsampler(h)
            else:
                h = block.resnets[layer.index](h, emb)
                if hasattr(block, "attentions"):
                    h = _attn(block.attentions[layer.index], h, ehs)
            residuals.append(h)
        return residuals

    def _up_path(self, h, residuals, emb, ehs, layers, forward_upsample_size, keep: int | None = None):
        """``layers`` of the up path from ``h``, then ``conv_out``; (output, the hidden state
        entering layer ``keep``, or None)."""
        unet = self.unet
        kept = None
        for k, layer in enumerate(layers):
            if k == keep:
                kept = h
            block = unet.up_blocks[layer.block]
            h = torch.cat([h, residuals[layer.residual]], dim=1)
            h = block.resnets[layer.index](h, emb)
            if hasattr(block, "attentions"):
                h = _attn(block.attentions[layer.index], h, ehs)
            if layer.upsample:
                size = residuals[layer.residual - 1].shape[2:] if forward_upsample_size else None
                for upsampler in block.upsamplers:
                    h = upsampler(h, size)
        if unet.conv_norm_out:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h), kept


class DeepUNet(_Cut):
    """The whole U-Net: ``forward(*inputs)`` (the U-Net spec's order) -> (noise_pred, feature),
    the feature being the hidden state entering the up layer of the cut branch."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sample, emb, ehs, sized = self._embed(dict(zip(self.input_names, inputs, strict=True)))
        residuals = self._down_path(sample, emb, ehs, self._down)
        h, mid = residuals[-1], self.unet.mid_block
        if mid is not None:
            h = mid(h, emb, encoder_hidden_states=ehs, attention_mask=None, cross_attention_kwargs=None,
                    encoder_attention_mask=None) if getattr(mid, "has_cross_attention", False) else mid(h, emb)
        return self._up_path(h, residuals, emb, ehs, self._up, sized, keep=self._entry)


class ShallowUNet(_Cut):
    """The shallow path: ``forward(*inputs, feature)`` -> noise_pred, ``feature`` from a
    :class:`DeepUNet` call (same rows, same shapes)."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *args, feature = inputs
        sample, emb, ehs, sized = self._embed(dict(zip(self.input_names, args, strict=True)))
        residuals = self._down_path(sample, emb, ehs, self._down[: self.branch])
        return self._up_path(feature, residuals, emb, ehs, self._up[self._entry :], sized)[0]


def _attn(attn: torch.nn.Module, h: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
    return attn(h, encoder_hidden_states=ehs, cross_attention_kwargs=None, attention_mask=None,
                encoder_attention_mask=None, return_dict=False)[0]


def _check_interval(interval) -> None:
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise InvalidArgument(f"cache_interval: must be a whole number >= 1 (1 = no caching) but is {interval!r}")


class _Schedule:
    """The call schedule (module docstring) over a full call ``_full(inputs) -> (noise_pred,
    feature)`` and a shallow one ``_shallow(inputs, feature) -> noise_pred``. Same call and
    output as the U-Net engine ``engine``: ``__call__(sample=, timestep=, encoder_hidden_states=,
    **cond) -> {"noise_pred": ...}``. ``history`` lists "full" / "shallow" for each call since
    the last :meth:`reset`."""

    graph_safe = False  # the call schedule is host state

    def __init__(self, engine, interval: int, branch: int):
        _check_interval(interval)
        self.spec, self.device, self.precision = engine.spec, engine.device, engine.precision
        self.profile, self.size_multiple = engine.profile, engine.size_multiple
        self.interval, self.branch = interval, branch
        self.reset()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(interval={self.interval}, branch={self.branch})"

    def describe(self) -> str:
        """One line for the approximations list of an output."""
        return f"DeepCache: full U-Net every {self.interval} calls, branch {self.branch} otherwise"

    def reset(self) -> None:
        """Forget the cached feature and restart the schedule: call at the start of every generation."""
        self._cache: torch.Tensor | None = None
        self._key: tuple | None = None
        self._since_full = 0
        self.history: list[str] = []

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        key = tuple((n, tuple(inputs[n].shape)) for n in self.spec.input_names)
        full = self._cache is None or key != self._key or self._since_full >= self.interval
        if full:
            out, self._cache = self._full(inputs)
            self._key, self._since_full = key, 1
        else:
            out = self._shallow(inputs, self._cache)
            self._since_full += 1
        self.history.append("full" if full else "shallow")
        return {self.spec.outputs[0].name: out}


class DeepCacheUNet(_Schedule):
    """DeepCache over a torch-backend U-Net engine: :class:`DeepUNet` every ``interval``-th call,
    :class:`ShallowUNet` (reusing the cached feature at ``branch``) in between."""

    def __init__(self, engine, interval: int, branch: int = 0):
        _check_interval(interval)
        self.engine = engine
        self.unet = find_unet(engine)
        self.dtype = getattr(engine, "dtype", next(self.unet.parameters()).dtype)
        self.deep = DeepUNet(self.unet, branch, engine.spec.input_names)
        self.shallow = ShallowUNet(self.unet, branch, engine.spec.input_names)
        super().__init__(engine, interval, branch)

    def _args(self, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return engine_inputs(self.spec, inputs, self.device, self.dtype)

    @torch.inference_mode()
    def _full(self, inputs):
        out, feature = self.deep(*self._args(inputs))
        return out.float(), feature

    @torch.inference_mode()
    def _shallow(self, inputs, feature):
        return self.shallow(*self._args(inputs), feature).float()


def wrap_unet(unet_engine, interval: int, branch: int = 0) -> DeepCacheUNet:
    """DeepCache around a torch-backend U-Net engine (see the module docstring). Call ``.reset()``
    on the result at the start of every generation."""
    return DeepCacheUNet(unet_engine, interval, branch)


# -- the exported backends: the two graphs as components --------------------------------------

def component_module(mods: dict[str, torch.nn.Module], name: str, info, lora_rank: int = 0):
    """What an exporter traces for component ``name`` over ``mods`` (load_torch_modules' parts):
    (module, LoRA slot table or None). DeepCache's ``unet_deep`` / ``unet_shallow`` are the cut's
    two modules; every other component is its fixed-I/O wrapper (with LoRA slots of ``lora_rank``)."""
    from .lora_slots import slotted_component

    spec = info.specs[name]
    if spec.cache_branch is None:
        return slotted_component(mods, name, info.family, lora_rank)
    if lora_rank:
        raise InvalidArgument("lora-rank: DeepCache's graphs (--cache-branch) are not built with LoRA slots; drop "
                              "--lora-rank (fuse a set with --lora), or drop --cache-branch")
    cls = DeepUNet if name == CACHE_DEEP else ShallowUNet
    return cls(mods[spec.module], spec.cache_branch, info.specs["unet"].input_names).eval(), None


class ExportedDeepCacheUNet(_Schedule):
    """The schedule over an export's ``unet_deep`` (full calls) and ``unet_shallow`` engines."""

    def __init__(self, engine, deep, shallow, interval: int, branch: int):
        self.engine, self.deep, self.shallow = engine, deep, shallow
        self._noise, self._feature = deep.spec.output_names
        self._feature_in = shallow.spec.inputs[-1].name
        super().__init__(engine, interval, branch)

    def _full(self, inputs):
        out = self.deep(**inputs)
        return out[self._noise], out[self._feature]

    def _shallow(self, inputs, feature):
        return self.shallow(**inputs, **{self._feature_in: feature})[self._noise]


def exported_branch(manifest) -> int | None:
    """The branch an export's DeepCache graphs were cut at; None when it carries none."""
    comps = manifest.components if manifest is not None else {}
    if CACHE_DEEP not in comps or CACHE_SHALLOW not in comps:
        return None
    return comps[CACHE_DEEP].get("cache_branch")


def for_pipeline(pipe, interval: int, branch: int = 0):
    """DeepCache over ``pipe``'s U-Net for one run (a fresh schedule): the torch backend's own
    U-Net, or an export's two graphs (loaded on the first DeepCache run, then kept)."""
    from dataclasses import replace

    from . import backends
    from .model.info import model_arg

    unet = pipe.engines["unet"]
    if pipe.backend == "torch":
        return wrap_unet(unet, interval, branch)
    fmt = backends.get(pipe.backend).format
    if fmt not in CACHE_FORMATS:
        raise InvalidArgument(f"cache_interval: DeepCache runs on the torch backend and on {' and '.join(CACHE_FORMATS)} "
                              f"exports, not on {pipe.backend}; load with --backend torch, or drop --cache-interval")
    root = pipe.engines_dir
    where = f"the engines in {root}" if root is not None else f"this pipeline's {pipe.backend} engines"
    have = exported_branch(pipe.manifest)
    if have is None:
        raise InvalidArgument(f"cache_interval: {where} were exported without DeepCache's two U-Net "
                              f"graphs; export them with `sdfast export --model {model_arg(pipe.info)} --out DIR "
                              f"--format {fmt} --cache-branch {branch}` (plus the profile flags), or drop "
                              "--cache-interval")
    if have != branch:
        raise InvalidArgument(f"cache_branch: {where} carry DeepCache graphs cut at branch {have}, but "
                              f"this run asks for branch {branch}; pass --cache-branch {have}, or export again with "
                              f"--cache-branch {branch}")
    engines = pipe.cache_engines.get(branch)
    if engines is None:
        info = replace(pipe.info, cache_branch=branch)
        info.__dict__["fingerprint"] = pipe.info.fingerprint  # the same folder: not hashed again
        module = backends.get(pipe.backend).load_module()
        engines = pipe.cache_engines[branch] = module.load(info, device=pipe.device, precision=pipe.precision,
                                                           engines=str(root), components=(CACHE_DEEP, CACHE_SHALLOW))
    return ExportedDeepCacheUNet(unet, engines[CACHE_DEEP], engines[CACHE_SHALLOW], interval, branch)
