"""Shared fixtures: the tiny random model, built once per session into a private cache."""

from __future__ import annotations

import os

import pytest
import torch

#: Tests the default run leaves to CI's `-m slow` run, each because a faster default test proves
#: the same thing (these were ~90 % of a 13-28 minute default run). Kept in one place so
#: the default run's cost is decided here; the tests themselves are unchanged. Key: the node id
#: after "tests/"; value: the default-run test that covers it.
SLOW_IN_DEFAULT_RUN: dict[str, str] = {
    **{f"test_toy_model.py::test_toy_model_draws_the_prompt_at_guidance_7_5[{s}]":
       "the [euler] row shows the model draws the prompt; test_schedulers and test_pipeline_parity "
       "hold every scheduler to diffusers step by step and end to end"
       for s in ("lms", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras")},
    "test_toy_model.py::test_toy_model_lms_at_moderate_guidance": "the same, at guidance 3",
    "test_toy_model.py::test_guidance_pulls_towards_the_prompt":
        "test_guidance_0_scores_clearly_lower shows guidance's effect on the toy model; "
        "test_pipeline_parity holds the guidance formula to diffusers",
    **{f"test_toy_model.py::test_toy_model_draws_the_prompt_through_onnxruntime[{s}]":
       "test_pipeline_parity and test_export_onnx hold the ONNX Runtime engines to eager within "
       "1e-4, so they draw what eager draws"
       for s in ("lms", "euler", "dpmpp_2m")},
    "test_lcm_unet.py::test_openvino_engine_takes_timestep_cond_row_by_row":
        "test_lcm_backends' openvino rows sample an exported OpenVINO LCM U-Net on a batch of two prompts "
        "within tier 1 of eager, and test_onnxruntime_engine_takes_timestep_cond_row_by_row checks the rows",
    "test_bench.py::test_bench_onnxruntime_row_or_clear_skip":
        "test_bench_torch_writes_report_with_diffusers_row covers the report; test_export_onnx and "
        "test_pipeline_parity hold the ONNX Runtime engines to eager",
    "test_flops_sdxl.py::test_sdxl_text_stage_counts_both_clips[False-random-sdxl]":
        "the [True-random-sdxl] row and both tiny-sdxl rows count both CLIPs, guided and not",
    "test_disk_full.py::test_onnx_export_onto_a_real_full_disk":
        "the ENOSPC tests of test_disk_full with failing writers hold every exporter's one-line error and "
        "clean-up; the real tmpfs ones (this, openvino, inductor) run in CI's slow set",
    "test_lora_export.py::test_cli_export_and_generate_with_a_fused_lora":
        "test_cli_generate_with_fused_engines runs generate --engines --lora on the fused ONNX export, and "
        "test_fused_onnx_engines_equal_eager_with_the_same_lora holds fused engines to eager",
}


#: node ids (after "tests/") of every test this session collected, slow ones included.
COLLECTED: list[str] = []


def stale_slow_keys(tests_dir, collected: list[str]) -> list[str]:
    """Keys of SLOW_IN_DEFAULT_RUN that name no test any more: a renamed test or parameter would
    otherwise silently come back into the default run (or drop out of CI's slow run). A test
    function must exist in its file's source; a parameter is checked against the collected node
    ids whenever that function was collected with more than one parameter."""
    from collections import Counter
    from pathlib import Path

    per_function = Counter(n.partition("[")[0] for n in collected)
    stale = []
    for key in SLOW_IN_DEFAULT_RUN:
        file, _, test = key.partition("::")
        name = test.partition("[")[0]
        path = Path(tests_dir) / file
        source = path.read_text(encoding="utf-8") if path.is_file() else ""
        if f"def {name}(" not in source:
            stale.append(key)
        elif "[" in test and per_function[f"{file}::{name}"] > 1 and key not in collected:
            stale.append(key)
    return stale


def pytest_collection_modifyitems(config, items):
    from pathlib import Path

    COLLECTED[:] = [i.nodeid.removeprefix("tests/") for i in items]  # before -m deselects the slow ones
    stale = stale_slow_keys(Path(__file__).parent, COLLECTED)
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW_IN_DEFAULT_RUN names tests that do not exist: {stale}")
    for item in items:
        if item.nodeid.removeprefix("tests/") in SLOW_IN_DEFAULT_RUN:
            item.add_marker(pytest.mark.slow)


#: torch (and ONNX Runtime, which follows torch) threads per test process. One: the tiny models'
#: ops are too small to gain from a second thread, and on a busy machine a second OpenMP thread
#: that has to wait for a core makes every op wait (measured: the pipeline parity tests took
#: 0.2 s each with one thread, 3-9 s with two on 2 loaded cores, 75-90 s in a full run). A second
#: core is used by a second test process instead: `pytest -n 2` (pytest-xdist).
THREADS = int(os.environ.get("SDFAST_TEST_THREADS", "1"))
os.environ["OMP_NUM_THREADS"] = str(THREADS)  # for the CLI subprocesses tests start


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    # Tests never read or write the user's cache; the tiny model is rebuilt from its seed (~2 s).
    os.environ["SDFAST_CACHE"] = str(tmp_path_factory.mktemp("sdfast-cache"))
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture(autouse=True)
def _one_thread_count():
    yield
    if torch.get_num_threads() != THREADS:  # e.g. `sdfast bench --threads N` run in-process
        torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def tiny_info(_private_cache):
    from sdfast.model.info import resolve_model

    return resolve_model("tiny-random")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_info):
    import sdfast

    return sdfast.load(tiny_info.path)


@pytest.fixture(scope="session")
def diffusers_pipe(tiny_info):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_info.path, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- exported artifacts: each exported once per session ---------------------------

@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory):
    """The tiny random SDXL folder (two text encoders, size conditioning), built once per session;
    tests only read it (copy it before changing anything)."""
    from sdfast.model.info import TOKENIZER_DIR
    from sdfast.model.random_models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", TOKENIZER_DIR)


@pytest.fixture
def onnx_copy(onnx_dynamic, tmp_path):
    """A private copy of the shared ONNX export, for tests that damage an export."""
    import shutil

    dest = tmp_path / "onnx-copy"
    shutil.copytree(onnx_dynamic, dest)
    return dest


@pytest.fixture(scope="session")
def onnx_dynamic(tiny_info, tmp_path_factory):
    """fp32 ONNX export of the tiny model serving batch 1..2, height 64..128, width 64..96."""
    from sdfast.export.onnx import export_onnx
    from sdfast.model.components import ShapeProfile

    profile = ShapeProfile(1, 1, 2, 64, 64, 128, 64, 64, 96)
    return export_onnx(tiny_info, tmp_path_factory.mktemp("onnx") / "tiny-fp32-dynamic", profile)


@pytest.fixture(scope="session")
def onnx_fp16(tiny_info, tmp_path_factory):
    """fp16 ONNX export (VAE kept fp32 by default), static 64x64, batch 1."""
    from sdfast.export.onnx import OnnxExportOptions, export_onnx
    from sdfast.model.components import Precision, ShapeProfile

    return export_onnx(tiny_info, tmp_path_factory.mktemp("onnx") / "tiny-fp16", ShapeProfile.static(1, 64, 64),
                       OnnxExportOptions(precision=Precision.FP16))
