"""DeepCache (sdfast.deepcache): the full/shallow schedule, the cut, batch rows, reset, SD and SDXL U-Nets.

The U-Nets are small random ones built here (SD-shaped: three levels, two layers per block, like
SD 1.5's structure; SDXL-shaped: text_time conditioning, a DownBlock2D first), run through the
torch backend's own engine class, so the wrapper sees what the runtime hands it.
"""

from __future__ import annotations

import pytest
import torch

from sdfast.deepcache import DeepCacheUNet, branch_count, wrap_unet
from sdfast.engines.torch import TorchEngine
from sdfast.errors import InvalidArgument
from sdfast.model.components import SDXL_UNET, UNET, Precision
from sdfast.model.wrappers import SDXLUNetWrapper, UNetWrapper

CPU = torch.device("cpu")


def sd_engine(seed: int = 0) -> TorchEngine:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=4).eval()
    return TorchEngine(UNET, UNetWrapper(unet), CPU, Precision.FP32)


def sdxl_engine(seed: int = 0) -> TorchEngine:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1).eval()
    return TorchEngine(SDXL_UNET, SDXLUNetWrapper(unet), CPU, Precision.FP32)


@pytest.fixture(scope="module")
def sd():
    return sd_engine()


@pytest.fixture(scope="module")
def sdxl():
    return sdxl_engine()


def smooth(gen: torch.Generator, batch: int, h: int = 16, w: int = 16) -> torch.Tensor:
    """A smooth latent (coarse noise, bilinearly upsampled), as latents are late in denoising."""
    z = torch.randn(batch, 4, max(1, h // 4), max(1, w // 4), generator=gen)
    return torch.nn.functional.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)


def cond_for(engine: TorchEngine, gen: torch.Generator, batch: int) -> dict[str, torch.Tensor]:
    if engine.spec is SDXL_UNET:
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(batch, 1)
        return {"encoder_hidden_states": torch.randn(batch, 7, 64, generator=gen),
                "text_embeds": torch.randn(batch, 32, generator=gen), "time_ids": time_ids}
    return {"encoder_hidden_states": torch.randn(batch, 7, 32, generator=gen)}


def trajectory(engine: TorchEngine, batch: int = 2, calls: int = 6, seed: int = 1, h: int = 16, w: int = 16):
    """``calls`` U-Net inputs of one made-up generation: a smooth latent drifting a little, timesteps falling."""
    gen = torch.Generator().manual_seed(seed)
    x, cond = smooth(gen, batch, h, w), cond_for(engine, gen, batch)
    out = []
    for k in range(calls):
        out.append({"sample": x.clone(), "timestep": torch.tensor([900 - 37 * k]), **cond})
        x = x + 0.05 * smooth(gen, batch, h, w)
    return out


def run(unet, inputs: list[dict]) -> list[torch.Tensor]:
    return [unet(**i)["noise_pred"] for i in inputs]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_interval_1_equals_the_plain_unet_exactly(family, sd, sdxl):
    engine = sd if family == "sd" else sdxl
    dc = wrap_unet(engine, 1)
    inputs = trajectory(engine, calls=3)
    for got, want in zip(run(dc, inputs), run(engine, inputs), strict=True):
        assert torch.equal(got, want)
    assert dc.history == ["full"] * 3


def test_interval_1_exact_on_a_size_that_forces_upsample_sizes(sd):
    # 18x22 is no multiple of 4 (two upsamplers): diffusers forwards explicit upsample sizes there
    dc = wrap_unet(sd, 1, branch=4)
    inputs = trajectory(sd, batch=1, calls=2, h=18, w=22)
    for got, want in zip(run(dc, inputs), run(sd, inputs), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("interval", [2, 3])
def test_full_path_runs_on_calls_0_n_2n(sd, interval):
    dc = wrap_unet(sd, interval)
    mid_calls = []
    handle = dc.unet.mid_block.register_forward_hook(lambda *a: mid_calls.append(len(dc.history)))
    try:
        run(dc, trajectory(sd, calls=7))
    finally:
        handle.remove()
    full = [k for k in range(7) if k % interval == 0]
    assert mid_calls == full  # the deep path (mid block) ran on exactly those calls
    assert [k for k, h in enumerate(dc.history) if h == "full"] == full


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_shallow_call_on_the_cached_input_equals_the_full_one(family, sd, sdxl):
    # Same input twice: the cached deep feature is exactly what a full call would compute, so a
    # cut in the wrong place (a residual off by one, a layer run twice or skipped) shows here.
    engine = sd if family == "sd" else sdxl
    [inp] = trajectory(engine, calls=1)
    want = engine(**inp)["noise_pred"]
    for branch in range(branch_count(engine)):
        dc = wrap_unet(engine, 2, branch)
        assert torch.equal(dc(**inp)["noise_pred"], want)
        assert torch.equal(dc(**inp)["noise_pred"], want), f"branch {branch}"
        assert dc.history == ["full", "shallow"]


@pytest.mark.parametrize("branch", [0, 3, 8])
def test_a_shallow_call_runs_only_the_shallow_layers(sd, branch):
    # SD-shaped down layers: d0.r0 d0.r1 d0.ds d1.r0 d1.r1 d1.ds d2.r0 d2.r1 (residuals 1..8);
    # the up layers consume residuals 8..0, three per up block.
    dc = wrap_unet(sd, 2, branch)
    unet = dc.unet
    ran: list[str] = []
    handles = []
    for side, blocks in (("down", unet.down_blocks), ("up", unet.up_blocks)):
        for i, block in enumerate(blocks):
            for j, resnet in enumerate(block.resnets):
                handles.append(resnet.register_forward_hook(lambda *a, n=f"{side}{i}.r{j}": ran.append(n)))
            for sampler in (block.downsamplers if side == "down" else block.upsamplers) or []:
                handles.append(sampler.register_forward_hook(lambda *a, n=f"{side}{i}.s": ran.append(n)))
    inputs = trajectory(sd, calls=2)
    try:
        dc(**inputs[0])
        full, ran[:] = list(ran), []
        dc(**inputs[1])
    finally:
        for h in handles:
            h.remove()
    down = ["down0.r0", "down0.r1", "down0.s", "down1.r0", "down1.r1", "down1.s", "down2.r0", "down2.r1"]
    up = ["up0.r0", "up0.r1", "up0.r2", "up0.s", "up1.r0", "up1.r1", "up1.r2", "up1.s", "up2.r0", "up2.r1", "up2.r2"]
    assert full == down + up
    up_resnets = [n for n in up if not n.endswith(".s")]
    first_up = up_resnets[len(up_resnets) - 1 - branch]  # the up layer consuming residual `branch`
    assert ran == down[:branch] + up[up.index(first_up):]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_shallow_calls_differ_but_stay_close_and_beat_reusing_the_output(family, sd, sdxl):
    engine = sd if family == "sd" else sdxl
    inputs = trajectory(engine, calls=2)
    want = engine(**inputs[1])["noise_pred"]
    stale = rel(engine(**inputs[0])["noise_pred"], want)  # reusing the whole previous output
    errors = []
    for branch in (0, branch_count(engine) - 1):
        dc = wrap_unet(engine, 2, branch)
        got = run(dc, inputs)[1]
        assert dc.history == ["full", "shallow"]
        e = rel(got, want)
        assert 1e-6 < e < stale, (branch, e, stale)  # an approximation, and better than none
        errors.append(e)
    assert errors[1] < errors[0]  # the deepest branch recomputes more, so it is closer


def test_batch_rows_stay_independent(sd):
    batched = run(wrap_unet(sd, 3), trajectory(sd, batch=2, calls=5))
    for row in range(2):
        inputs = [{k: v[row : row + 1] if v.shape[0] == 2 else v for k, v in i.items()}
                  for i in trajectory(sd, batch=2, calls=5)]
        alone = run(wrap_unet(sd, 3), inputs)
        for got, want in zip(batched, alone, strict=True):
            torch.testing.assert_close(got[row : row + 1], want, rtol=1e-5, atol=1e-5)
    # and the rows are different images (a wrapper returning row 0 twice would pass the above for row 0 only)
    assert not torch.allclose(batched[4][0], batched[4][1])


def test_reset_starts_each_generation_with_a_full_call(sd):
    first, second = trajectory(sd, calls=3, seed=1), trajectory(sd, calls=3, seed=2)
    fresh = run(wrap_unet(sd, 4), second)
    dc = wrap_unet(sd, 4)
    run(dc, first)
    dc.reset()
    assert dc.history == []
    again = run(dc, second)
    assert dc.history == ["full", "shallow", "shallow"]
    for got, want in zip(again, fresh, strict=True):
        assert torch.equal(got, want)
    # without the reset the next generation would reuse the first one's deep features
    stale = wrap_unet(sd, 4)
    run(stale, first[:2])
    assert stale.history == ["full", "shallow"]
    assert not torch.allclose(run(stale, second[:1])[0], fresh[0])
    assert stale.history[-1] == "shallow"


def test_a_batch_change_runs_full_and_restarts_the_count(sd):
    dc = wrap_unet(sd, 3)
    two, one = trajectory(sd, batch=2, calls=2), trajectory(sd, batch=1, calls=4)
    run(dc, two)
    out = run(dc, one)  # e.g. the guided batch dropping to the cond rows
    assert dc.history == ["full", "shallow", "full", "shallow", "shallow", "full"]
    assert torch.equal(out[0], sd(**one[0])["noise_pred"])


def test_branch_numbering_and_bad_arguments(sd, sdxl):
    # SD-shaped: 3 levels x 2 layers + 2 downsamplers = 8 down layers -> residuals 0..8
    assert branch_count(sd) == 9
    assert branch_count(sdxl) == 6  # 2 levels x 2 layers + 1 downsampler
    assert isinstance(wrap_unet(sd, 2, 8), DeepCacheUNet)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidArgument, match="cache_interval"):
            wrap_unet(sd, bad)
    for bad in (-1, 9, True):
        with pytest.raises(InvalidArgument, match=r"branches 0 \.\. 8"):
            wrap_unet(sd, 2, bad)


def test_a_non_torch_engine_is_refused_clearly(sd):
    class Exported:
        spec = UNET
        device = CPU

        def __call__(self, **inputs):
            return {"noise_pred": inputs["sample"]}

    with pytest.raises(InvalidArgument, match="torch backend"):
        wrap_unet(Exported(), 2)


def test_an_unknown_block_type_is_refused_clearly():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        block_out_channels=(32, 32), layers_per_block=1, sample_size=8, cross_attention_dim=32, norm_num_groups=8,
        down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "SimpleCrossAttnUpBlock2D"), attention_head_dim=8).eval()
    with pytest.raises(InvalidArgument, match="SimpleCrossAttnDownBlock2D"):
        wrap_unet(TorchEngine(UNET, UNetWrapper(unet), CPU, Precision.FP32), 2)


def test_same_outputs_as_the_deepcache_packages_helper(sd):
    # The DeepCache package's DeepCacheSDHelper patches diffusers' module forwards and reads the step
    # index from pipe.scheduler.timesteps; on a two-layers-per-block U-Net its cache_branch_id is
    # our branch. Every call of a 7-call generation, every branch: the same tensors.
    import types

    helper_cls = pytest.importorskip("DeepCache").DeepCacheSDHelper
    inputs = trajectory(sd, calls=7)
    unet = sd.module.unet
    pipe = types.SimpleNamespace(unet=unet, scheduler=types.SimpleNamespace(
        timesteps=torch.cat([i["timestep"] for i in inputs])))
    for branch in range(branch_count(sd)):
        ours = run(wrap_unet(sd, 3, branch), inputs)
        helper = helper_cls(pipe=pipe)
        helper.set_params(cache_interval=3, cache_branch_id=branch)
        helper.enable()
        try:
            with torch.inference_mode():
                theirs = [unet(i["sample"], i["timestep"], i["encoder_hidden_states"], return_dict=False)[0]
                          for i in inputs]
        finally:
            helper.disable()
        for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert torch.equal(a, b), f"branch {branch} call {k}"
