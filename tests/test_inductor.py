"""AOTInductor export and engines.

Fast tests: the compile options and dynamic dims derived from the specs, and that loading the
backend needs no diffusers. Slow tests (``-m slow``; compiling the tiny model on a 2-core CPU
takes minutes): tier-1 parity of the compiled components against eager, and a full run.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from sdfast.export.inductor import dynamic_shapes, inductor_configs
from sdfast.model.components import SPECS, Precision, ShapeProfile, sample_inputs

TIER1_ATOL = {"text_encoder": 1e-3, "unet": 1e-4, "vae_decoder": 3e-4, "vae_encoder": 3e-4}


def test_cuda_compile_options_are_per_call_not_global():
    import torch._inductor.config as config

    before = (config.max_autotune, config.coordinate_descent_tuning, config.conv_1x1_as_mm)
    cfg = inductor_configs(torch.device("cuda"), "max")
    assert cfg["max_autotune"] and cfg["coordinate_descent_tuning"] and cfg["conv_1x1_as_mm"]
    assert cfg["triton.cudagraphs"] is False  # the runtime captures the whole step itself
    assert inductor_configs(torch.device("cpu"), "max") == {"triton.cudagraphs": False}
    assert (config.max_autotune, config.coordinate_descent_tuning, config.conv_1x1_as_mm) == before


def test_dynamic_dims_come_from_the_profile_and_keep_sides_on_the_unet_grid(tiny_info):
    profile = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128)
    dims = dynamic_shapes(SPECS["unet"], tiny_info, profile)
    assert set(dims["sample"]) == {0, 2, 3} and dims["timestep"] == {}
    assert dims["sample"][0] is dims["encoder_hidden_states"][0]  # one batch dim, shared
    assert "2*" in str(dims["sample"][2]) or "2 *" in str(dims["sample"][2])  # h = 2·k for the tiny U-Net
    # A static profile still serves the U-Net guided (batch 2) and unguided (batch 1): only B varies.
    static = dynamic_shapes(SPECS["unet"], tiny_info, ShapeProfile.static(1, 64, 64))
    assert set(static["sample"]) == {0} and static["timestep"] == {}
    assert dynamic_shapes(SPECS["vae_decoder"], tiny_info, ShapeProfile.static(1, 64, 64)) == {"latent": {}}


def test_loading_the_inductor_backend_imports_no_diffusers():
    code = "import sys, sdfast.engines.inductor, sdfast.runtime; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def aoti_dir(tiny_info, tmp_path_factory):
    from sdfast.export.inductor import export_inductor

    out = tmp_path_factory.mktemp("aoti") / "tiny"
    t0 = time.perf_counter()
    export_inductor(tiny_info, out, ShapeProfile.static(1, 64, 64))
    print(f"AOTInductor export of the tiny model (4 components, CPU): {time.perf_counter() - t0:.0f} s")
    return out


@pytest.mark.slow
def test_aoti_components_match_eager_within_tier1(tiny_info, aoti_dir):
    from sdfast.engines import load_engines

    cpu = torch.device("cpu")
    eager = load_engines(tiny_info, "torch", cpu, Precision.FP32)
    compiled = load_engines(tiny_info, "inductor", cpu, Precision.FP32, str(aoti_dir))
    profile = ShapeProfile.static(1, 64, 64)
    for name, spec in SPECS.items():
        inputs = sample_inputs(spec, tiny_info, profile, which=1)
        want, got = eager[name](**inputs), compiled[name](**inputs)
        for k in want:
            err = (want[k] - got[k]).abs().max().item()
            print(f"{name}.{k}: max abs diff {err:.3g} (tier 1: {TIER1_ATOL[name]:g})")
            assert err <= TIER1_ATOL[name]


@pytest.mark.slow
def test_inductor_pipeline_with_graph_logic_matches_eager(tiny_info, aoti_dir):
    import sdfast

    kw = dict(steps=3, guidance_scale=7.5, seed=0, scheduler="euler_a")
    ref = sdfast.load(tiny_info.path).generate("a red circle", **kw)
    out = sdfast.load(tiny_info.path, backend="inductor", engines=aoti_dir, cuda_graphs=True).generate(
        "a red circle", **kw)
    err = (out.latents - ref.latents).abs().max().item()
    print(f"inductor + graph logic vs eager: latents max abs diff {err:.3g}")
    assert err <= 1e-4 * ref.latents.abs().max().item()


@pytest.mark.slow
def test_inductor_inpaints_and_streams_like_eager(tiny_info, aoti_dir):
    """Inpainting (latent blending) and streamed partial images on compiled engines: the same
    latents as eager within tier 1, and the partial images at the same steps."""
    from PIL import Image

    import sdfast

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    kw = dict(steps=4, guidance_scale=7.5, seed=3, scheduler="euler", image=image, mask=mask)
    eager = sdfast.load(tiny_info.path)
    compiled = sdfast.load(tiny_info.path, backend="inductor", engines=aoti_dir, cuda_graphs=True)
    got_e, got_c = [], []
    ref = eager.generate("a blue square", partial_images=2, on_partial=got_e.append, **kw)
    out = compiled.generate("a blue square", partial_images=2, on_partial=got_c.append, **kw)
    assert (out.latents - ref.latents).abs().max().item() <= 1e-4 * ref.latents.abs().max().item()
    assert [p.step for p in got_c] == [p.step for p in got_e] and len(got_c) == 2


@pytest.mark.slow
def test_dynamic_profile_unet_serves_several_shapes(tiny_info, tmp_path):
    from sdfast.engines import load_engines
    from sdfast.engines.inductor import InductorEngine
    from sdfast.export.inductor import export_inductor
    from sdfast.model.components import size_multiple

    profile = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 128)  # batch 1..2 images, sides 64..128
    export_inductor(tiny_info, tmp_path / "dyn", profile, components=("unet",))
    runner = torch._inductor.aoti_load_package(str(tmp_path / "dyn" / "unet.pt2"))
    compiled = InductorEngine(SPECS["unet"], runner, torch.device("cpu"), Precision.FP32, profile,
                              size_multiple(tiny_info))
    eager = load_engines(tiny_info, "torch", torch.device("cpu"), Precision.FP32)["unet"]
    g = torch.Generator().manual_seed(0)
    for b, h, w in ((1, 8, 8), (4, 16, 12), (2, 12, 16)):  # U-Net batch up to 2 × 2 under guidance
        inputs = dict(sample=torch.randn(b, 4, h, w, generator=g), timestep=torch.tensor([500.0]),
                      encoder_hidden_states=torch.randn(b, tiny_info.max_tokens, tiny_info.text_hidden_size,
                                                        generator=g))
        err = (eager(**inputs)["noise_pred"] - compiled(**inputs)["noise_pred"]).abs().max().item()
        print(f"unet at {(b, h, w)}: max abs diff {err:.3g}")
        assert err <= TIER1_ATOL["unet"]


def _torch_package_logger():
    import logging

    return logging.getLogger("torch._inductor.package.package")


def test_a_package_torch_cannot_open_shows_no_torch_lines_and_one_that_opens_keeps_them():
    # torch's loader logs "Loading outdated pt2 file" and then fails on a package another torch
    # built (its .so links symbols this libtorch lacks): sdfast's one-line refusal is all there is.
    import logging
    import warnings

    from sdfast.engines.inductor import _quietly

    shown: list[str] = []  # what reaches the handlers above torch's logger (torch's own: stderr in the CLI)
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    logger, parent = _torch_package_logger(), logging.getLogger("torch._inductor.package")
    parent.addHandler(handler)

    def loading(ok: bool):
        logger.warning("Loading outdated pt2 file. Please regenerate your package.")
        warnings.warn("a warning torch raised while loading", UserWarning, stacklevel=1)
        if not ok:
            raise RuntimeError("Error in dlopen: wrapper.so: undefined symbol: aoti_torch_clone")
        return "runner"

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError, match="undefined symbol"):
                _quietly(lambda: loading(False))
        assert shown == [] and caught == []
        with pytest.warns(UserWarning, match="a warning torch raised"):
            assert _quietly(lambda: loading(True)) == "runner"
        assert shown == ["Loading outdated pt2 file. Please regenerate your package."]  # it loaded: shown
    finally:
        parent.removeHandler(handler)
    assert logger.propagate and all(type(h).__name__ != "_Held" for h in logger.handlers)


@pytest.mark.slow
def test_a_package_of_another_libtorch_is_refused_in_one_line_and_nothing_else(tiny_info, aoti_dir, tmp_path,
                                                                               capfd):
    # The manifest's torch pin says this torch (edited, or copied from another export), but the
    # package's compiled .so wants another libtorch's symbols: what torch prints on the way is dropped.
    import json
    import shutil
    import zipfile

    from sdfast.artifacts import file_record
    from sdfast.cli import main

    eng = tmp_path / "eng"
    shutil.copytree(aoti_dir, eng)
    src, tmp = eng / "text_encoder.pt2", eng / "x.pt2"
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zo:
        for item in zi.infolist():
            data = zi.read(item.filename)
            zo.writestr(item, data.replace(b"aoti_torch_", b"aoti_torcX_") if item.filename.endswith(".so") else data)
    tmp.replace(src)
    m = json.loads((eng / "manifest.json").read_text())
    m["files"]["text_encoder.pt2"] = file_record(src)  # resealed: the hash check passes
    (eng / "manifest.json").write_text(json.dumps(m))
    capfd.readouterr()
    assert main(["generate", "x", "--model", str(tiny_info.path), "--backend", "inductor", "--engines", str(eng),
                 "--steps", "1", "--out", str(tmp_path / "o.png")]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sdfast generate: error: engines: torch cannot open"), err
    assert "text_encoder.pt2" in err and "Loading outdated" not in err and not (tmp_path / "o.png").exists()
