"""LoRA on the torch backend: tier 2 against diffusers' load_lora_weights + fuse_lora for
every format sdfast reads, SD and SDXL, several LoRAs with scales; exact restore; A → B → A; a set
that does not fit refused in one line with nothing half-applied; the record in the PNG."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lora_files import TEXT_LAYER, make_lora, sd_layers
from PIL import Image
from test_pipeline_parity import assert_parity, run_diffusers

import sdfast
from sdfast.cli import main
from sdfast.errors import InvalidArgument, MissingFile
from sdfast.lora import MAX_SCALE, as_loras, parse_lora_arg, read_lora

#: every format × where its alpha lives (None: no alpha, alpha = rank)
FORMATS = [("kohya", "keys"), ("kohya", None), ("diffusers", None), ("diffusers", "metadata"), ("peft", None),
           ("peft", "metadata")]


@pytest.fixture(scope="module")
def pipe(tiny_info):
    p = sdfast.load(tiny_info.path)  # its own: these tests change its weights
    yield p
    p.set_loras([])


@pytest.fixture(scope="module")
def base_weights(tiny_info):
    """The weights as a fresh load has them (not read off ``pipe``, whose restore is under test)."""
    return {g: m.state_dict() for g, m in sdfast.load(tiny_info.path)._lora_modules().items()}


def lora_file(pipe, tmp_path, fmt="kohya", alpha_in="keys", seed=0, layers=None, **kw) -> Path:
    alpha = None if alpha_in is None else kw.pop("alpha", 2.0)
    return make_lora(tmp_path / f"{fmt}-{alpha_in}-{seed}.safetensors", pipe._lora_modules(), layers or sd_layers(),
                     fmt, seed=seed, alpha=alpha, metadata_alpha=alpha_in == "metadata", **kw)


def fresh_diffusers(tiny_info):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_info.path, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref


def fused_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers' fused module's own weights by their names before PEFT wrapped the layers."""
    return {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}


def assert_same_weights(ours: dict[str, torch.nn.Module], ref_modules: dict[str, torch.nn.Module], atol=1e-6):
    for group, module in ours.items():
        ref = fused_weights(ref_modules[group])
        for k, v in module.state_dict().items():
            assert (v - ref[k]).abs().max().item() <= atol, (group, k)


def assert_bit_equal(pipe, weights):
    for group, module in pipe._lora_modules().items():
        for k, v in module.state_dict().items():
            assert torch.equal(v, weights[group][k]), (group, k)


@pytest.mark.parametrize("fmt,alpha_in", FORMATS)
def test_each_format_matches_diffusers_fuse_lora(pipe, tiny_info, tmp_path, fmt, alpha_in):
    """Weights, latents and pixels equal diffusers' load_lora_weights + fuse_lora(lora_scale=0.7)."""
    path = lora_file(pipe, tmp_path, fmt, alpha_in)
    ref = fresh_diffusers(tiny_info)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.7)
    pipe.set_loras([(path, 0.7)])
    assert_same_weights(pipe._lora_modules(), {"unet": ref.unet, "text_encoder": ref.text_encoder})
    out = pipe.generate("a red cube", steps=4, seed=3, scheduler="euler")
    lat, img = run_diffusers(ref, tiny_info, "euler", prompt="a red cube", num_inference_steps=4, seed=3)
    assert_parity(out, lat, img)
    assert out.loras == [{"name": path.stem, "sha256": read_lora(path).sha256, "scale": 0.7,
                          "format": fmt}]


def test_the_lora_changes_the_image_and_its_scale_counts(pipe, tmp_path):
    """A no-op fuse (or a scale that is ignored) would pass parity against itself; not this."""
    path = lora_file(pipe, tmp_path)
    pipe.set_loras([])
    base = pipe.generate("a red cube", steps=3, seed=1).latents
    pipe.set_loras([(path, 1.0)])
    full = pipe.generate("a red cube", steps=3, seed=1).latents
    pipe.set_loras([(path, 0.5)])
    half = pipe.generate("a red cube", steps=3, seed=1).latents
    pipe.set_loras([(path, 0.0)])
    zero = pipe.generate("a red cube", steps=3, seed=1).latents
    assert (full - base).abs().max() > 1e-2 and (half - base).abs().max() > 1e-3
    assert (full - half).abs().max() > 1e-3
    torch.testing.assert_close(zero, base, rtol=0, atol=1e-6)


def test_two_loras_with_scales_match_diffusers_adapters(pipe, tiny_info, tmp_path):
    a = lora_file(pipe, tmp_path, "kohya", "keys", seed=1)
    b = lora_file(pipe, tmp_path, "peft", "metadata", seed=2, alpha=8.0)  # overlapping layers, alpha 8 / rank 4
    ref = fresh_diffusers(tiny_info)
    ref.load_lora_weights(str(a), adapter_name="a")
    ref.load_lora_weights(str(b), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    ref.fuse_lora(adapter_names=["a", "b"])
    pipe.set_loras([(a, 0.7), (b, -0.4)])
    assert [lo.scale for lo in pipe.loras] == [0.7, -0.4]
    assert_same_weights(pipe._lora_modules(), {"unet": ref.unet, "text_encoder": ref.text_encoder}, atol=1e-5)
    out = pipe.generate("a blue ball", steps=4, seed=5, scheduler="euler")
    lat, img = run_diffusers(ref, tiny_info, "euler", prompt="a blue ball", num_inference_steps=4, seed=5)
    assert_parity(out, lat, img)


def test_an_empty_set_restores_the_base_bit_for_bit(pipe, base_weights, tmp_path):
    pipe.set_loras([])
    before = pipe.generate("a cat", steps=3, seed=2).latents
    pipe.set_loras([(lora_file(pipe, tmp_path, seed=3), 1.3), (lora_file(pipe, tmp_path, "peft", None, seed=4), 0.6)])
    pipe.set_loras([])
    assert pipe.loras == ()
    assert_bit_equal(pipe, base_weights)
    assert torch.equal(pipe.generate("a cat", steps=3, seed=2).latents, before)


def test_a_then_b_then_a_equals_a_fresh_load_of_a(pipe, tiny_info, tmp_path):
    a, b = lora_file(pipe, tmp_path, seed=5), lora_file(pipe, tmp_path, "diffusers", None, seed=6)
    fresh = sdfast.load(tiny_info.path, loras=[(a, 0.8)])
    want = {g: m.state_dict() for g, m in fresh._lora_modules().items()}
    ref = fresh.generate("a dog", steps=3, seed=4).latents
    pipe.set_loras([(a, 0.8)])
    pipe.set_loras([(b, 1.0)])
    pipe.set_loras([(a, 0.8)])
    assert_bit_equal(pipe, want)
    got = pipe.generate("a dog", steps=3, seed=4).latents
    assert (got - ref).abs().max().item() <= 1e-5


def test_a_set_that_does_not_fit_changes_nothing(pipe, tmp_path):
    """The second file is for a wider model: refused naming it and its layer, and the weights and
    the active set stay those of the set before."""
    good = lora_file(pipe, tmp_path, seed=7)
    pipe.set_loras([(good, 0.5)])
    before = {g: {k: v.clone() for k, v in m.state_dict().items()} for g, m in pipe._lora_modules().items()}
    wide = tmp_path / "wide.safetensors"
    _write(wide, {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
                  torch.zeros(4, 320), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
                  ".lora_up.weight": torch.zeros(320, 4)})
    with pytest.raises(InvalidArgument, match=r"wide\.safetensors.*attn1\.to_q.*does not fit the model's weight"):
        pipe.set_loras([(lora_file(pipe, tmp_path, seed=8), 1.0), (wide, 1.0)])
    assert [lo.file.path for lo in pipe.loras] == [good]
    assert_bit_equal(pipe, before)


def _write(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _pair(stem: str, out=32, inn=32, r=4, down=".lora_down.weight", up=".lora_up.weight"):
    return {stem + down: torch.randn(r, inn), stem + up: torch.randn(out, r)}


BAD_FILES = {
    # what the file holds -> what the one-line refusal must say
    "sdxl-on-sd": ({**_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1", 37, 32)}, r"is for SDXL .*text_encoder_2"),
    "missing-module": (_pair("lora_unet_down_blocks_7_attentions_0_proj_in"), r"1 of 1 layers name modules .* lacks"),
    "ldm-names": (_pair("lora_unet_input_blocks_9_1_proj_in"), r"original LDM U-Net.s names: this model.s blocks"),
    "unpaired": ({f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.randn(4, 32)},
                 r"has a down weight and no up weight"),
    "loha": ({f"lora_unet_{Q.replace('.', '_')}.hada_w1_a": torch.randn(4, 32)}, r"LoHa adapter"),
    "dora": ({**_pair(f"unet.{Q}", down=".lora_A.weight", up=".lora_B.weight"),
              f"unet.{Q}.lora_magnitude_vector": torch.randn(32)}, r"DoRA adapter"),
    "zero-alpha": ({**_pair(f"lora_unet_{Q.replace('.', '_')}"), f"lora_unet_{Q.replace('.', '_')}.alpha":
                    torch.tensor(0.0)}, r"alpha is positive"),
    "nan-alpha": ({**_pair(f"lora_unet_{Q.replace('.', '_')}"), f"lora_unet_{Q.replace('.', '_')}.alpha":
                   torch.tensor(float("nan"))}, r"one finite number"),
    "stray-alpha": ({**_pair(f"lora_unet_{Q.replace('.', '_')}"), "lora_unet_conv_in.alpha": torch.tensor(1.0)},
                    r"alpha for 'conv_in' has no LoRA weights"),
    "unknown-prefix": (_pair(f"vae.{Q}", down=".lora_A.weight", up=".lora_B.weight"), r"names no part sdfast knows"),
    "not-a-weight": ({**_pair(f"lora_unet_{Q.replace('.', '_')}"), "lora_unet_x.scale": torch.ones(1)},
                     r"is not a LoRA weight"),
    "processor-format": (_pair(f"unet.{Q[:-5]}.processor.to_q_lora", down=".down.weight", up=".up.weight"),
                         r"attention-processor format"),
    "1-d": ({f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.randn(4),
             f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.randn(32, 4)}, r"2-D \(linear\) or 4-D"),
    "rank-mismatch": ({f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.randn(4, 32),
                       f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.randn(32, 3)}, r"does not fit"),
    "transposed": ({f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": torch.randn(32, 4),
                    f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": torch.randn(4, 32)}, r"does not fit"),
    "empty": ({}, r"holds no tensors"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_files_that_are_not_a_fitting_lora_are_refused_in_one_line(pipe, base_weights, tmp_path, case):
    tensors, message = BAD_FILES[case]
    path = _write(tmp_path / f"{case}.safetensors", tensors)
    pipe.set_loras([])
    with pytest.raises(InvalidArgument, match=message) as e:
        pipe.set_loras([path])
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    assert pipe.loras == ()
    assert_bit_equal(pipe, base_weights)


def test_the_nearest_good_file_to_each_bad_one_is_taken(pipe, tmp_path):
    """Near misses of the checks above: a 1x1 conv's LoRA as a 2-D pair, alpha as a (1,) tensor,
    lora_te1_ for the one text encoder, a tiny positive alpha."""
    conv = "down_blocks.0.attentions.0.proj_in"
    ok = {**_pair(f"lora_unet_{conv.replace('.', '_')}"),
          **_pair(f"lora_unet_{Q.replace('.', '_')}"), f"lora_unet_{Q.replace('.', '_')}.alpha": torch.tensor([1e-3]),
          **_pair("lora_te1_text_model_encoder_layers_0_mlp_fc1", 37, 32)}
    path = _write(tmp_path / "ok.safetensors", ok)
    pipe.set_loras([path])
    assert len(pipe.loras[0].file.layers) == 3
    pipe.set_loras([])


def test_unsafe_or_missing_files_are_refused_before_reading(pipe, tmp_path):
    ckpt = tmp_path / "style.ckpt"
    ckpt.write_bytes(b"not opened")
    with pytest.raises(InvalidArgument, match=r"style\.ckpt is not a \.safetensors file.*can run code"):
        pipe.set_loras([ckpt])
    with pytest.raises(MissingFile, match="does not exist"):
        pipe.set_loras([tmp_path / "none.safetensors"])
    with pytest.raises(MissingFile, match="is not a file"):
        pipe.set_loras([tmp_path])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InvalidArgument, match=r"junk\.safetensors is not a readable safetensors file"):
        pipe.set_loras([junk])
    bad_meta = _write(tmp_path / "meta.safetensors", _pair(f"unet.{Q}", down=".lora_A.weight", up=".lora_B.weight"),
                      {"lora_adapter_metadata": "{oops"})
    with pytest.raises(InvalidArgument, match="lora_adapter_metadata is not JSON"):
        pipe.set_loras([bad_meta])
    dora_meta = _write(tmp_path / "dmeta.safetensors", _pair(f"unet.{Q}", down=".lora_A.weight", up=".lora_B.weight"),
                       {"lora_adapter_metadata": json.dumps({"unet.use_dora": True, "unet.lora_alpha": 4})})
    with pytest.raises(InvalidArgument, match="DoRA"):
        pipe.set_loras([dora_meta])
    assert pipe.loras == ()


def test_metadata_alpha_and_alpha_pattern_are_read(pipe, tmp_path):
    meta = {"unet.lora_alpha": 8, "unet.r": 4, "unet.alpha_pattern": {"attn1.to_q": 2}}
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    path = _write(tmp_path / "m.safetensors", {**_pair(f"unet.{Q}", down=".lora_A.weight", up=".lora_B.weight"),
                                               **_pair(f"unet.{k}", 32, 64, down=".lora_A.weight",
                                                       up=".lora_B.weight")},
                  {"lora_adapter_metadata": json.dumps(meta)})
    alphas = {layer.module: layer.alpha for layer in read_lora(path).layers}
    assert alphas == {Q: 2.0, k: 8.0}


@pytest.mark.parametrize("scale,ok", [(MAX_SCALE, True), (-MAX_SCALE, True), (0.0, True), (MAX_SCALE + 0.01, False),
                                      (-MAX_SCALE - 0.01, False), (float("nan"), False), (float("inf"), False),
                                      (True, False), ("0.5", False), (np.float32(0.5), True)])
def test_scale_bounds(pipe, tmp_path, scale, ok):
    path = lora_file(pipe, tmp_path, seed=9)
    if ok:
        assert as_loras([(path, scale)])[0].scale == float(scale)
    else:
        with pytest.raises(InvalidArgument, match="a LoRA scale must be a finite number from -10 to 10"):
            as_loras([(path, scale)])


def test_loras_argument_shapes(pipe, tmp_path):
    a, b = lora_file(pipe, tmp_path, seed=10), lora_file(pipe, tmp_path, seed=11)
    assert [lo.scale for lo in as_loras(a)] == [1.0]
    assert [lo.scale for lo in as_loras((a, 0.3))] == [0.3]
    assert [lo.file.path for lo in as_loras((a, b))] == [a, b]  # two paths, not a path and a scale
    assert as_loras(None) == [] and as_loras([]) == []
    with pytest.raises(InvalidArgument, match="given twice"):
        as_loras([a, (a, 0.5)])
    with pytest.raises(InvalidArgument, match="neither a LoRA file nor"):
        as_loras([3])
    with pytest.raises(InvalidArgument, match="expected a list"):
        as_loras(3)


@pytest.mark.parametrize("text,want", [("a.safetensors:0.7", ("a.safetensors", 0.7)),
                                       ("a.safetensors", ("a.safetensors", 1.0)),
                                       ("C:/loras/a.safetensors", ("C:/loras/a.safetensors", 1.0)),
                                       ("dir:x/a.safetensors:-0.5", ("dir:x/a.safetensors", -0.5)),
                                       (":0.5", (":0.5", 1.0))])
def test_lora_argument_parsing(text, want):
    assert parse_lora_arg(text) == want


def test_lora_argument_scale_out_of_range_is_refused():
    with pytest.raises(InvalidArgument, match="--lora: a LoRA scale"):
        parse_lora_arg("a.safetensors:70")


def test_other_backends_refuse_a_swap_in_one_line(tiny_info, onnx_dynamic, tmp_path):
    pipe = sdfast.load(tiny_info.path)
    path = lora_file(pipe, tmp_path)
    ort = sdfast.load(tiny_info.path, backend="onnxruntime", engines_dir=onnx_dynamic)
    with pytest.raises(InvalidArgument, match="runs onnxruntime engines exported without LoRA slots.*--lora-rank 64.*sdfast export --lora FILE"):
        ort.set_loras([path])
    assert ort.loras == ()


def test_the_png_records_the_loras_and_the_base_records_none(pipe, tmp_path):
    path = lora_file(pipe, tmp_path, seed=12)
    pipe.set_loras([])
    assert "loras" not in pipe.generate("a", steps=2).metadata()
    pipe.set_loras([(path, 0.25)])
    out = pipe.generate("a", steps=2)
    (png,) = out.save(tmp_path / "o.png")
    info = Image.open(png).info
    assert json.loads(info["sdfast"])["loras"] == json.loads(info["loras"]) == [{"name": path.stem, "sha256": read_lora(path).sha256, "scale": 0.25, "format": "kohya"}]
    pipe.set_loras([])


def test_cli_lora_flag(tiny_info, tmp_path, capsys):
    pipe = sdfast.load(tiny_info.path)
    a, b = lora_file(pipe, tmp_path, seed=13), lora_file(pipe, tmp_path, "peft", None, seed=14)
    out = tmp_path / "o.png"
    assert main(["generate", "a", "cat", "--model", str(tiny_info.path), "--steps", "2", "--dtype", "fp32",
                 "--out", str(out), "--lora", f"{a}:0.5", "--lora", str(b)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2:] == [f"lora: {a.stem} at scale 0.5 (kohya, sha256 {read_lora(a).sha256[:12]})",
                          f"lora: {b.stem} at scale 1 (peft, sha256 {read_lora(b).sha256[:12]})"]
    assert out.is_file()
    # the CLI's image is the library's with the same set
    ref = sdfast.load(tiny_info.path, loras=[(a, 0.5), b]).generate("a cat", steps=2)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(ref.images[0]))


@pytest.mark.parametrize("extra,message", [
    (["--lora", "{tmp}/none.safetensors"], "does not exist"),
    (["--lora", "{tmp}/x.safetensors:11"], "--lora: a LoRA scale must be"),
    (["--lora", "{tmp}/x.safetensors"], "does not exist"),
])
def test_cli_lora_refusals_are_one_line_and_write_nothing(tiny_info, tmp_path, capsys, extra, message):
    out = tmp_path / "o.png"
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    assert main(["generate", "a", "--model", str(tiny_info.path), "--steps", "2", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


# -- SDXL: two text encoders, kohya's te1/te2 and diffusers' text_encoder_2 ---------------------

@pytest.fixture(scope="module")
def sdxl_pair(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from sdfast.model.info import TOKENIZER_DIR
    from sdfast.model.random_models import build_tiny_sdxl

    folder = build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-lora") / "tiny-sdxl", TOKENIZER_DIR)
    ref = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return folder, ref


@contextlib.contextmanager
def fused_sdxl_reference(ref_base, path: Path, scale: float):
    """diffusers' SDXL pipeline (the module's shared components) with ``path`` fused at ``scale``;
    unfused and unloaded after, so the next test starts from the base weights."""
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline(**ref_base.components)
    ref.unload_lora_weights()
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=scale)
    try:
        yield ref
    finally:
        ref.unfuse_lora()
        ref.unload_lora_weights()


SDXL_LAYERS = [("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v"),
               ("unet", "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj"),
               ("unet", "up_blocks.0.resnets.0.conv1")] + \
    [(g, f"text_model.encoder.layers.0.{m}") for g in ("text_encoder", "text_encoder_2") for m in TEXT_LAYER]


@pytest.mark.parametrize("fmt,alpha_in", [("kohya", "keys"), ("diffusers", None), ("peft", "metadata")])
def test_sdxl_lora_matches_diffusers(sdxl_pair, tmp_path, fmt, alpha_in):
    from test_sdxl import run_ref

    folder, ref_base = sdxl_pair
    pipe = sdfast.load(folder)
    path = make_lora(tmp_path / f"xl-{fmt}.safetensors", pipe._lora_modules(), SDXL_LAYERS, fmt, seed=21,
                     alpha=None if alpha_in is None else 2.0, metadata_alpha=alpha_in == "metadata")
    with fused_sdxl_reference(ref_base, path, 0.8) as ref:
        pipe.set_loras([(path, 0.8)])
        assert_same_weights(pipe._lora_modules(), {"unet": ref.unet, "text_encoder": ref.text_encoder,
                                                   "text_encoder_2": ref.text_encoder_2})
        out = pipe.generate("a red cube", steps=3, seed=2, scheduler="euler", guidance_scale=6.0)
        lat, img = run_ref(ref, pipe.info.scheduler_config, "euler", 2, prompt="a red cube", num_inference_steps=3,
                           guidance_scale=6.0)
        assert_parity(out, lat, img)


def test_an_sd_lora_on_sdxl_names_what_differs(sdxl_pair, tmp_path, tiny_info):
    folder, _ = sdxl_pair
    pipe = sdfast.load(folder)
    sd_pipe = sdfast.load(tiny_info.path)
    path = make_lora(tmp_path / "sd.safetensors", sd_pipe._lora_modules(), sd_layers(conv=False), "kohya")
    with pytest.raises(InvalidArgument, match=r"sd\.safetensors.*(lacks|does not fit)"):
        pipe.set_loras([path])
    assert pipe.loras == ()


class _PushTarget:
    """An exported engine's side of a weight swap: it holds ``names`` and records what it is sent."""

    def __init__(self, names):
        self.names, self.sent = set(names), []

    def weight_names(self):
        return {n: f"unet.{n}" for n in self.names}

    def load_weights(self, weights):
        self.sent.append({n: w.clone() for n, w in weights.items()})


def test_engines_that_swap_get_every_changed_weight_and_the_restore(tiny_info, tmp_path):
    """What a package (inductor) is sent: the fused weights of every layer the set touches, then
    on [] those layers' base weights; an engine lacking one of them refuses before any change."""
    from sdfast.lora import FusedLoras
    from sdfast.model.info import load_torch_modules

    mods = load_torch_modules(tiny_info, parts=("unet",))
    layers = [("unet", n) for n in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                    "down_blocks.0.resnets.0.conv1")]
    path = make_lora(tmp_path / "u.safetensors", mods, layers, "kohya", seed=61)
    names = [f"{n}.weight" for _, n in layers]
    base = {n: mods["unet"].get_parameter(n).detach().clone() for n in names}
    engine = _PushTarget(dict(mods["unet"].named_parameters()))
    fused = FusedLoras(mods, "sd", engines={"unet": engine})
    fused.set(as_loras([(path, 0.5)]))
    (sent,) = engine.sent
    assert sorted(sent) == sorted(names)
    for n in names:
        assert torch.equal(sent[n], mods["unet"].get_parameter(n)) and not torch.equal(sent[n], base[n])
    fused.set([])
    assert sorted(engine.sent[1]) == sorted(names)
    assert all(torch.equal(engine.sent[1][n], base[n]) for n in names)

    lacking = _PushTarget(set(dict(mods["unet"].named_parameters())) - {names[1]})
    other = FusedLoras(mods, "sd", engines={"unet": lacking})
    with pytest.raises(InvalidArgument, match=r"holds no weight 'down_blocks\.0\.resnets\.0\.conv1\.weight'"):
        other.set(as_loras([(path, 0.5)]))
    assert lacking.sent == [] and all(torch.equal(mods["unet"].get_parameter(n), base[n]) for n in names)


# -- kohya files with the original LDM U-Net's names -------------------------------------------
#: tiny-random's layers (1 resnet per block; down block 0 with attention and a downsampler, up
#: block 1 with attentions) under the LDM names, written out by hand from its layout
TINY_LDM = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0":
        "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks.2.1.transformer_blocks.0.ff.net.2",
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
}


def as_ldm(src: Path, dest: Path, names: dict[str, str] = TINY_LDM) -> Path:
    """The kohya file ``src`` with its U-Net keys renamed to the LDM names (``names``: diffusers
    name -> LDM name)."""
    from safetensors.torch import load_file, save_file

    renames = {"lora_unet_" + d.replace(".", "_"): "lora_unet_" + ldm.replace(".", "_") for d, ldm in names.items()}
    out = {}
    for key, t in load_file(str(src)).items():
        stem, dot, rest = key.partition(".")
        out[renames.get(stem, stem) + dot + rest] = t
    assert any("input_blocks" in k for k in out)
    save_file(out, str(dest))
    return dest


def test_an_ldm_named_lora_changes_exactly_what_its_diffusers_named_twin_does(pipe, tmp_path):
    src = lora_file(pipe, tmp_path)  # with a resnet conv, whose LDM inner name differs (in_layers.2)
    pipe.set_loras([(src, 1.0)])
    want = {g: {k: v.clone() for k, v in m.state_dict().items()} for g, m in pipe._lora_modules().items()}
    pipe.set_loras([(as_ldm(src, tmp_path / "ldm.safetensors"), 1.0)])
    assert_bit_equal(pipe, want)
    pipe.set_loras([])


def _unet_names(config: dict) -> list[str]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("model, facts", [
    ("random-sd15", {"input_blocks.0.0": "conv_in", "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
                     "input_blocks.4.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
                     "input_blocks.8.1.proj_out": "down_blocks.2.attentions.1.proj_out",
                     "input_blocks.11.0.out_layers.3": "down_blocks.3.resnets.1.conv2",
                     "middle_block.1.transformer_blocks.0.attn2.to_v":
                         "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
                     "middle_block.2.emb_layers.1": "mid_block.resnets.1.time_emb_proj",
                     "output_blocks.2.1.conv": "up_blocks.0.upsamplers.0.conv",
                     "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
                     "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj":
                         "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
                     "time_embed.2": "time_embedding.linear_2", "out.2": "conv_out"}),
    ("random-sdxl", {"input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
                     "input_blocks.4.1.transformer_blocks.1.attn1.to_q":
                         "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q",
                     "input_blocks.8.1.transformer_blocks.9.ff.net.2":
                         "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
                     "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
                     "output_blocks.8.0.skip_connection": "up_blocks.2.resnets.2.conv_shortcut",
                     "label_emb.0.0": "add_embedding.linear_1"}),
])
def test_ldm_names_follow_the_original_unet_layout(model, facts):
    from sdfast.lora_ldm import ldm_names
    from sdfast.model.info import resolve_model

    names = _unet_names(resolve_model(model).unet_config)
    got = ldm_names(names)
    assert {k: got.get(k) for k in facts} == facts
    assert sorted(got.values()) == sorted(names)  # every layer has exactly one LDM name


def test_ldm_named_sdxl_kohya_loras_match_diffusers(sdxl_pair, tmp_path):
    """diffusers maps SDXL's LDM (sgm) block names itself: the same weights change (attention
    layers; diffusers keeps resnet inner names as they are, so none here)."""
    from safetensors.torch import load_file

    from sdfast.lora_ldm import ldm_names

    folder, ref_base = sdxl_pair
    pipe = sdfast.load(folder)
    layers = [(g, n) for g, n in SDXL_LAYERS if "resnets" not in n] + \
        [("unet", "up_blocks.0.attentions.2.proj_out"), ("unet", "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_k")]
    src = make_lora(tmp_path / "xl.safetensors", pipe._lora_modules(), layers, "kohya", seed=22)
    names = [n for n, m in pipe._lora_modules()["unet"].named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    path = as_ldm(src, tmp_path / "xl-ldm.safetensors", {d: ldm for ldm, d in ldm_names(names).items()})
    assert sum("input_blocks" in k or "output_blocks" in k for k in load_file(str(path))) >= 6
    with fused_sdxl_reference(ref_base, path, 0.8) as ref:
        pipe.set_loras([(path, 0.8)])
        assert_same_weights(pipe._lora_modules(), {"unet": ref.unet, "text_encoder": ref.text_encoder,
                                                   "text_encoder_2": ref.text_encoder_2})
