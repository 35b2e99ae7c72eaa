"""Approximations are opt-in and never silent: cache_interval (DeepCache) runs the deep U-Net
blocks only every N steps on the torch backend, is refused by name elsewhere, and every
approximation in effect is listed in GenerationOutput.approximations and the PNG metadata."""

from __future__ import annotations

import pytest
import torch

from sdfast.cli import main
from sdfast.errors import InvalidArgument
from sdfast.media import read_png_metadata
from sdfast.request import Request
from sdfast.runtime import Pipeline

PROMPT = "a red circle on a blue background"


def mid_block_calls(pipe, **options) -> tuple[int, object]:
    unet = pipe.engines["unet"].module
    unet = getattr(unet, "unet", unet)
    calls = []
    handle = unet.mid_block.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = pipe.generate(PROMPT, steps=6, scheduler="euler", seed=2, **options)
    finally:
        handle.remove()
    return len(calls), out


def test_cache_interval_runs_the_deep_blocks_every_n_steps_and_says_so(tiny_pipe, tmp_path):
    n_exact, exact = mid_block_calls(tiny_pipe)
    n_one, one = mid_block_calls(tiny_pipe, cache_interval=1)
    n_three, three = mid_block_calls(tiny_pipe, cache_interval=3)
    assert (n_exact, n_one, n_three) == (6, 6, 2)  # full calls at steps 0 and 3
    assert torch.equal(one.latents, exact.latents) and one.approximations == exact.approximations == []
    assert (three.latents - exact.latents).abs().max() > 1e-3  # the cache really changed the result
    assert len(three.approximations) == 1 and "cache_interval 3: DeepCache" in three.approximations[0]
    (path,) = three.save(tmp_path / "c.png")
    meta = read_png_metadata(path)
    assert meta["cache_interval"] == 3 and meta["approximations"] == three.approximations
    (path,) = exact.save(tmp_path / "e.png")
    assert "approximations" not in read_png_metadata(path)


def test_every_approximation_in_effect_is_listed(tiny_pipe):
    out = tiny_pipe.generate(PROMPT, steps=6, scheduler="euler", seed=2, cache_interval=2, guidance_until=0.5)
    assert [a.split(":")[0] for a in out.approximations] == ["guidance_until 0.5", "cache_interval 2"]


def test_cache_interval_on_another_backend_is_refused_by_name(tiny_pipe, tiny_info, tmp_path, capsys):
    other = Pipeline(tiny_info, tiny_pipe.engines, tiny_pipe.device, tiny_pipe.precision, "onnxruntime",
                     tokenizer=tiny_pipe.tokenizer)
    # an export without DeepCache's two graphs (tests/test_deepcache_export.py runs one with them)
    with pytest.raises(InvalidArgument, match="cache_interval: this pipeline's onnxruntime engines were exported "
                                              "without DeepCache's two U-Net graphs"):
        other.generate(PROMPT, steps=2, cache_interval=2)
    other.generate(PROMPT, steps=2, cache_interval=1)  # 1 caches nothing: allowed anywhere
    inductor = Pipeline(tiny_info, tiny_pipe.engines, tiny_pipe.device, tiny_pipe.precision, "inductor",
                        tokenizer=tiny_pipe.tokenizer)
    with pytest.raises(InvalidArgument, match="cache_interval: DeepCache runs on the torch backend and on onnx and "
                                              "openvino exports, not on inductor"):
        inductor.generate(PROMPT, steps=2, cache_interval=2)
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--model", str(tiny_info.path), "--backend", "onnxruntime", "--cache-interval", "2",
                 "--out", str(out), "--quiet"]) == 2
    assert "--engines" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_cache_interval_below_one_or_not_whole_is_refused(tiny_info, bad):
    with pytest.raises(InvalidArgument, match="cache_interval: must be an integer >= 1"):
        Request.build(tiny_info, prompt="x", cache_interval=bad)


def up_resnet_calls(pipe, **options) -> tuple[int, object]:
    """How many up-path resnet layers of the tiny U-Net ran in a 6-step generation."""
    unet = pipe.engines["unet"].module
    unet = getattr(unet, "unet", unet)
    calls = []
    handles = [r.register_forward_hook(lambda *a: calls.append(1)) for b in unet.up_blocks for r in b.resnets]
    try:
        out = pipe.generate(PROMPT, steps=6, scheduler="euler", seed=2, **options)
    finally:
        for h in handles:
            h.remove()
    return len(calls), out


def test_cache_branch_picks_how_much_of_the_unet_the_shallow_steps_rerun(tiny_pipe, tmp_path):
    # On the 4 shallow steps of 6 (interval 3) branch 0 reruns only the outermost up layer; a
    # deeper branch reruns more of them, and so comes closer to the exact image.
    from sdfast.deepcache import branch_count

    deepest = branch_count(tiny_pipe.engines["unet"]) - 1
    assert deepest >= 1, "the tiny U-Net needs two branches for this test to mean anything"
    n_exact, exact = up_resnet_calls(tiny_pipe)
    n0, b0 = up_resnet_calls(tiny_pipe, cache_interval=3)
    nd, bd = up_resnet_calls(tiny_pipe, cache_interval=3, cache_branch=deepest)
    n1, b1 = up_resnet_calls(tiny_pipe, cache_interval=3, cache_branch=1)
    assert n0 == n_exact // 6 * 2 + 4  # full steps 0 and 3 run every up layer, shallow steps one
    assert n0 < n1 <= nd == n_exact  # the deepest branch reruns every up layer, skipping only the mid block
    assert mid_block_calls(tiny_pipe, cache_interval=3, cache_branch=deepest)[0] == 2
    assert (bd.latents - b0.latents).abs().max() > 1e-4
    err0, errd = ((x.latents - exact.latents).abs().max() for x in (b0, bd))
    assert errd < err0
    assert f"(branch {deepest})" in bd.approximations[0] and "(branch 0)" in b0.approximations[0]
    (path,) = bd.save(tmp_path / "d.png")
    assert read_png_metadata(path)["cache_branch"] == deepest


def test_cache_branch_bounds_and_its_need_for_cache_interval(tiny_pipe, tiny_info):
    from sdfast.deepcache import branch_count

    deepest = branch_count(tiny_pipe.engines["unet"]) - 1
    tiny_pipe.generate(PROMPT, steps=2, cache_interval=2, cache_branch=deepest)  # the last branch: fine
    with pytest.raises(InvalidArgument, match=rf"cache_branch: this U-Net has branches 0 \.\. {deepest}"):
        tiny_pipe.generate(PROMPT, steps=2, cache_interval=2, cache_branch=deepest + 1)
    with pytest.raises(InvalidArgument, match="cache_branch: must be an integer >= 0"):
        Request.build(tiny_info, prompt="x", cache_interval=2, cache_branch=-1)
    for interval in (None, 1):
        with pytest.raises(InvalidArgument, match="cache_branch: 1 has no effect without DeepCache"):
            Request.build(tiny_info, prompt="x", cache_interval=interval, cache_branch=1)
    assert Request.build(tiny_info, prompt="x", cache_branch=0).cache_branch == 0
