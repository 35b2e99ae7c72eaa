"""End to end on the CPU, in ONE process: diffusers bf16, sdfast torch bf16, an OpenVINO
pipeline built the way optimum-intel builds one, and sdfast's openvino backend.

    sdfast export --model random-sd15 --out /tmp/sd15-ov-bf16 --format openvino --precision bf16 \\
        --height 256 --width 256 --batch 1
    python bench/studies/openvino_pipeline.py --engines /tmp/sd15-ov-bf16 --threads 1 --steps 10 \\
        --json bench/results/openvino-pipeline-1t.json

The "optimum-intel style" row reproduces what ``OVStableDiffusionPipeline.from_pretrained(...,
export=True)`` + ``reshape(batch, h, w)`` + ``compile()`` runs (optimum-intel 2.2's
modeling_diffusion.py; optimum-intel itself does not install beside transformers 5.x, which it
caps below 5.6): each component converted from its torch module by ``ov.convert_model`` with
fp32 weights, reshaped to static shapes (U-Net batch 2 × images with a per-row timestep),
compiled with ``{"PERFORMANCE_HINT": "LATENCY"}`` and otherwise the plugin's defaults (bf16
inference on an AMX CPU) plus ``INFERENCE_NUM_THREADS`` = ``--threads`` so that every row gets
the same cores, and called from diffusers' own ``StableDiffusionPipeline.__call__`` with numpy
in and out (``share_inputs``/``share_outputs``), as its OVModelPart wrappers do.

Rows are interleaved (each timed round runs every row once) so that load drifting on a shared
CPU touches all rows alike; stages are p50 over the rounds, timed like ``sdfast bench``: sdfast rows by ``generate(profile=True)``, the two
diffusers-loop rows by forward hooks on the text encoder, U-Net and VAE decoder
(``sdfast.measure.bench.diffusers_runner``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sdfast.measure.bench import (  # noqa: E402
    STAGES,
    BenchConfig,
    add_throughput,
    device_peak,
    diffusers_pipeline,
    diffusers_runner,
    percentile,
    sdfast_runner,
)
from sdfast.measure.flops import count_stage_flops  # noqa: E402
from sdfast.model.components import SPECS, ShapeProfile, sample_inputs  # noqa: E402
from sdfast.model.info import load_torch_modules, resolve_model  # noqa: E402

CPU = torch.device("cpu")


class _OnCPU:
    """What diffusers' pipeline asks of a module part: its device and dtype (fp32 on the CPU)."""

    @property
    def device(self) -> torch.device:
        return CPU

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


class _OVPart(_OnCPU, torch.nn.Module):
    """An optimum-intel style model part: a compiled OpenVINO model behind a module interface
    (a module so that diffusers' pipeline and the timing hooks accept it; it has no weights)."""

    def __init__(self, compiled, config):
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.config = config

    def run(self, *arrays) -> torch.Tensor:
        out = self.request.infer(list(arrays), share_inputs=True, share_outputs=True)
        return torch.from_numpy(np.array(out[0]))


class OVTextEncoder(_OVPart):
    def forward(self, input_ids, attention_mask=None, **kw):
        return (self.run(input_ids.numpy()),)


class OVUNet(_OVPart):
    def forward(self, sample, timestep, encoder_hidden_states, **kw):
        # optimum-intel's U-Net takes one timestep per row.
        t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0]).contiguous()
        return (self.run(sample.float().numpy(), t.numpy(), encoder_hidden_states.float().numpy()),)


class OVVaeDecoder(_OVPart):
    def forward(self, latent):
        return self.run(latent.float().numpy())


class OVVae(_OnCPU, torch.nn.Module):
    def __init__(self, decoder: OVVaeDecoder, config):
        super().__init__()
        self.decoder = decoder
        self.post_quant_conv = None  # inside the decoder IR, as in optimum-intel
        self.config = config

    def decode(self, z, return_dict=False, generator=None):
        return (self.decoder(z),)


def optimum_style_pipeline(info, scheduler: str, batch: int, height: int, width: int, threads: int):
    """Convert, reshape statically and compile the three parts; diffusers' pipeline around them."""
    import openvino as ov
    from diffusers import StableDiffusionPipeline

    from sdfast.measure.bench import diffusers_scheduler
    from sdfast.model.info import component_modules, load_tokenizer

    mods = load_torch_modules(info, dtype=torch.float32)
    wrappers = component_modules(mods)
    profile = ShapeProfile.static(batch, height, width)
    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    compiled = {}
    t0 = time.perf_counter()
    for name in ("text_encoder", "unet", "vae_decoder"):
        spec = SPECS[name]
        ex = sample_inputs(spec, info, profile, which=1)
        shapes = profile.shapes(spec, info)
        if name == "unet":  # per-row timestep, as optimum-intel exports it
            n = ex["sample"].shape[0]
            ex["timestep"] = ex["timestep"].expand(n).contiguous()
            shapes = {**shapes, "timestep": ((n,),) * 3}
        if name == "text_encoder":  # diffusers encodes prompts and negatives in two calls
            shapes = {"input_ids": ((batch, info.max_tokens),) * 3}
        with torch.no_grad():
            model = ov.convert_model(wrappers[name], example_input=tuple(ex[k] for k in spec.input_names))
        model.reshape({i: ov.PartialShape(list(shapes[t.name][1])) for i, t in enumerate(spec.inputs)})
        compiled[name] = core.compile_model(model, "CPU", config)
        del model
    convert_s = time.perf_counter() - t0
    pipe = StableDiffusionPipeline(
        vae=OVVae(OVVaeDecoder(compiled["vae_decoder"], None), mods["vae"].config),
        text_encoder=OVTextEncoder(compiled["text_encoder"], mods["text_encoder"].config),
        tokenizer=load_tokenizer(info), unet=OVUNet(compiled["unet"], mods["unet"].config),
        scheduler=diffusers_scheduler(scheduler, info.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    hint = compiled["unet"].get_property("INFERENCE_PRECISION_HINT")
    del mods, wrappers
    gc.collect()
    return pipe, convert_s, str(hint)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-sd15")
    ap.add_argument("--engines", required=True, help="sdfast export --format openvino --precision bf16 folder")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rows", default="diffusers,torch,optimum,sdfast-openvino")
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import sdfast

    info = resolve_model(a.model)
    cfg = BenchConfig(model=a.model, steps=a.steps, height=a.height, width=a.width, repeat=a.repeat,
                      warmup=a.warmup)
    flops = count_stage_flops(info, a.height, a.width, a.batch, True)
    peak = device_peak(CPU, torch.bfloat16)
    wanted = a.rows.split(",")
    print(f"load before: {os.getloadavg()}  threads {a.threads}  bf16 peak {peak.tflops:.3f} TFLOP/s", flush=True)
    runners: dict[str, Any] = {}
    extras: dict[str, dict[str, Any]] = {}
    if "optimum" in wanted:  # first: its conversion holds fp32 copies of every module for a while
        pipe, convert_s, hint = optimum_style_pipeline(info, cfg.scheduler, a.batch, a.height, a.width, a.threads)
        print(f"optimum-style conversion + compile: {convert_s:.0f} s; U-Net inference precision {hint}", flush=True)
        runners["OpenVINO, optimum-intel style"] = diffusers_runner(pipe, cfg, a.batch, a.height, a.width, CPU)
        extras["OpenVINO, optimum-intel style"] = {"convert_s": convert_s, "inference_precision": hint}
    if "diffusers" in wanted or "torch" in wanted:
        modules = load_torch_modules(info, dtype=torch.bfloat16)  # shared by both rows, as in sdfast bench
        if "diffusers" in wanted:
            runners["diffusers bf16"] = diffusers_runner(diffusers_pipeline(info, modules, cfg.scheduler), cfg,
                                                         a.batch, a.height, a.width, CPU)
        if "torch" in wanted:
            runners["sdfast torch bf16"] = sdfast_runner(sdfast.load(info, backend="torch", dtype="bf16",
                                                                     modules=modules), cfg, a.batch, a.height, a.width)
    if "sdfast-openvino" in wanted:
        runners["sdfast openvino bf16"] = sdfast_runner(sdfast.load(info, backend="openvino", dtype="bf16",
                                                                    engines=a.engines), cfg, a.batch, a.height, a.width)
    gc.collect()
    # Interleaved: every round runs each row once, so load that drifts on a shared CPU touches
    # every row alike (rows run one after another drifted by 2x on this machine).
    for run in runners.values():
        for _ in range(a.warmup):
            run()
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in runners}
    for _ in range(a.repeat):
        for name, run in runners.items():
            c0 = time.process_time()
            sample = run()
            # With one thread the process's CPU time is the work itself, steadier than wall time
            # when other processes come and go (it counts every thread, so it is no help above 1).
            samples[name].append({**sample, "cpu_total": 1e3 * (time.process_time() - c0)})
    rows = []
    for name, ss in samples.items():
        row = {"backend": name, "dtype": "bf16", "batch": a.batch, **extras.get(name, {}),
               "stages_ms": {k: percentile([x[k] for x in ss], 50) for k in STAGES},
               "totals_ms": [x["total"] for x in ss], "cpu_total_ms": percentile([x["cpu_total"] for x in ss], 50),
               "cpu_totals_ms": [x["cpu_total"] for x in ss]}
        add_throughput(row, flops, a.steps, a.batch, peak.tflops)
        rows.append(row)
        st = row["stages_ms"]
        print(f"{name:34s} text {st['text_encoder']:7.0f}  unet/step {st['unet_step']:7.0f}  "
              f"vae {st['vae_decode']:7.0f}  total {st['total']:8.0f} ms  ({row['share_of_peak']['unet']:.0%} of "
              f"peak in the U-Net)", flush=True)
    ref = next((r for r in rows if r["backend"] == "diffusers bf16"), None)
    for r in rows:
        r["speedup_vs_diffusers"] = ref["stages_ms"]["total"] / r["stages_ms"]["total"] if ref else None
        r["cpu_speedup_vs_diffusers"] = ref["cpu_total_ms"] / r["cpu_total_ms"] if ref else None
        if ref:
            print(f"{r['backend']:34s} {r['speedup_vs_diffusers']:.2f}x diffusers bf16 end to end (wall p50), "
                  f"{r['cpu_speedup_vs_diffusers']:.2f}x by CPU time ({r['cpu_total_ms']:.0f} ms)")
    print(f"load after: {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps({"config": vars(a), "peak_tflops": peak.tflops, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
