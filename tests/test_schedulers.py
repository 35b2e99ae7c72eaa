"""Our schedulers step for step against diffusers' own classes on the SD 1.5 scheduler config.

Both run the same loop on a tiny latent with a deterministic fake U-Net, so any difference
in timesteps, input scaling, noise level or update shows up in the samples.
"""

from __future__ import annotations

import pytest
import torch

from sdfast.errors import InvalidArgument
from sdfast.schedulers import SCHEDULERS, Scheduler, make_scheduler

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json (a PNDM config, as shipped).
SD15_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}
NAMES = list(SCHEDULERS)
SHAPE = (1, 4, 8, 8)
RTOL = 1e-5  # relative to the reference sample's largest magnitude


def reference(name: str, config: dict):
    """The diffusers scheduler that ``name`` must equal, built the way a pipeline builds it."""
    import diffusers

    if name == "lms":
        return diffusers.LMSDiscreteScheduler.from_config(config)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler.from_config(config)
    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    dpm = {"algorithm_type": "dpmsolver++", "solver_order": 2}
    if name == "dpmpp_2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, **dpm)
    if name == "dpmpp_2m_karras":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True, **dpm)
    if name == "lcm":
        return diffusers.LCMScheduler.from_config(config)
    if name == "tcd":
        return diffusers.TCDScheduler.from_config(config)
    raise AssertionError(name)


def step_kwargs(name: str, generator: torch.Generator) -> dict:
    """What a diffusers pipeline passes to ``step`` for ``name``: the generator where it draws
    noise; TCD's gamma as ``eta`` (diffusers' TCD pipelines pass 0.3, our config default)."""
    if name == "tcd":
        return {"generator": generator, "eta": 0.3}
    return {"generator": generator} if SCHEDULERS[name].needs_noise else {}


def fake_unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the U-Net that depends on both the input and the timestep."""
    return 0.1 * x + 0.05 * torch.sin(t.float() / 100)


def seeded(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_reference(name: str, config: dict, steps: int, t_start: int = 0) -> tuple[object, list[torch.Tensor]]:
    ref = reference(name, config)
    ref.set_timesteps(steps)
    # Start diffusers' step counter explicitly (DDIM has none). Left unset, it looks the first
    # timestep up by value, and takes the 2nd match when that value repeats: Karras sigmas on
    # the cosine schedule start 998, 998, 998, ... and diffusers then walks off the table.
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(t_start)
    if t_start:
        x = ref.add_noise(seeded(1), seeded(2), ref.timesteps[t_start : t_start + 1])
    else:
        x = seeded(0) * ref.init_noise_sigma
    extra = step_kwargs(name, torch.Generator().manual_seed(3))
    samples = [x]
    for t in ref.timesteps[t_start:]:
        eps = fake_unet(ref.scale_model_input(x, t), t)
        x = ref.step(eps, t, x, **extra).prev_sample
        samples.append(x)
    return ref, samples


def run_ours(
    name: str, config: dict, steps: int, t_start: int = 0, tensor_index: bool = False
) -> tuple[Scheduler, list[torch.Tensor]]:
    sched = make_scheduler(name, config)
    sched.set_timesteps(steps, "cpu")
    if t_start:
        x = sched.add_noise(seeded(1), seeded(2), t_start)
    else:
        x = seeded(0) * sched.init_noise_sigma
    n = len(sched.timesteps)
    # The pipeline draws every step's noise up front, in step order, from the seed's generator.
    generator = torch.Generator().manual_seed(3)
    noises = [torch.randn(SHAPE, generator=generator) for _ in range(t_start, n)] if sched.needs_noise else None
    sched.begin(x)
    samples = [x]
    for k, i in enumerate(range(t_start, n)):
        index = torch.tensor(i) if tensor_index else i
        t = sched.timesteps[i]
        eps = fake_unet(sched.scale_model_input(x, index), t)
        x = sched.step(eps, index, x, noise=noises[k] if noises else None)
        samples.append(x)
    return sched, samples


def assert_matches_diffusers(name: str, config: dict, steps: int, t_start: int = 0) -> None:
    ref, expected = run_reference(name, config, steps, t_start)
    ours, got = run_ours(name, config, steps, t_start)
    assert ours.timesteps.dtype == torch.float32
    assert torch.equal(ours.timesteps, ref.timesteps.to(torch.float32)), (ours.timesteps, ref.timesteps)
    assert isinstance(ours.init_noise_sigma, float)
    assert ours.init_noise_sigma == float(ref.init_noise_sigma)
    assert len(got) == len(expected)
    for k, (a, b) in enumerate(zip(got, expected, strict=True)):
        err = (a - b).abs().max().item()
        scale = b.abs().max().item()
        assert err <= RTOL * scale, f"{name}, {steps} steps, sample {k}: max |diff| {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("steps", [1, 2, 7, 25, 50])
@pytest.mark.parametrize("name", NAMES)
def test_txt2img_loop_matches_diffusers(name: str, steps: int) -> None:
    assert_matches_diffusers(name, SD15_CONFIG, steps)


@pytest.mark.parametrize("steps, t_start", [(10, 3), (25, 1), (7, 5)])
@pytest.mark.parametrize("name", NAMES)
def test_img2img_loop_from_t_start_matches_diffusers(name: str, steps: int, t_start: int) -> None:
    # LMS then uses a high-order coefficient row with a single slope in its history, and
    # DPM-Solver++ must take a first-order step at t_start: both as diffusers does.
    assert_matches_diffusers(name, SD15_CONFIG, steps, t_start)


VARIANTS = {
    "trailing": {"timestep_spacing": "trailing"},
    "leading": {"timestep_spacing": "leading"},
    "linspace": {"timestep_spacing": "linspace"},
    "linear_betas": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    "cosine_betas": {"beta_schedule": "squaredcos_cap_v2"},
    "trained_betas": {"trained_betas": [0.0001 + k * 2e-5 for k in range(1000)]},
    "no_offset": {"steps_offset": 0, "timestep_spacing": "leading"},
    "ddim_defaults": {"set_alpha_to_one": True, "clip_sample": True},
    # stabilityai/stable-diffusion-2-1 (768 px) predicts v; its scheduler config says so.
    "v_prediction": {"prediction_type": "v_prediction"},
    "v_prediction_sd21": {"prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1},
    "sample_prediction": {"prediction_type": "sample"},
}


@pytest.mark.parametrize("steps, t_start", [(10, 3), (7, 0)])
@pytest.mark.parametrize("name", NAMES)
def test_v_prediction_img2img_and_txt2img_match_diffusers(name: str, steps: int, t_start: int) -> None:
    assert_matches_diffusers(name, {**SD15_CONFIG, "prediction_type": "v_prediction"}, steps, t_start)


def test_unknown_prediction_type_is_refused_naming_the_config() -> None:
    with pytest.raises(ValueError, match="^scheduler config: prediction_type 'flow' is not supported"):
        make_scheduler("euler", {**SD15_CONFIG, "prediction_type": "flow"})


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", NAMES)
def test_alternative_configs_match_diffusers(name: str, variant: str) -> None:
    config = {**SD15_CONFIG, **VARIANTS[variant]}
    if config.get("prediction_type", "epsilon") not in SCHEDULERS[name].prediction_types:  # diffusers has none either
        with pytest.raises(ValueError, match=f"prediction_type .* is not supported by {name!r}"):
            make_scheduler(name, config)
        return
    assert_matches_diffusers(name, config, 7)


@pytest.mark.parametrize("name", NAMES)
def test_tensor_step_index_equals_int_index(name: str) -> None:
    # A CUDA graph replays step() with the index as a device tensor; the maths must not change.
    for t_start in (0, 2):
        _, by_int = run_ours(name, SD15_CONFIG, 8, t_start)
        _, by_tensor = run_ours(name, SD15_CONFIG, 8, t_start, tensor_index=True)
        for a, b in zip(by_int, by_tensor, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_step_is_pure_device_math(name: str) -> None:
    # On the meta device every value is unknown: any .item(), float(tensor), nonzero or Python
    # `if` on a tensor raises. (Plain `table[i]` with a 0-d tensor index calls .item() too.)
    sched = make_scheduler(name, SD15_CONFIG)
    sched.set_timesteps(5, "meta")
    x = torch.empty(SHAPE, device="meta")
    sched.begin(x)
    for i in range(5):
        index = torch.tensor(i, device="meta")
        eps = fake_unet(sched.scale_model_input(x, index), sched.timesteps.index_select(0, index.view(1)))
        x = sched.step(eps, index, x, noise=torch.empty_like(x))
        assert x.shape == SHAPE and x.device.type == "meta"
    assert sched.add_noise(x, x, index).shape == SHAPE


@pytest.mark.parametrize("name", NAMES)
def test_begin_resets_run_state(name: str) -> None:
    _, first = run_ours(name, SD15_CONFIG, 6)
    sched, _ = run_ours(name, SD15_CONFIG, 6)
    # Reuse one scheduler for a second run: begin() must forget the first run's history.
    x = seeded(0) * sched.init_noise_sigma
    sched.begin(x)
    generator = torch.Generator().manual_seed(3)
    for i in range(len(sched.timesteps)):
        noise = torch.randn(SHAPE, generator=generator) if sched.needs_noise else None
        eps = fake_unet(sched.scale_model_input(x, i), sched.timesteps[i])
        x = sched.step(eps, i, x, noise=noise)
    assert torch.equal(x, first[-1])


@pytest.mark.parametrize("name", NAMES)
def test_most_steps_stay_finite(name: str) -> None:
    # 1000 "linspace" steps would repeat a rounded timestep for DPM-Solver++ (a zero-size step:
    # diffusers goes NaN); 1000 "leading" DDIM steps with steps_offset 1 would start past the
    # last training step. Both are refused naming the most steps that work, which do work.
    # LCM / TCD stop at their 50-step distillation schedule (tests/test_schedulers_fewstep.py).
    refused = {"ddim": ("would start at timestep 1000, past the last training step 999", 999),
               "dpmpp_2m": ("repeats 1 of its timesteps", 999)}
    for steps in (999, 1000) if name not in ("lcm", "tcd") else (49, 50):
        if name in refused and steps == 1000:
            needle, fewer = refused[name]
            with pytest.raises(InvalidArgument, match=rf"^steps: .*{needle}.*\({fewer} is the most below 1000"):
                run_ours(name, SD15_CONFIG, steps)
            continue
        _, samples = run_ours(name, SD15_CONFIG, steps)
        assert torch.isfinite(samples[-1]).all()


@pytest.mark.parametrize("name", NAMES)
def test_every_accepted_step_count_moves_every_step(name: str) -> None:
    """Over the step counts a scheduler accepts (both ends of the range, and the top of it step by
    step, where rounding starts to collide), each step goes to strictly less noise: no repeated
    sigma (a zero-size step) and no timestep past the training schedule."""
    top = 50 if name in ("lcm", "tcd") else 1000
    for steps in sorted({*range(1, 11), 25, top // 2, *range(top - 10, top + 1)}):
        sched = make_scheduler(name, SD15_CONFIG)
        try:
            sched.set_timesteps(steps)
        except InvalidArgument as e:
            assert str(e).startswith("steps: ") and "is the most below" in str(e), e
            continue
        t = sched.timesteps
        assert len(t) == steps and 0 <= t.min() and t.max() <= 999, (steps, t)
        if name != "dpmpp_2m_karras":  # Karras: rounded timesteps may repeat, its sigmas never do
            assert (t[1:] < t[:-1]).all(), (steps, t)
        sigmas = getattr(sched, "sigmas", None)
        if sigmas is not None:
            assert (sigmas[1:] < sigmas[:-1]).all(), (steps, sigmas)


@pytest.mark.parametrize("steps", [0, 1001])
@pytest.mark.parametrize("name", NAMES)
def test_bad_steps_is_rejected_naming_the_argument(name: str, steps: int) -> None:
    sched = make_scheduler(name, SD15_CONFIG)
    top = 50 if name in ("lcm", "tcd") else 1000  # LCM / TCD: original_inference_steps
    with pytest.raises(ValueError, match=rf"^steps: must be an integer from 1 to {top} but is {steps}"):
        sched.set_timesteps(steps)


def test_unknown_scheduler_name_lists_the_choices() -> None:
    with pytest.raises(ValueError) as err:
        make_scheduler("foo", SD15_CONFIG)
    assert str(err.value) == (
        "scheduler: unknown 'foo'; choose one of lms, euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras, lcm, tcd"
    )


@pytest.mark.parametrize(
    "name, option", [("ddim", {"thresholding": True}), ("euler", {"use_karras_sigmas": True}),
                     ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}), ("lms", {"rescale_betas_zero_snr": True})]
)
def test_unsupported_config_option_is_refused_by_name(name: str, option: dict) -> None:
    (key,) = option
    with pytest.raises(ValueError, match=f"^scheduler config: {key}="):
        make_scheduler(name, {**SD15_CONFIG, **option})


def test_bad_timestep_spacing_names_the_key() -> None:
    with pytest.raises(InvalidArgument, match="^scheduler config: timestep_spacing must be one of"):
        make_scheduler("euler", {**SD15_CONFIG, "timestep_spacing": "sideways"})


def test_euler_ancestral_requires_noise() -> None:
    sched = make_scheduler("euler_a", SD15_CONFIG)
    sched.set_timesteps(4)
    x = seeded(0)
    sched.begin(x)
    with pytest.raises(ValueError, match="^noise:"):
        sched.step(x, 0, x)


def test_registry_order_and_names() -> None:
    assert NAMES == ["lms", "euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "tcd"]
    assert all(cls.name == name for name, cls in SCHEDULERS.items())
    assert [name for name, cls in SCHEDULERS.items() if cls.needs_noise] == ["euler_a", "lcm", "tcd"]
