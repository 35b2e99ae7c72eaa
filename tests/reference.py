"""Diffusers as the external reference: its scheduler for each of our names."""

from __future__ import annotations


def diffusers_scheduler(name: str, config: dict):
    import diffusers as d

    classes = {
        "lms": (d.LMSDiscreteScheduler, {}),
        "euler": (d.EulerDiscreteScheduler, {}),
        "euler_a": (d.EulerAncestralDiscreteScheduler, {}),
        "ddim": (d.DDIMScheduler, {}),
        "dpmpp_2m": (d.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        "dpmpp_2m_karras": (d.DPMSolverMultistepScheduler,
                            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    }
    cls, kw = classes[name]
    return cls.from_config(config, **kw)
