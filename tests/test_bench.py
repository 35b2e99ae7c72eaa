"""`sdfast bench`, FLOP counting and the random-architecture models.

The bench tests prove plumbing and arithmetic (a full run writes a valid report with a diffusers row,
speedups and percentiles are computed from the runs), not speed.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from sdfast.backends import get as get_backend
from sdfast.cli import main
from sdfast.errors import InvalidArgument
from sdfast.measure import bench
from sdfast.measure import fewstep as fewstep_bench

STAGES = {"text_encoder", "unet_step", "scheduler_step", "vae_decode", "total"}


def run_cli(*argv: str) -> int:
    return main(["bench", *argv])


def check_row(row: dict, repeat: int) -> None:
    assert set(row["stages_ms"]) == STAGES and set(row["stages_ms_p90"]) == STAGES
    assert all(row["stages_ms"][k] > 0 for k in STAGES)
    assert row["latency_ms"]["runs"] == repeat
    # Both are the p50 of the same per-run totals: a row that mixed in warm-up runs or another
    # statistic for one of them would differ.
    assert row["stages_ms"]["total"] == row["latency_ms"]["p50"]
    assert row["images_per_s"] == pytest.approx(row["batch"] / (row["stages_ms"]["total"] / 1e3))
    assert row["peak_mem_mb"] > 0
    assert row["tflops"]["total"] > 0 and row["gflop"]["unet_step"] > 0


def test_bench_torch_writes_report_with_diffusers_row(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = run_cli("--model", "tiny-random", "--backends", "torch", "--steps", "2", "--height", "64",
                 "--width", "64", "--repeat", "2", "--warmup", "1", "--json", str(out))
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report) == {"machine", "config", "results"}
    by_backend = {r["backend"]: r for r in report["results"]}
    assert set(by_backend) == {"diffusers", "torch"}
    for row in by_backend.values():
        check_row(row, repeat=2)
        assert row["batch"] == 1 and row["dtype"] == "fp32" and row["random_weights"] is False
    # Speedup is diffusers' total over ours, from the two rows' own p50 totals.
    ours, ref = by_backend["torch"]["stages_ms"]["total"], by_backend["diffusers"]["stages_ms"]["total"]
    assert by_backend["torch"]["speedup_vs_diffusers"] == pytest.approx(ref / ours)
    assert report["machine"]["versions"]["torch"]
    table = capsys.readouterr().out
    assert "diffusers" in table and "torch" in table and "unet/step" in table


def test_bench_onnxruntime_row_or_clear_skip(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench.json"
    rc = run_cli("--model", "tiny-random", "--backends", "onnxruntime", "--steps", "2", "--height", "64",
                 "--width", "64", "--repeat", "1", "--warmup", "1", "--json", str(out))
    assert rc == 0
    report = json.loads(out.read_text())
    missing = get_backend("onnxruntime").missing()
    backends = [r["backend"] for r in report["results"]]
    if missing:
        assert backends == ["diffusers"]
        [skip] = report["config"]["skipped"]
        assert skip["backend"] == "onnxruntime" and "export" in skip["reason"]
        assert "skipped onnxruntime" in capsys.readouterr().out
        pytest.skip(f"onnxruntime row skipped as designed: {missing}")
    assert backends == ["diffusers", "onnxruntime"], report["config"]["skipped"]
    diffusers, ort = report["results"]
    check_row(ort, repeat=1)
    assert ort["speedup_vs_diffusers"] == pytest.approx(diffusers["stages_ms"]["total"] / ort["stages_ms"]["total"])
    assert ort["export_s"] is None or ort["export_s"] > 0


@pytest.mark.parametrize("argv, needle", [
    (["--backends", "torch,warp"], "backends: unknown 'warp'"),
    (["--dtype", "fp8"], "dtype: 'fp8'"),
    (["--batch", "0"], "batch: must be a positive integer"),
    (["--height", "65"], "height"),
    (["--repeat", "0"], "repeat: must be at least 1"),
])
def test_bench_bad_values_exit_2_without_output(tmp_path, capsys, argv, needle):
    out = tmp_path / "bench.json"
    assert run_cli("--model", "tiny-random", *argv, "--json", str(out)) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


PLOT_ARGV = ["--model", "tiny-random", "--steps", "1", "--height", "64", "--width", "64", "--repeat", "1",
             "--warmup", "0"]


def test_plot_is_a_real_png_of_the_stage_bars(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is in [dev]; install it to test the plot")
    from PIL import Image

    png = tmp_path / "stages.png"
    assert run_cli(*PLOT_ARGV, "--plot", str(png)) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.load()  # decodes every row: a truncated file raises here
        assert im.format == "PNG" and im.width >= 600 and im.height >= 400
        colours = im.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 10  # bars, labels and a legend, not a blank canvas


def test_plot_without_matplotlib_exits_2_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what Python does for a missing package
    png, out = tmp_path / "stages.png", tmp_path / "bench.json"
    assert run_cli(*PLOT_ARGV, "--plot", str(png), "--json", str(out)) == 2
    err = capsys.readouterr().err
    assert "plot: needs matplotlib" in err and "Traceback" not in err
    assert not png.exists() and not out.exists()


def test_percentile_is_nearest_rank():
    assert bench.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert bench.percentile([3.0, 1.0, 2.0], 99) == 3.0
    assert bench.percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.0  # an observed value, not the mean 2.5
    assert bench.percentile(list(map(float, range(1, 101))), 90) == 90.0
    assert bench.percentile([7.0], 50) == 7.0


def test_measure_reports_nearest_rank_stats_of_the_timed_runs_only():
    # Warm-up runs return a huge time: none of it may reach the statistics.
    timed = [50.0, 10.0, 30.0, 20.0, 40.0, 60.0, 70.0, 80.0, 90.0, 100.0]
    samples = iter([1e6] * 2 + timed)

    def run() -> dict[str, float]:
        t = next(samples)
        return {"text_encoder": t / 10, "unet_step": t / 5, "scheduler_step": t / 100, "vae_decode": t / 4,
                "total": t}

    row = bench.measure(run, bench.BenchConfig(warmup=2, repeat=len(timed)), torch.device("cpu"))
    assert next(samples, None) is None  # 2 warm-up + 10 timed calls, no more
    assert row["latency_ms"] == {"p50": 50.0, "p99": 100.0, "runs": 10}
    assert row["stages_ms"]["total"] == 50.0 and row["stages_ms_p90"]["total"] == 90.0
    assert row["stages_ms"]["unet_step"] == 10.0 and row["stages_ms_p90"]["vae_decode"] == 22.5


def test_warmup_runs_a_short_generation_at_the_shape(tiny_pipe):
    calls = []
    unet = tiny_pipe.engines["unet"]

    class Spy:  # the U-Net engine, its calls recorded
        def __getattr__(self, name):
            return getattr(unet, name)

        def __call__(self, **inputs):
            calls.append(tuple(inputs["sample"].shape))
            return unet(**inputs)

    tiny_pipe.engines["unet"] = Spy()
    try:
        seconds = tiny_pipe.warmup(height=64, width=64, batch=2, steps=2)
    finally:
        tiny_pipe.engines["unet"] = unet
    assert seconds > 0
    assert calls == [(4, 4, 8, 8)] * 2  # guided: 2 × batch rows, latents 64/8


# -- FLOPs -----------------------------------------------------------------------------------

def test_sd15_unet_guided_step_flops_match_independent_count():
    # 1606.5 GFLOP per guided step (batch 2) at 64×64 latents, counted independently for
    # the published SD 1.5 U-Net count (803.3 GFLOP per sample, attention matmuls included).
    from sdfast.measure.flops import count_stage_flops
    from sdfast.model.info import resolve_model

    flops = count_stage_flops(resolve_model("random-sd15"), 512, 512, batch=1, guided=True)
    assert flops.unet_step / 1e9 == pytest.approx(1606.5, rel=0.01)
    assert flops.text_encoder / 1e9 == pytest.approx(2 * 13.30, rel=0.01)  # CLIP ViT-L/14 × 2 prompts
    assert flops.vae_decode / 1e9 == pytest.approx(2514.5, rel=0.01)


def test_gpu_peak_table_matches_names():
    from sdfast.measure.flops import gpu_peak

    assert gpu_peak("NVIDIA H100 80GB HBM3").tflops == 989.0
    assert gpu_peak("NVIDIA H100 PCIe").tflops == 756.0
    assert gpu_peak("NVIDIA A100-SXM4-80GB").tflops == 312.0
    assert gpu_peak("NVIDIA L4").tflops == 121.0
    assert gpu_peak("NVIDIA L40S").tflops is None


# -- random architectures and the real CLIP tokenizer ----------------------------------------

# Ids of OpenAI CLIP's tokenizer (openai/clip-vit-large-patch14, SD 1.5's tokenizer/).
KNOWN_CLIP_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photograph of an astronaut riding a horse": [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407],
}


@pytest.mark.parametrize("name, pad_id", [("random-sd15", 49407), ("random-sd21", 0)])
def test_random_models_use_the_real_clip_tokenizer(name, pad_id):
    from sdfast.model.info import load_tokenizer, resolve_model

    info = resolve_model(name)
    assert info.random_weights and info.max_tokens == 77
    tok = load_tokenizer(info)
    assert len(tok) == 49408
    for text, ids in KNOWN_CLIP_IDS.items():
        assert tok(text).input_ids == ids
    padded = tok(["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert padded[:4] == [49406, 320, 2368, 49407] and set(padded[4:]) == {pad_id} and len(padded) == 77


def test_random_model_folder_is_made_once_with_the_release_configs():
    from sdfast.model.random_models import random_model_folder

    sd15 = random_model_folder("random-sd15")
    assert random_model_folder("random-sd15") == sd15
    assert not [p for p in sd15.parent.iterdir() if p.name.startswith(".random-sd15")]  # no temp left
    unet = json.loads((sd15 / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    sd21 = random_model_folder("random-sd21")
    te = json.loads((sd21 / "text_encoder" / "config.json").read_text())
    assert (te["hidden_size"], te["num_hidden_layers"], te["hidden_act"]) == (1024, 23, "gelu")
    sched = json.loads((sd21 / "scheduler" / "scheduler_config.json").read_text())
    unet21 = json.loads((sd21 / "unet" / "config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and unet21["sample_size"] == 96  # the 768-px SD 2.1
    assert unet21["upcast_attention"] is True
    base = random_model_folder("random-sd21-base")
    sched = json.loads((base / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "epsilon"  # 2.1-base convention


# -- the few-step benchmark's pieces (bench/fewstep.py) ----------------------------------------

def test_toy_accuracy_counts_exactly_the_images_drawn_right():
    from sdfast import toy

    combos = toy.combos()[:6]

    def generate(prompts, seed):
        # seed 100 draws every scene right; seed 101 draws the background of the first two wrong
        out = []
        for k, (shape, colour, background) in enumerate(combos):
            wrong_bg = seed == 101 and k < 2
            bg = next(c for c in toy.COLOURS if c not in (colour, background)) if wrong_bg else background
            out.append(toy.render(shape, colour, bg, rng=k))
        assert prompts == [toy.caption(*c) for c in combos]  # the canonical captions, in order
        return out

    row = fewstep_bench.toy_accuracy(generate, [100, 101], combos)
    assert row["images"] == 12 and row["seeds"] == [100, 101]
    assert row["accuracy"] == pytest.approx(10 / 12)
    assert sum(row["wrong"].values()) == 2
    with pytest.raises(RuntimeError, match="3 images for 6 prompts"):
        fewstep_bench.toy_accuracy(lambda p, s: generate(p, s)[:3], [100], combos)


def test_toy_accuracy_psnr_is_against_the_reference_images_of_the_same_seed():
    import numpy as np
    from PIL import Image

    from sdfast import toy

    combos = toy.combos()[:2]
    base = {s: [Image.fromarray(np.full((8, 8, 3), 100 + s + k, np.uint8)) for k in range(2)] for s in (0, 1)}

    def generate(prompts, seed):  # every pixel 5 levels off its seed's reference
        return [Image.fromarray(np.asarray(im) + np.uint8(5)) for im in base[seed]]

    kept = {}
    row = fewstep_bench.toy_accuracy(generate, [0, 1], combos, reference=base, keep=kept)
    assert row["psnr_db"] == pytest.approx(10 * np.log10(255**2 / 25))
    assert sorted(kept) == [0, 1] and np.asarray(kept[1][0])[0, 0, 0] == 106
    # the reference of the other seed is not the one compared: swapped, the error grows to 6 and 4
    swapped = fewstep_bench.toy_accuracy(generate, [0, 1], combos, reference={0: base[1], 1: base[0]})
    assert swapped["psnr_db"] == pytest.approx(10 * np.log10(255**2 / ((16 + 36) / 2)))
    assert "psnr_db" not in fewstep_bench.toy_accuracy(generate, [0], combos)


def test_interleaved_runs_every_row_once_per_round_in_order_with_wall_and_cpu():
    calls = []

    def busy(name, seconds):
        def run():
            calls.append(name)
            t0 = time.process_time()
            while time.process_time() - t0 < seconds:
                pass
        return run

    samples = fewstep_bench.interleaved({"a": busy("a", 0.02), "b": busy("b", 0.0), "c": busy("c", 0.01)}, rounds=3)
    assert calls == ["a", "b", "c"] * 3
    assert [s["round"] for s in samples["a"]] == [0, 1, 2]
    for s in samples["a"]:
        assert s["cpu_s"] >= 0.02 and s["wall_s"] >= s["cpu_s"] * 0.9
    assert max(s["cpu_s"] for s in samples["b"]) < min(s["cpu_s"] for s in samples["a"])
    with pytest.raises(InvalidArgument, match="rounds"):
        fewstep_bench.interleaved({"a": busy("a", 0)}, rounds=0)


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [(10.0, 1.0), (5.0, 0.99), (5.0, 0.95), (2.0, 0.9), (3.0, 0.85), (2.0, 0.9), (1.0, 0.3), (20.0, 1.0)]
    # (5, .95) loses to (5, .99); (3, .85) to (2, .9); (20, 1) to (10, 1); the duplicates (2, .9) both stay
    assert fewstep_bench.pareto_front(points) == [6, 3, 5, 1, 0]
    assert fewstep_bench.pareto_front([]) == []


def test_fewstep_deepcache_fallback_restores_the_plain_unet(tiny_pipe):
    from sdfast.deepcache import DeepCacheUNet

    fewstep = _fewstep()
    plain = tiny_pipe.engines["unet"]
    seen = []
    original = DeepCacheUNet.__call__

    def spy(self, **inputs):
        seen.append(self)
        return original(self, **inputs)

    cfg = fewstep.Config("dc", steps=4, cache_interval=2)
    try:
        DeepCacheUNet.__call__ = spy
        out = fewstep.sdfast_generate(tiny_pipe, cfg, prompt="a red circle on a blue background", seed=100)
    finally:
        DeepCacheUNet.__call__ = original
    if "cache_interval" in fewstep._generate_params(tiny_pipe):
        pytest.skip("Pipeline.generate takes cache_interval itself; the fallback is not used")
    assert len(seen) == 4 and seen[0].history == ["full", "shallow", "full", "shallow"]
    assert tiny_pipe.engines["unet"] is plain
    exact = tiny_pipe.generate("a red circle on a blue background", steps=4, seed=100, scheduler="euler")
    assert not torch.equal(out.latents, exact.latents)  # the approximation really ran


def test_fewstep_names_what_this_checkout_cannot_run(tiny_pipe):
    fewstep = _fewstep()
    assert fewstep.unsupported(tiny_pipe, fewstep.BY_NAME["euler-20"]) is None
    assert "'nonesuch'" in fewstep.unsupported(tiny_pipe, fewstep.Config("x", scheduler="nonesuch"))


def _fewstep():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "fewstep.py"
    spec = importlib.util.spec_from_file_location("fewstep_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
