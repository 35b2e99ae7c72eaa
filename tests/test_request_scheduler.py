"""The default scheduler comes from the model folder: with none named, the one its
scheduler_config.json asks for (lms where sdfast has no equal of the class); a named one wins."""

from __future__ import annotations

import dataclasses
import json
import shutil

import torch

from sdfast.cli import main
from sdfast.media import read_png_metadata
from sdfast.request import Request


def with_scheduler(info, cls: str):
    return dataclasses.replace(info, scheduler_config={**info.scheduler_config, "_class_name": cls})


def test_the_folders_scheduler_is_the_default_and_a_named_one_wins(tiny_info):
    assert tiny_info.scheduler_config["_class_name"] == "PNDMScheduler"  # no sdfast equal: lms
    assert Request.build(tiny_info, prompt="x").scheduler == "lms"
    for cls, name in (("EulerDiscreteScheduler", "euler"), ("DDIMScheduler", "ddim"),
                      ("EulerAncestralDiscreteScheduler", "euler_a")):
        info = with_scheduler(tiny_info, cls)
        assert Request.build(info, prompt="x").scheduler == name
        assert Request.build(info, prompt="x", scheduler="dpmpp_2m").scheduler == "dpmpp_2m"


def test_the_cli_runs_the_folders_scheduler(tiny_info, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_info.path, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "EulerDiscreteScheduler"
    cfg_path.write_text(json.dumps(cfg))
    common = ["generate", "a red circle on a blue background", "--model", str(folder), "--steps", "3", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "default.png")]) == 0
    assert main([*common, "--scheduler", "euler", "--out", str(tmp_path / "euler.png")]) == 0
    assert main([*common, "--scheduler", "lms", "--out", str(tmp_path / "lms.png")]) == 0
    assert read_png_metadata(tmp_path / "default.png")["scheduler"] == "euler"
    assert read_png_metadata(tmp_path / "lms.png")["scheduler"] == "lms"

    def pixels(name):
        import numpy as np
        from PIL import Image

        with Image.open(tmp_path / name) as im:
            return torch.from_numpy(np.asarray(im).copy())

    assert torch.equal(pixels("default.png"), pixels("euler.png"))  # really ran euler, not only recorded it
    assert not torch.equal(pixels("default.png"), pixels("lms.png"))
