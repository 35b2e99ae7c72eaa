"""OpenVINO at tier 3 on the trained toy model (slow: exports and 20-step batches of 24 images).

- bf16 OpenVINO engines (U-Net, text encoder and VAE all bf16) against eager fp32, end to end:
  PSNR >= 35 dB and finite, like the eager bf16 path (test_toy_model.py);
- the toy model's drawing accuracy through OpenVINO (bf16 and fp32) no more than 2 points below eager.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

from test_toy_model import PROMPTS, STEPS, accuracy  # noqa: E402

import sdfast  # noqa: E402
from sdfast.measure.parity import FP16_MIN_PSNR, image_metrics  # noqa: E402
from sdfast.model.components import Precision, ShapeProfile  # noqa: E402
from sdfast.model.info import PACKAGED_TINY  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (PACKAGED_TINY / "model_index.json").is_file(),
                                                   reason="the trained toy model is not installed")]

#: what accuracy() runs: batches of len(PROMPTS) images at the toy model's native 64x64.
PROFILE = ShapeProfile(1, len(PROMPTS), len(PROMPTS), 64, 64, 64, 64, 64, 64)


def _export(tmp_path_factory, precision: Precision):
    from sdfast.export.openvino import OpenVinoExportOptions, export_openvino
    from sdfast.model.info import resolve_model

    out = tmp_path_factory.mktemp(f"toy-ov-{precision.value}") / "engines"
    export_openvino(resolve_model("tiny"), out, PROFILE, OpenVinoExportOptions(precision=precision), model_arg="tiny")
    return sdfast.load("tiny", backend="openvino", engines=out, dtype=precision.value)


@pytest.fixture(scope="module")
def eager():
    return sdfast.load("tiny")


@pytest.fixture(scope="module")
def ov_bf16(tmp_path_factory):
    return _export(tmp_path_factory, Precision.BF16)


@pytest.fixture(scope="module")
def ov_fp32(tmp_path_factory):
    return _export(tmp_path_factory, Precision.FP32)


def _pixels(out) -> np.ndarray:
    return np.stack([np.asarray(im) for im in out.images])


def test_openvino_bf16_matches_fp32_eager_end_to_end_tier_3(eager, ov_bf16):
    assert all(e.precision is Precision.BF16 for e in ov_bf16.engines.values())  # the VAE too
    kw = dict(steps=STEPS, seed=0, scheduler="euler")
    ref = eager.generate(PROMPTS[:4], **kw)
    out = ov_bf16.generate(PROMPTS[:4], **kw)
    eager_bf16 = sdfast.load("tiny", dtype="bf16").generate(PROMPTS[:4], **kw)
    assert torch.isfinite(out.latents).all()
    got = image_metrics(_pixels(ref), _pixels(out))
    base = image_metrics(_pixels(ref), _pixels(eager_bf16))
    print(f"openvino bf16 vs eager fp32: {got['psnr_db']:.1f} dB (eager bf16: {base['psnr_db']:.1f} dB)")
    assert got["psnr_db"] >= FP16_MIN_PSNR


@pytest.mark.parametrize("which", ["bf16", "fp32"])
def test_toy_accuracy_through_openvino_at_most_2_points_below_eager(eager, which, request):
    pipe = request.getfixturevalue(f"ov_{which}")
    want = accuracy(eager, "euler", 7.5)
    got = accuracy(pipe, "euler", 7.5)
    print(f"toy accuracy, euler 7.5: eager fp32 {want:.1%}, openvino {which} {got:.1%}")
    # No worse than 2 points below eager. One image is 2.08 points of the 48 graded, so a two-sided
    # bound would fail an engine that draws one more image right (measured: openvino bf16 100.0%
    # against eager fp32's 97.9%, openvino fp32 97.9%).
    assert got >= want - 0.02 - 1e-9
