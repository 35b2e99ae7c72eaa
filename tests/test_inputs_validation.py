"""Bad input: a clear ValueError/FileNotFoundError in Python naming the argument, the rule, the fix."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

import sdfast
from sdfast.errors import InvalidArgument, MissingFile
from sdfast.model.info import resolve_model

BAD_REQUESTS = [
    (dict(height=65), "height", "multiple of 8"),
    (dict(width=60), "width", "between 64 and 2048"),
    (dict(height=4096), "height", "between 64 and 2048"),
    (dict(steps=0), "steps", "1 to 1000"),
    (dict(steps=1001), "steps", "1 to 1000"),
    (dict(guidance_scale=float("nan")), "guidance_scale", "finite"),
    (dict(guidance_scale=float("inf")), "guidance_scale", "finite"),
    (dict(guidance_scale=-1.0), "guidance_scale", ">= 0"),
    (dict(prompt=[]), "prompt", "empty"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt", "one entry per prompt"),
    (dict(scheduler="pndm"), "scheduler", "lms, euler, euler_a, ddim, dpmpp_2m, dpmpp_2m_karras"),
    (dict(seed=-1), "seed", "2**64-1"),
]


@pytest.mark.parametrize("kwargs,arg,rule", BAD_REQUESTS, ids=[f"{a}-{i}" for i, (_, a, _) in enumerate(BAD_REQUESTS)])
def test_bad_request_raises_value_error_naming_argument_and_rule(tiny_pipe, kwargs, arg, rule):
    kwargs = {"prompt": "a cat", "steps": 2} | kwargs
    with pytest.raises(ValueError) as e:
        tiny_pipe.generate(**kwargs)
    assert isinstance(e.value, InvalidArgument)
    assert str(e.value).startswith(f"{arg}:")
    assert rule in str(e.value)


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.2])
def test_strength_outside_zero_one_is_refused(tiny_pipe, tmp_path, strength):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    with pytest.raises(InvalidArgument, match=r"^strength: must be in \(0, 1\]"):
        tiny_pipe.generate("a", image=tmp_path / "init.png", strength=strength, steps=2)


def test_strength_too_small_for_steps_names_the_fix(tiny_pipe, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    with pytest.raises(InvalidArgument, match="raise --steps or --strength"):
        tiny_pipe.generate("a", image=tmp_path / "init.png", strength=0.1, steps=5)


def test_unreadable_init_image(tiny_pipe, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(InvalidArgument, match="^image: .* is not a readable image"):
        tiny_pipe.generate("a", image=tmp_path / "bad.png", steps=2)
    with pytest.raises(FileNotFoundError, match="^image: no file"):
        tiny_pipe.generate("a", image=tmp_path / "missing.png", steps=2)


def test_missing_model_path():
    with pytest.raises(MissingFile, match="^model: no folder at"):
        sdfast.load("/nonexistent/model/folder")


@pytest.mark.parametrize("missing", ["unet/config.json", "scheduler/scheduler_config.json", "tokenizer/merges.txt"])
def test_model_folder_missing_a_file_names_it(tiny_info, tmp_path, missing):
    broken = tmp_path / "model"
    shutil.copytree(tiny_info.path, broken)
    (broken / missing).unlink()
    with pytest.raises(FileNotFoundError) as e:
        resolve_model(broken)
    assert missing in str(e.value)


def test_model_folder_without_weights_names_the_component(tiny_info, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_info.path, broken)
    for f in (broken / "vae").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(MissingFile, match="vae has no weights file"):
        resolve_model(broken)


def test_invalid_json_config_is_a_clear_error(tiny_info, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_info.path, broken)
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        resolve_model(broken)


def test_unknown_backend_device_dtype(tiny_info):
    with pytest.raises(InvalidArgument, match="^backend: unknown 'magic'"):
        sdfast.load(tiny_info.path, backend="magic")
    with pytest.raises(InvalidArgument, match="^dtype: 'fp8'"):
        sdfast.load(tiny_info.path, dtype="fp8")
    with pytest.raises(InvalidArgument, match="^device: "):
        sdfast.load(tiny_info.path, device="tpu")


def test_long_prompt_is_truncated_with_warning_quoting_dropped_text(tiny_pipe, caplog):
    limit = tiny_pipe.info.max_tokens
    head = "red " * (limit - 2)  # BOS + these + EOS fill the limit exactly ("red" is one token)
    assert len(tiny_pipe.tokenizer(head).input_ids) == limit
    with caplog.at_level(logging.WARNING, logger="sdfast.runtime"):
        ids = tiny_pipe.tokenize([head + "blue square on green"])
    assert ids.shape == (1, limit)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "truncated" in msgs[0]  # one warning, ours (transformers' is silenced)
    assert "'blue square on green'" in msgs[0]  # exactly the dropped tail is quoted


def test_short_prompt_logs_nothing(tiny_pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="sdfast.runtime"):
        tiny_pipe.tokenize(["a red circle"])
    assert not caplog.records


def test_sizes_come_from_configs_not_literals(tiny_info):
    # The tiny model: unet sample_size 8 × VAE factor 8 = 64; 77 tokens from its tokenizer config.
    assert tiny_info.vae_scale_factor == 2 ** (len(tiny_info.vae_config["block_out_channels"]) - 1)
    assert tiny_info.native_size == tiny_info.unet_config["sample_size"] * tiny_info.vae_scale_factor
    cfg = json.loads((tiny_info.path / "tokenizer" / "tokenizer_config.json").read_text())
    assert tiny_info.max_tokens == cfg["model_max_length"]


@pytest.mark.parametrize("has_bf16,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_detected_not_assumed(monkeypatch, has_bf16, expected):
    import torch

    from sdfast import hardware
    from sdfast.model.components import Precision

    monkeypatch.setattr(hardware, "cpu_bf16_supported", lambda: has_bf16)
    assert Precision.resolve("auto", torch.device("cpu")).value == expected
    assert Precision.resolve("auto", torch.device("cuda")).value == "fp16"
    assert Precision.resolve("bf16", torch.device("cpu")).value == "bf16"
