"""Few-step schedulers (LCM, TCD), trailing spacing (SD-Turbo / SDXL-Turbo configs) and the
folder-config -> scheduler-name map, against diffusers' own classes on the same inputs and noise."""

from __future__ import annotations

import pytest
import torch
from test_schedulers import SD15_CONFIG, SHAPE, assert_matches_diffusers, fake_unet, run_ours, seeded

from sdfast.errors import InvalidArgument
from sdfast.schedulers import DEFAULT_SCHEDULER, SCHEDULERS, make_scheduler, scheduler_for_config

# latent-consistency/lcm-lora-sdv1-5 style: the SD 1.5 betas under an LCMScheduler config.
LCM_CONFIG = {**SD15_CONFIG, "_class_name": "LCMScheduler", "original_inference_steps": 50}
TCD_CONFIG = {**SD15_CONFIG, "_class_name": "TCDScheduler"}
# stabilityai/sd-turbo scheduler/scheduler_config.json (the keys that matter)
TURBO_CONFIG = {
    **SD15_CONFIG,
    "_class_name": "EulerDiscreteScheduler",
    "timestep_spacing": "trailing",
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "use_karras_sigmas": False,
}
FEW = [1, 2, 4, 8]
PREDICTIONS = ["epsilon", "v_prediction"]


def diffusers_loop(cls_name: str, config: dict, steps: int, eta: float | None = None) -> list[torch.Tensor]:
    import diffusers

    ref = getattr(diffusers, cls_name).from_config(config)
    ref.set_timesteps(steps)
    x = seeded(0) * ref.init_noise_sigma
    generator = torch.Generator().manual_seed(3)
    kw = {"generator": generator} | ({} if eta is None else {"eta": eta})
    out = [x]
    for t in ref.timesteps:
        x = ref.step(fake_unet(ref.scale_model_input(x, t), t), t, x, **kw).prev_sample
        out.append(x)
    return out


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want)
    for k, (a, b) in enumerate(zip(got, want, strict=True)):
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= 1e-5 * scale, f"{what}, sample {k}: max |diff| {err:.3g} vs scale {scale:.3g}"


# -- LCM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("steps", FEW)
@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_few_step_loops_match_diffusers(name: str, steps: int, prediction: str) -> None:
    config = {**(LCM_CONFIG if name == "lcm" else TCD_CONFIG), "prediction_type": prediction}
    assert_matches_diffusers(name, config, steps)  # timesteps, init sigma and every sample


@pytest.mark.parametrize("steps", FEW)
def test_lcm_timesteps_are_the_distillation_schedule(steps: int) -> None:
    sched = make_scheduler("lcm", LCM_CONFIG)
    sched.set_timesteps(steps)
    expected = {1: [999], 2: [999, 499], 4: [999, 759, 499, 259], 8: [999, 879, 759, 639, 499, 379, 259, 139]}
    assert sched.timesteps.tolist() == expected[steps]


def test_lcm_boundary_condition_scalings_equal_diffusers() -> None:
    import diffusers

    # At the default scaling 10, c_skip <= 1.3e-7 on LCM's timesteps (>= 139 at 8 steps), so a
    # whole loop barely sees it; at 0.01 the last step's c_skip is 0.11 and a wrong one shows.
    for scaling in (10.0, 0.01):
        config = {**LCM_CONFIG, "timestep_scaling": scaling}
        ref = diffusers.LCMScheduler.from_config(config)
        ours = make_scheduler("lcm", config)
        ours.set_timesteps(8)
        ref.set_timesteps(8)
        for i, t in enumerate(ref.timesteps):
            c_skip, c_out = ref.get_scalings_for_boundary_condition_discrete(t)
            assert torch.allclose(
                ours._c_skip[i], torch.as_tensor(c_skip, dtype=torch.float32), rtol=1e-6, atol=0
            )
            assert torch.allclose(
                ours._c_out[i], torch.as_tensor(c_out, dtype=torch.float32), rtol=1e-6, atol=0
            )
            assert_close(
                run_ours("lcm", config, 8)[1], diffusers_loop("LCMScheduler", config, 8), f"scaling {scaling}"
            )


def test_lcm_one_step_is_the_boundary_condition_output() -> None:
    # One step: f(x, 999) = c_skip x + c_out x0, no noise at all (diffusers: none for one step).
    # timestep_scaling 0.001 puts the scaled time near sigma_data, where c_skip = 0.2, c_out = 0.9.
    sched = make_scheduler("lcm", {**LCM_CONFIG, "timestep_scaling": 0.001})
    sched.set_timesteps(1)
    x = seeded(0)
    sched.begin(x)
    a = torch.zeros(1)
    out_a = sched.step(fake_unet(x, sched.timesteps[0]), 0, x, noise=a.new_zeros(SHAPE))
    out_b = sched.step(fake_unet(x, sched.timesteps[0]), 0, x, noise=seeded(9))
    assert torch.equal(out_a, out_b)  # the last (only) step ignores its noise
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)[999]
    x0 = (x - (1 - ac).sqrt() * fake_unet(x, torch.tensor(999.0))) / ac.sqrt()
    c_skip, c_out = 0.25 / (0.999**2 + 0.25), 0.999 / (0.999**2 + 0.25) ** 0.5
    assert torch.allclose(out_a, c_skip * x + c_out * x0, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out_a, x0, rtol=1e-2)  # the boundary condition is not a no-op here
    assert not torch.allclose(out_a, c_out * x + c_skip * x0, rtol=1e-2)  # nor swapped


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_renoising_uses_each_steps_noise_except_the_last(name: str) -> None:
    config = LCM_CONFIG if name == "lcm" else TCD_CONFIG
    sched = make_scheduler(name, config)
    sched.set_timesteps(4)
    x = seeded(0)
    sched.begin(x)
    eps = fake_unet(x, sched.timesteps[1])
    base = sched.step(eps, 1, x, noise=seeded(5))
    moved = sched.step(eps, 1, x, noise=seeded(5) + 1.0)
    # Shifting the noise by 1 moves the sample by exactly the re-noising scale of that step.
    ac = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)
    t_next = int(sched.timesteps[2])
    if name == "lcm":
        scale = (1 - ac[t_next]).sqrt()
    else:  # TCD: from s = floor(0.7 t_next) forward to t_next
        scale = (1 - ac[t_next] / ac[int(0.7 * t_next)]).sqrt()
    assert torch.allclose(moved - base, torch.full(SHAPE, scale.item()), rtol=1e-4, atol=0)
    last = sched.step(eps, 3, x, noise=seeded(5))
    assert torch.equal(last, sched.step(eps, 3, x, noise=seeded(6)))  # the last step draws nothing


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_original_inference_steps_both_sides(name: str) -> None:
    import diffusers

    config = {**(LCM_CONFIG if name == "lcm" else TCD_CONFIG), "original_inference_steps": 25}
    sched = make_scheduler(name, config)
    sched.set_timesteps(25)  # the top of the range
    with pytest.raises(
        InvalidArgument, match="^steps: must be an integer from 1 to 25 but is 26; .*original_inference"
    ):
        sched.set_timesteps(26)
    ref = getattr(diffusers, f"{name.upper()}Scheduler").from_config(config)
    for steps in (4, 25):
        ref.set_timesteps(steps)
        sched.set_timesteps(steps)
        assert sched.timesteps.tolist() == ref.timesteps.tolist()
    for bad in (0, 1001, "50", 2.5):
        with pytest.raises(
            InvalidArgument, match="^scheduler config: original_inference_steps: must be an integer"
        ):
            make_scheduler(name, {**config, "original_inference_steps": bad})
    make_scheduler(name, {**config, "original_inference_steps": 1000}).set_timesteps(1000)


def test_lcm_clip_sample_follows_the_config_like_diffusers() -> None:
    config = {**LCM_CONFIG, "clip_sample": True, "clip_sample_range": 0.5}
    assert_close(run_ours("lcm", config, 4)[1], diffusers_loop("LCMScheduler", config, 4), "clip_sample")
    # and the two configs really differ, so the check above could fail
    assert not torch.allclose(run_ours("lcm", config, 4)[1][-1], run_ours("lcm", LCM_CONFIG, 4)[1][-1])


# -- TCD gamma ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_tcd_gamma_matches_diffusers_eta(gamma: float, prediction: str) -> None:
    config = {**TCD_CONFIG, "gamma": gamma, "prediction_type": prediction}
    ours = make_scheduler("tcd", config)
    assert ours.needs_noise is (gamma > 0)  # gamma 0 draws no noise, as diffusers
    for steps in (2, 4):
        _, got = run_ours("tcd", config, steps)
        assert_close(got, diffusers_loop("TCDScheduler", config, steps, eta=gamma), f"gamma {gamma}")


def test_tcd_default_gamma_is_diffusers_03_and_differs_from_deterministic() -> None:
    assert make_scheduler("tcd", TCD_CONFIG).gamma == 0.3
    _, stochastic = run_ours("tcd", TCD_CONFIG, 4)
    _, deterministic = run_ours("tcd", {**TCD_CONFIG, "gamma": 0.0}, 4)
    assert not torch.allclose(stochastic[-1], deterministic[-1], rtol=1e-3)


def test_tcd_gamma_zero_runs_without_noise() -> None:
    sched = make_scheduler("tcd", {**TCD_CONFIG, "gamma": 0})
    sched.set_timesteps(4)
    x = seeded(0)
    sched.begin(x)
    for i in range(4):
        x = sched.step(fake_unet(x, sched.timesteps[i]), i, x)  # noise=None is fine
    assert torch.isfinite(x).all()
    stochastic = make_scheduler("tcd", TCD_CONFIG)
    stochastic.set_timesteps(4)
    with pytest.raises(ValueError, match="^noise: tcd re-noises"):
        stochastic.step(x, 0, x)


@pytest.mark.parametrize("bad", [-0.01, 1.01, "0.3", True, float("nan")])
def test_tcd_gamma_out_of_range_is_refused_naming_the_key(bad) -> None:
    with pytest.raises(InvalidArgument, match="^scheduler config: gamma must be a number from 0 to 1"):
        make_scheduler("tcd", {**TCD_CONFIG, "gamma": bad})


# -- trailing spacing (SD-Turbo / SDXL-Turbo) ---------------------------------------------------
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("steps", FEW)
@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_trailing_spacing_matches_diffusers(name: str, steps: int, prediction: str) -> None:
    config = {**TURBO_CONFIG, "prediction_type": prediction}
    if name == "euler_a":  # stabilityai/sdxl-turbo ships EulerAncestralDiscreteScheduler, trailing
        config = {k: v for k, v in config.items() if k not in ("interpolation_type", "timestep_type")}
        config["_class_name"] = "EulerAncestralDiscreteScheduler"
    assert_matches_diffusers(name, config, steps)
    sched = make_scheduler(name, config)
    sched.set_timesteps(steps)
    # trailing starts at the top training step, which "leading" (SD 1.5's spacing) never reaches
    assert sched.timesteps[0].item() == 999
    leading = make_scheduler(name, {**config, "timestep_spacing": "leading"})
    leading.set_timesteps(steps)
    assert leading.timesteps[0].item() < 999


def test_turbo_one_step_starts_from_the_top_sigma() -> None:
    sched = make_scheduler("euler", TURBO_CONFIG)
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [999.0]
    assert sched.init_noise_sigma == pytest.approx(sched.sigmas[0].item())  # not sqrt(sigma^2 + 1)


# -- folder config -> name ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "config, name",
    [
        ({"_class_name": "LCMScheduler"}, "lcm"),
        ({"_class_name": "TCDScheduler"}, "tcd"),
        (TURBO_CONFIG, "euler"),
        ({"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"}, "euler_a"),
        ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": False}, "euler"),
        ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "dpmpp_2m_karras"),
        ({"_class_name": "LMSDiscreteScheduler"}, "lms"),
        ({"_class_name": "LMSDiscreteScheduler", "use_karras_sigmas": True}, "dpmpp_2m_karras"),
        ({"_class_name": "DDIMScheduler"}, "ddim"),
        ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
        ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "dpmpp_2m_karras"),
        ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": "yes"}, "dpmpp_2m"),
        (SD15_CONFIG, DEFAULT_SCHEDULER),  # PNDM: no sdfast equal
        ({"_class_name": "UniPCMultistepScheduler"}, DEFAULT_SCHEDULER),
        ({"_class_name": "lcmscheduler"}, DEFAULT_SCHEDULER),  # class names are exact
        ({"_class_name": 7}, DEFAULT_SCHEDULER),
        ({"_class_name": ["LCMScheduler"]}, DEFAULT_SCHEDULER),
        ({}, DEFAULT_SCHEDULER),
        (None, DEFAULT_SCHEDULER),
        ("LCMScheduler", DEFAULT_SCHEDULER),
    ],
)
def test_scheduler_for_config(config, name: str) -> None:
    assert scheduler_for_config(config) == name


@pytest.mark.parametrize(
    "config",
    [
        LCM_CONFIG,
        TCD_CONFIG,
        TURBO_CONFIG,
        {**SD15_CONFIG, "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True},
        {**SD15_CONFIG, "_class_name": "LMSDiscreteScheduler"},
        SD15_CONFIG,
        {**SD15_CONFIG, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
    ],
)
def test_the_chosen_scheduler_accepts_its_own_config(config: dict) -> None:
    # What the folder's default resolves to must then build and run on that very config.
    name = scheduler_for_config(config)
    assert name in SCHEDULERS
    sched = make_scheduler(name, config)
    sched.set_timesteps(4)
    assert len(sched.timesteps) == 4
