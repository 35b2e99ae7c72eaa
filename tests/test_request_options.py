"""The request surface stated once: ``Request.build``'s keywords and defaults are what
``Pipeline.generate`` takes and what the CLI's flags default to; ``load`` names the export
folder ``engines_dir`` and reads its manifest once."""

from __future__ import annotations

import inspect

import pytest

from sdfast.cli import build_parser
from sdfast.errors import InvalidArgument
from sdfast.request import DEFAULTS, Request
from sdfast.runtime import Pipeline, load

#: CLI flag dest -> Request.build keyword, for the options the CLI takes
CLI = {"steps": "steps", "guidance_scale": "guidance_scale", "seed": "seed", "scheduler": "scheduler",
       "strength": "strength", "num_images": "num_images_per_prompt", "long_prompt": "long_prompt",
       "negative_prompt": "negative_prompt", "height": "height", "width": "width"}


def test_defaults_are_request_builds_keywords():
    params = inspect.signature(Request.build).parameters
    assert set(DEFAULTS) == {n for n, p in params.items() if p.default is not inspect.Parameter.empty}
    assert DEFAULTS["steps"] == params["steps"].default and DEFAULTS["long_prompt"] == "chunk"


def test_cli_defaults_come_from_request():
    args = build_parser(["generate"]).parse_args(["generate", "a red circle"])
    for dest, key in CLI.items():
        assert getattr(args, dest) == DEFAULTS[key], dest


def test_generate_forwards_options_with_requests_defaults(tiny_pipe, tiny_info):
    out = tiny_pipe.generate("a red circle on a blue background", steps=2, seed=3)
    assert out.request == Request.build(tiny_info, prompt="a red circle on a blue background", steps=2, seed=3)
    # no option restated on generate: its keywords are the run's own, the rest go to Request.build
    own = {n for n in inspect.signature(Pipeline.generate).parameters if n not in ("self", "options")}
    assert own == {"prompt", "callback", "progress", "profile", "partial_images", "on_partial"}


def test_generate_refuses_an_unknown_option_naming_it(tiny_pipe):
    with pytest.raises(InvalidArgument, match="stepz: not an option of generate"):
        tiny_pipe.generate("a red circle", stepz=2)
    with pytest.raises(InvalidArgument, match="steps"):  # a near miss of a real option is still checked
        tiny_pipe.generate("a red circle", steps=0)


def test_engines_dir_and_its_old_name_given_twice_is_refused(tiny_info, tmp_path):
    with pytest.raises(InvalidArgument, match="engines_dir: given twice"):
        load(tiny_info, engines_dir=tmp_path / "a", engines=tmp_path / "b")
