"""What a Python caller naturally passes, and what a model folder can hold.

- Numbers computed with numpy or torch (numpy scalars of every width, 0-d arrays and tensors, ints
  where a float is asked) are accepted wherever the value is valid, and give the same request as
  the plain Python number; everything else is still refused by name.
- A request object that is not one, and prompts that are not valid Unicode (a lone surrogate), are
  an InvalidArgument naming the argument, not an AttributeError or the tokenizer's TypeError.
- Every config key sdfast checks, at every kind of bad value, and every noise-schedule field, is
  one line naming the file: never a ZeroDivisionError, an allocator error or NaN latents later.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from adversarial import refused

from sdfast.errors import InvalidArgument
from sdfast.model.folder import CONFIG_KEYS
from sdfast.model.info import resolve_model
from sdfast.request import Request

# -- numbers from numpy and torch -------------------------------------------------------------

INTS = [np.int8(3), np.uint8(3), np.int64(3), np.uint64(3), np.array(3), torch.tensor(3),
        torch.tensor(3, dtype=torch.int16)]
FLOATS = [np.float16(0.5), np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5),
          torch.tensor(0.5, dtype=torch.float64)]


def build(info, **kw) -> Request:
    return Request.build(info, **({"prompt": "a cat", "steps": 2} | kw))


@pytest.mark.parametrize("value", INTS, ids=lambda v: f"{type(v).__name__}-{getattr(v, 'dtype', '')}")
@pytest.mark.parametrize("arg", ["seed", "steps", "num_images_per_prompt"])
def test_integer_scalars_of_numpy_and_torch_are_the_plain_int(tiny_info, arg, value):
    req = build(tiny_info, **{arg: value})
    assert getattr(req, arg) == 3
    assert type(req.seed) is int and type(req.steps) is int  # a Generator's manual_seed takes only int
    assert req == build(tiny_info, **{arg: 3})


def test_the_largest_seed_as_numpy_uint64_is_the_plain_int(tiny_info):
    assert build(tiny_info, seed=np.uint64(2**64 - 1)).seed == 2**64 - 1


@pytest.mark.parametrize("value", FLOATS, ids=lambda v: f"{type(v).__name__}-{getattr(v, 'dtype', '')}")
def test_float_scalars_of_numpy_and_torch_are_the_plain_float(tiny_info, value):
    req = build(tiny_info, guidance_scale=value * 15, guidance_until=value)
    assert (req.guidance_scale, req.guidance_until) == (7.5, 0.5)
    assert type(req.guidance_scale) is float


@pytest.mark.parametrize("arg,value,rule", [
    ("seed", np.float64(3.0), "must be an integer"), ("seed", torch.tensor(3.0), "must be an integer"),
    ("seed", torch.tensor([3]), "must be an integer"), ("seed", np.array([3]), "must be an integer"),
    ("seed", np.int64(-1), "must be an integer from 0"), ("steps", np.bool_(True), "must be an integer"),
    ("steps", torch.tensor(True), "must be an integer"), ("steps", torch.tensor(1001), "from 1 to 1000"),
    ("guidance_scale", torch.tensor([7.5]), "finite number"), ("guidance_scale", np.float32("nan"), "finite"),
    ("guidance_scale", torch.tensor(100.5), "<= 100"), ("guidance_scale", np.bool_(True), "finite number"),
])
def test_near_miss_scalars_are_still_refused_by_name(tiny_info, arg, value, rule):
    with pytest.raises(InvalidArgument, match=rf"^{arg}: .*{rule}"):
        build(tiny_info, **{arg: value})


def test_a_numpy_seed_generates_the_plain_seeds_image(tiny_pipe):
    a = tiny_pipe.generate("a red circle on a blue background", steps=2, seed=np.uint64(5),
                           guidance_scale=np.float32(7.5)).images[0]
    b = tiny_pipe.generate("a red circle on a blue background", steps=2, seed=5, guidance_scale=7.5).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("req", [None, "a cat", {"prompt": "a cat"}])
def test_run_with_something_not_a_request_names_it(tiny_pipe, req):
    with pytest.raises(InvalidArgument, match=r"^req: must be a Request but is "):
        tiny_pipe.run(req)
    with pytest.raises(InvalidArgument, match=r"^req: must be a Request"):
        tiny_pipe.run_batch([build(tiny_pipe.info), req])


@pytest.mark.parametrize("kw,arg", [
    ({"prompt": "a red \ud800 circle"}, "prompt"),
    ({"prompt": ["a cat", "a \udfff dog"]}, r"prompt\[1\]"),
    ({"negative_prompt": "\udc80"}, "negative_prompt"),
])
def test_a_lone_surrogate_is_refused_naming_where_it_is(tiny_info, kw, arg):
    with pytest.raises(InvalidArgument, match=rf"^{arg}: holds a lone surrogate U\+D[89A-F][0-9A-F]{{2}} at character"):
        build(tiny_info, **kw)


def test_a_paired_surrogate_spelling_of_an_emoji_is_valid_text(tiny_info):
    emoji = "\ud83d\ude00".encode("utf-16", "surrogatepass").decode("utf-16")  # one code point, U+1F600
    assert build(tiny_info, prompt=f"a cat {emoji}").prompts == [f"a cat {emoji}"]


# -- model folder configs ---------------------------------------------------------------------

BAD_VALUES = {int: [0, -1, True, "8", 2.0], list: [[], [0], [-32], [True], "32", 32],
              (int, list): [0, -1, [], [0], True, "8"], (int, float): [0, -0.5, "0.18", True]}


def _key_cases():
    for part, keys in CONFIG_KEYS.items():
        for key, (typ, _) in keys.items():
            for bad in BAD_VALUES[typ]:
                yield part, key, bad


@pytest.fixture(scope="module")
def folder_copy(tmp_path_factory, tiny_info):
    root = tmp_path_factory.mktemp("cfg") / "model"
    shutil.copytree(tiny_info.path, root)
    return root


CONFIG_FILES = {"text_encoder": "text_encoder/config.json", "unet": "unet/config.json", "vae": "vae/config.json",
                "scheduler": "scheduler/scheduler_config.json", "tokenizer": "tokenizer/tokenizer_config.json"}


@pytest.mark.parametrize("part,key,bad", [c for c in _key_cases() if c[0] in CONFIG_FILES])
def test_every_checked_config_key_at_every_bad_kind_is_refused_naming_the_file(folder_copy, part, key, bad):
    path = folder_copy / CONFIG_FILES[part]
    good = path.read_text()
    try:
        path.write_text(json.dumps({**json.loads(good), key: bad}))
        with pytest.raises(InvalidArgument) as e:
            resolve_model(str(folder_copy))
        assert str(path) in str(e.value) and key in str(e.value) and "\n" not in str(e.value), e.value
    finally:
        path.write_text(good)


@pytest.mark.parametrize("part,update,needle", [
    ("unet", {"block_out_channels": [32, 48], "norm_num_groups": 32}, "not all multiples of norm_num_groups = 32"),
    ("unet", {"block_out_channels": [30, 60]}, "not all multiples of norm_num_groups"),
    ("vae", {"block_out_channels": [33], "norm_num_groups": 32}, "not all multiples"),
    ("text_encoder", {"hidden_size": 30, "num_attention_heads": 4}, "hidden_size = 30, not all multiples"),
])
def test_dims_a_layer_cannot_be_built_from_are_refused(folder_copy, part, update, needle):
    path = folder_copy / CONFIG_FILES[part]
    good = path.read_text()
    try:
        path.write_text(json.dumps({**json.loads(good), **update}))
        with pytest.raises(InvalidArgument, match=needle):
            resolve_model(str(folder_copy))
    finally:
        path.write_text(good)


def test_the_tiny_models_dims_sit_on_the_accepted_side(tiny_info):
    cfg = tiny_info.unet_config
    groups = cfg.get("norm_num_groups", 32)
    assert all(c % groups == 0 for c in cfg["block_out_channels"])  # the check above is not vacuous here


SCHEDULE_CASES = [
    ({"num_train_timesteps": 10_001}, "num_train_timesteps must be an integer from 1 to 10000"),
    ({"num_train_timesteps": 10**12}, "num_train_timesteps must be"),
    ({"beta_schedule": "cosine"}, "beta_schedule must be one of"),
    ({"beta_start": 0.0}, "beta_start must be a number in (0, 1)"),
    ({"beta_end": 1.0}, "beta_end must be a number in (0, 1)"),
    ({"beta_end": "0.012"}, "beta_end must be a number"),
    ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start (0.02) must not exceed beta_end (0.01)"),
    ({"timestep_spacing": "middle"}, "timestep_spacing must be one of"),
    ({"timestep_spacing": 3}, "timestep_spacing must be one of"),
    ({"steps_offset": -1}, "steps_offset must be an integer from 0 to 999"),
    ({"steps_offset": 1000}, "steps_offset must be an integer from 0 to 999"),
    ({"steps_offset": 1.5}, "steps_offset must be an integer"),
    ({"trained_betas": []}, "trained_betas must be a non-empty list of numbers"),
    ({"trained_betas": "0.1"}, "trained_betas must be a non-empty list"),
    ({"trained_betas": [0.01] * 999}, "trained_betas has 999 values but num_train_timesteps is 1000"),
    ({"trained_betas": [0.01] * 999 + [1.0]}, "trained_betas must be values in (0, 1)"),
    ({"trained_betas": [0.01] * 999 + [float("nan")]}, "trained_betas must be values in (0, 1)"),
    ({"prediction_type": 3}, "prediction_type must be one of"),
]


@pytest.mark.parametrize("update,needle", SCHEDULE_CASES)
def test_a_noise_schedule_no_run_can_use_is_one_line_at_load(folder_copy, capsys, tmp_path, update, needle):
    path = folder_copy / CONFIG_FILES["scheduler"]
    good = path.read_text()
    try:
        path.write_text(json.dumps({**json.loads(good), **update}))
        line = refused(capsys, ["generate", "x", "--model", str(folder_copy), "--steps", "1", "--out",
                                str(tmp_path / "o.png"), "--quiet"], needle)
        assert str(path) in line
        assert not (tmp_path / "o.png").exists()
    finally:
        path.write_text(good)


@pytest.mark.parametrize("update", [
    {"num_train_timesteps": 10_000, "steps_offset": 9_999}, {"beta_start": 0.012, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2", "beta_start": 5.0}, {"trained_betas": [0.01] * 1000},
    {"timestep_spacing": "trailing", "steps_offset": 0},
])
def test_the_edges_of_each_schedule_rule_load(folder_copy, update):
    path = folder_copy / CONFIG_FILES["scheduler"]
    good = path.read_text()
    try:
        path.write_text(json.dumps({**json.loads(good), **update}))
        assert resolve_model(str(folder_copy)).scheduler_config[next(iter(update))] == next(iter(update.values()))
    finally:
        path.write_text(good)


@pytest.mark.parametrize("name,text", [
    ("vocab.json", "{not json"), ("vocab.json", "[1, 2]"), ("vocab.json", "{}"),
    ("merges.txt", "#version: 0.2\nabc\n"), ("merges.txt", b"\xff\xfe\x00garbage"),
    ("tokenizer.json", "{\"model\": 3}"), ("tokenizer.json", "{oops"),
])
def test_a_malformed_tokenizer_file_is_one_line_naming_the_folder(tiny_info, tmp_path, capsys, name, text):
    model = tmp_path / "model"
    shutil.copytree(tiny_info.path, model)
    target = model / "tokenizer" / name
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = refused(capsys, ["generate", "x", "--model", str(model), "--steps", "1", "--out",
                            str(tmp_path / "o.png"), "--quiet"], f"cannot load {model / 'tokenizer'}")
    assert "copy the tokenizer folder" in line
