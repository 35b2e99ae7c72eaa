"""Per-row fields of a batch, with batches whose rows all differ in the field under test.

A batch whose rows are alike cannot tell "each row got its own value" from "every row got the
first row's value" (or its neighbour's). Here every row of a batch differs from every other in
the field under test, and each row must equal what that row gives without any batch-mates:

- several requests in one loop (``Pipeline.run_batch``): each request's rows equal its lone run;
- several rows of one request (prompt lists, ``num_images_per_prompt``, SDXL's ``prompt_2`` and
  negative prompts, negative size conditioning): the rows equal diffusers' pipeline on the same
  arguments (the reference the parity suite holds sdfast to), since a lone run of one of those
  rows would draw other latents;
- a served batch (``serve.batching.Batcher`` in front of a real pipeline): each client gets the
  result of its own request.

Tolerance: a batched row may differ from its lone run only by the float order of kernels that
pick their blocking by the batch size (oneDNN, MKL): measured <= 2.2e-6 of the latents' largest
magnitude on these fp32 tiny models (~1e-4 absolute on latents of magnitude ~50), so the bound is
1e-5 of that magnitude. A row holding another row's value is off by the order of the magnitude
itself; each test also checks that its rows really differ from one another by far more than that.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from sdfast.request import Request

#: a batched row's allowed difference from its reference, relative to the reference's max |latent|
RTOL = 1e-5
#: rows that must differ differ by at least this, relative to the max |latent| (measured: 0.3-1.6)
APART = 1e-2
STEPS = 2


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` equals the reference ``b`` up to float order (RTOL of b's magnitude)."""
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=RTOL * b.abs().max().item())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_rows_apart(rows: list[torch.Tensor]) -> None:
    """Every pair of rows differs clearly: the field under test really reaches the result."""
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            assert rel(rows[i], rows[j]) > APART, f"rows {i} and {j} are alike although the field under test differs between them"


def assert_each_row_is_its_lone_run(pipe, reqs: list[Request]) -> list[torch.Tensor]:
    """Run ``reqs`` as one batch; each output belongs to its request and equals its lone run.
    Returns every row's lone-run latents, in batch order."""
    batched = pipe.run_batch(reqs)
    assert len(batched) == len(reqs)
    rows = []
    for k, (req, out) in enumerate(zip(reqs, batched, strict=True)):
        alone = pipe.run(req)
        assert out.request is req
        assert len(out.images) == req.batch == out.latents.shape[0]
        assert close(out.latents, alone.latents), \
            f"request {k} of the batch is not its lone run (off by {rel(out.latents, alone.latents):.2g})"
        # the images are that request's too (decoded in one VAE call: float order, at most 1 level)
        got = np.stack([np.asarray(im, dtype=int) for im in out.images])
        want = np.stack([np.asarray(im, dtype=int) for im in alone.images])
        assert np.abs(got - want).max() <= 1
        rows += list(alone.latents)
    return rows


# -- SD 1.x: several requests in one loop ---------------------------------------------------------

PROMPTS = ("a red circle on a blue background", "a green square on a white background",
           "a white triangle on a black background")

#: per field, three requests' values, all different; the other fields are shared
SD_FIELDS = {
    "prompt": [dict(prompt=p) for p in PROMPTS],
    "negative_prompt": [dict(negative_prompt=n) for n in ("blurry", "dark, green", "a yellow square")],
    "seed": [dict(seed=s) for s in (1, 2, 3)],
    "guidance_scale": [dict(guidance_scale=g) for g in (7.5, 3.0, 11.0)],
    # rows of different requests; within a request, its rows' own draws of one seed
    "num_images_per_prompt": [dict(num_images_per_prompt=n, seed=s) for n, s in ((2, 4), (1, 5), (3, 6))],
    "prompt-list": [dict(prompt=[PROMPTS[0], PROMPTS[2]], negative_prompt=["", "blurry"], seed=7),
                    dict(prompt=PROMPTS[1], seed=8)],
}


@pytest.mark.parametrize("scheduler", ["euler", "euler_a"])
@pytest.mark.parametrize("field", list(SD_FIELDS))
def test_sd_batch_rows_that_differ_are_each_their_lone_run(tiny_pipe, tiny_info, field, scheduler):
    base = dict(prompt=PROMPTS[0], steps=STEPS, guidance_scale=7.5, seed=1, scheduler=scheduler)
    reqs = [Request.build(tiny_info, **(base | v)) for v in SD_FIELDS[field]]
    assert_rows_apart(assert_each_row_is_its_lone_run(tiny_pipe, reqs))


def test_sd_every_field_differs_in_every_row_at_once(tiny_pipe, tiny_info):
    reqs = [Request.build(tiny_info, prompt=p, negative_prompt=n, guidance_scale=g, seed=s,
                          num_images_per_prompt=k, steps=STEPS, scheduler="euler_a")
            for p, n, g, s, k in zip(PROMPTS, ("", "blurry", "dark"), (7.5, 3.0, 11.0), (11, 12, 13), (1, 3, 2),
                                     strict=True)]
    assert_rows_apart(assert_each_row_is_its_lone_run(tiny_pipe, reqs))


def test_sd_rows_of_one_request_match_diffusers(tiny_pipe, diffusers_pipe, tiny_info):
    """Prompts, negative prompts and images per prompt all differ row by row within one request."""
    from test_pipeline_parity import run_diffusers

    kw = dict(prompt=list(PROMPTS), negative_prompt=["blurry", "", "a yellow square"], guidance_scale=7.5,
              height=64, width=64, num_images_per_prompt=2)
    lat, _ = run_diffusers(diffusers_pipe, tiny_info, "euler_a", num_inference_steps=STEPS, seed=21, **kw)
    out = tiny_pipe.generate(kw.pop("prompt"), steps=STEPS, seed=21, scheduler="euler_a", **kw)
    assert out.latents.shape[0] == 6
    for k in range(6):
        assert close(out.latents[k], lat[k]), f"row {k} is not diffusers' row {k}"
        assert out.metadata(k)["prompt"] == PROMPTS[k // 2]
        assert out.metadata(k)["negative_prompt"] == kw["negative_prompt"][k // 2]
    assert_rows_apart(list(lat))


def test_sd_images_of_one_prompt_each_draw_their_own_latents(tiny_pipe):
    """num_images_per_prompt: one prompt, every image a different draw of the seed; the first is
    the one-image run's (diffusers draws the whole batch from one generator, row 0 first)."""
    kw = dict(steps=STEPS, seed=31, scheduler="euler", guidance_scale=5.0)
    many = tiny_pipe.generate(PROMPTS[1], num_images_per_prompt=4, **kw).latents
    one = tiny_pipe.generate(PROMPTS[1], **kw).latents
    assert close(many[:1], one)
    assert_rows_apart(list(many))


# -- SDXL: second prompts, negative prompts, size conditioning ----------------------------------

@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_folder):
    import sdfast

    return sdfast.load(sdxl_folder)


NEG = dict(negative_original_size=(32, 32), negative_target_size=(48, 48))

SDXL_FIELDS = {
    "prompt_2": [dict(prompt_2=p) for p in PROMPTS],
    "negative_prompt": [dict(negative_prompt=n) for n in ("blurry", "dark, green", "a yellow square")],
    "negative_prompt_2": [dict(negative_prompt="x", negative_prompt_2=n) for n in ("blurry", "dark", "a circle")],
    # none given (zero embeddings) next to given ones
    "negative-given": [dict(), dict(negative_prompt=""), dict(negative_prompt="blurry")],
    "original_size": [dict(original_size=s) for s in ((64, 64), (256, 128), (1024, 512))],
    "target_size": [dict(target_size=s) for s in ((64, 64), (256, 128), (1024, 512))],
    "crops_coords_top_left": [dict(crops_coords_top_left=c) for c in ((0, 0), (64, 32), (512, 256))],
    "negative_original_size": [NEG | dict(negative_original_size=s) for s in ((32, 32), (256, 128), (1024, 512))],
    "negative_target_size": [NEG | dict(negative_target_size=s) for s in ((48, 48), (256, 128), (1024, 512))],
    "negative_crops_coords_top_left": [NEG | dict(negative_crops_coords_top_left=c)
                                       for c in ((0, 0), (64, 32), (512, 256))],
    # negative size conditioning given for some requests only (the others: the positive sizes)
    "negative-sizes-given": [dict(), NEG, dict(negative_original_size=(1024, 512), negative_target_size=(16, 16))],
    "seed": [dict(seed=s) for s in (1, 2, 3)],
    "guidance_scale": [dict(guidance_scale=g) for g in (6.0, 3.0, 11.0)],
    "num_images_per_prompt": [dict(num_images_per_prompt=n, seed=s, original_size=o)
                              for n, s, o in ((2, 4, (64, 64)), (1, 5, (256, 128)), (3, 6, (1024, 512)))],
}


@pytest.mark.parametrize("field", list(SDXL_FIELDS))
def test_sdxl_batch_rows_that_differ_are_each_their_lone_run(sdxl_pipe, field):
    base = dict(prompt="a blue triangle", steps=STEPS, guidance_scale=6.0, seed=1, scheduler="euler")
    reqs = [Request.build(sdxl_pipe.info, **(base | v)) for v in SDXL_FIELDS[field]]
    assert_rows_apart(assert_each_row_is_its_lone_run(sdxl_pipe, reqs))


@pytest.fixture(scope="module")
def sdxl_ref(sdxl_folder, sdxl_pipe):
    from diffusers import StableDiffusionXLPipeline

    from sdfast.measure.bench import diffusers_scheduler

    ref = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, torch_dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("euler", sdxl_pipe.info.scheduler_config)
    return ref


def test_sdxl_rows_of_one_request_match_diffusers(sdxl_pipe, sdxl_ref):
    """prompt, prompt_2, negative_prompt, negative_prompt_2 and the image index all differ row by
    row, with negative size conditioning unlike the positive one. The reference runs each row on
    its own through diffusers, from that row of the request's one seeded draw (diffusers' batched
    call is no reference here: it repeats [negative, positive] time ids row by row, so with several
    rows its uncond rows get positive sizes and its cond rows negative ones)."""
    info = sdxl_pipe.info
    sizes = dict(original_size=(128, 96), target_size=(64, 80), crops_coords_top_left=(4, 8),
                 negative_original_size=(32, 32), negative_target_size=(48, 48),
                 negative_crops_coords_top_left=(16, 0))
    texts = dict(prompt=["a red circle", "a green square"], prompt_2=["a blue sky", "a white wall"],
                 negative_prompt=["blurry", "dark"], negative_prompt_2=["green", "a yellow square"])
    out = sdxl_pipe.generate(texts["prompt"], steps=STEPS, seed=41, scheduler="euler", guidance_scale=6.0,
                             num_images_per_prompt=2, **{k: v for k, v in texts.items() if k != "prompt"}, **sizes)
    assert out.latents.shape[0] == 4
    f = info.vae_scale_factor
    draw = torch.randn((4, info.latent_channels, 64 // f, 64 // f), generator=torch.Generator("cpu").manual_seed(41))
    refs = []
    for k in range(4):
        row = {key: v[k // 2] for key, v in texts.items()}
        lat = sdxl_ref(**row, **sizes, guidance_scale=6.0, height=64, width=64, num_inference_steps=STEPS,
                       latents=draw[k : k + 1].clone(), output_type="latent").images
        assert close(out.latents[k : k + 1], lat), \
            f"row {k} is not its own diffusers run (off by {rel(out.latents[k : k + 1], lat):.2g})"
        assert out.metadata(k)["prompt_2"] == texts["prompt_2"][k // 2]
        assert out.metadata(k)["negative_prompt_2"] == texts["negative_prompt_2"][k // 2]
        refs.append(lat[0])
    assert_rows_apart(refs)


def test_sdxl_negative_size_conditioning_is_not_the_positive_one(sdxl_pipe, sdxl_ref):
    """One request, negative sizes unlike the positive ones: diffusers' result, which differs both
    from the run without negative sizes and from the run with the two swapped."""
    pos = dict(original_size=(1024, 512), target_size=(256, 128))
    neg = dict(negative_original_size=(32, 32), negative_target_size=(48, 48))
    swapped = dict(original_size=(32, 32), target_size=(48, 48), negative_original_size=(1024, 512),
                   negative_target_size=(256, 128))
    kw = dict(negative_prompt="blurry", guidance_scale=6.0)
    lat = sdxl_ref("a red circle", **kw, **pos, **neg, height=64, width=64, num_inference_steps=STEPS,
                   generator=torch.Generator("cpu").manual_seed(5), output_type="latent").images
    run = dict(steps=STEPS, seed=5, scheduler="euler", **kw)
    out = sdxl_pipe.generate("a red circle", **run, **pos, **neg).latents
    assert close(out, lat)
    assert rel(sdxl_pipe.generate("a red circle", **run, **pos).latents, lat) > APART
    assert rel(sdxl_pipe.generate("a red circle", **run, **swapped).latents, lat) > APART


# -- a served batch: each client gets its own request's rows ------------------------------------

def test_a_served_batch_hands_each_request_its_own_rows(tiny_pipe, tiny_info):
    from sdfast.serve.batching import Batcher

    gate = threading.Event()
    loops: list[int] = []

    def run_batch(requests):
        gate.wait(30)
        loops.append(len(requests))
        return tiny_pipe.run_batch(requests)

    def run_one(request):
        gate.wait(30)
        loops.append(1)
        return tiny_pipe.run(request)

    reqs = [Request.build(tiny_info, prompt=p, negative_prompt=n, guidance_scale=g, seed=s,
                          num_images_per_prompt=k, steps=STEPS, scheduler="euler_a")
            for p, n, g, s, k in (("a lone first job", "", 7.5, 50, 1), (PROMPTS[0], "", 7.5, 51, 2),
                                  (PROMPTS[1], "blurry", 3.0, 52, 1), (PROMPTS[2], "dark", 11.0, 53, 3),
                                  (PROMPTS[0], "green", 5.0, 54, 1))]
    b = Batcher(run_batch, run_one, max_images=16, max_wait_s=0.2, max_queue=16)
    try:
        first = b.submit(reqs[0], 60)
        while b.depth:  # the worker holds the first job at the gate: the rest queue up together
            threading.Event().wait(0.005)
        futures = [first] + [b.submit(r, 60) for r in reqs[1:]]
        gate.set()
        done = [f.result(60) for f in futures]
    finally:
        gate.set()
        b.close()
        b.join(60)
    assert loops == [1, 4]  # the last four really shared one loop
    rows = []
    for req, d in zip(reqs, done, strict=True):
        alone = tiny_pipe.run(req)
        assert d.output.request is req
        assert close(d.output.latents, alone.latents)
        rows += list(alone.latents)
    assert [d.batch_requests for d in done] == [1, 4, 4, 4, 4]
    assert_rows_apart(rows)


def test_requests_that_differ_only_in_long_prompt_policy_each_get_their_own(tiny_pipe, tiny_info):
    # A prompt past the 77-token window: "chunk" encodes all of it, "truncate" its first 75 tokens.
    # Served one after the other or handed to run_batch together, neither request may be given the
    # other's policy: a batch refuses the mix, and the batcher never puts them in one loop.
    from sdfast.errors import InvalidArgument
    from sdfast.serve.batching import batch_key

    long = " ".join([PROMPTS[0]] * 12) + " and a " + PROMPTS[1]
    reqs = [Request.build(tiny_info, prompt=long, long_prompt=mode, seed=60, steps=STEPS, scheduler="euler")
            for mode in ("chunk", "truncate")]
    alone = [tiny_pipe.run(r) for r in reqs]
    assert_rows_apart([a.latents[0] for a in alone])  # the policy changes the image
    assert batch_key(reqs[0]) != batch_key(reqs[1])
    with pytest.raises(InvalidArgument, match="long_prompt"):
        tiny_pipe.run_batch(reqs)
    for req, a in zip(reqs, alone, strict=True):  # each request alone still runs its own policy
        assert close(tiny_pipe.run_batch([req])[0].latents, a.latents)
