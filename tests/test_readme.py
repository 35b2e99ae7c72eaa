"""README.md and the CLI agree: every command a newcomer copies from the README parses
with today's CLI, every install step names an extra that exists, and nothing is left out of the
walk (tests/test_readme_walk.py runs them all) without being listed with its reason."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest

from sdfast.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _walk_module():
    spec = importlib.util.spec_from_file_location("readme_walk", ROOT / "scripts" / "readme_walk.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


walk = _walk_module()
STEPS = walk.plan(README)
#: the README commands the walk does not run, each with why (GPU, hub download, the suite itself).
EXPECTED_SKIPS = {
    "python -m pytest -n 2",
    "sdfast generate 'a cat' --model ./stable-diffusion-v1-5 --height 512 --width 512 --dtype bf16",
}


def test_readme_has_commands_of_every_kind():
    kinds = {s.kind for s in STEPS}
    assert {"install", "run", "python", "skip"} <= kinds
    assert sum(s.kind == "run" for s in STEPS) >= 5


@pytest.mark.parametrize("command", [s.text for s in STEPS if s.text.startswith("sdfast ")])
def test_readme_sdfast_command_parses(command):
    argv = shlex.split(command.removesuffix(" &"))[1:]  # " &": the walk's server in the background
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse prints the reason on stderr
        pytest.fail(f"README command does not parse (exit {e.code}): {command}")
    assert args.command == argv[0]


def test_readme_install_steps_name_existing_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = []
    for s in STEPS:
        if s.kind != "install" or "pip" not in s.text:
            continue
        for arg in shlex.split(s.text):
            if arg.startswith(".["):
                named += arg[2:-1].split(",")
    assert named, "the README never installs an extra"
    assert set(named) <= set(extras), f"README names extras {set(named) - set(extras)} that pyproject lacks"


def test_readme_sections_that_need_onnx_install_it_first():
    # The export section once failed with "No module named 'onnx'" after the quick start.
    # The install has to come in the quick start or in the section itself, not in "run the tests".
    first = next(s for s in STEPS if s.kind == "run" and ("onnxruntime" in s.text or "--format onnx" in s.text))
    installs = [s.text for s in STEPS[:STEPS.index(first)] if s.text.startswith("pip install")
                and (s.section.startswith("Quick start") or s.section == first.section)]
    assert any("onnx" in t for t in installs), (first.section, installs)


def test_walk_skips_exactly_the_listed_commands():
    skipped = {s.text for s in STEPS if s.kind == "skip"}
    assert skipped == EXPECTED_SKIPS


def test_readme_python_blocks_compile():
    blocks = [s for s in STEPS if s.kind == "python"]
    assert blocks
    for s in blocks:
        compile(s.text, "README.md", "exec")


def test_walk_splits_chains_continuations_and_comments():
    block = walk.Block("bash", "a 'x y' && b --out o.png \\\n   --steps 2   # note\nsdfast generate p\n", 1)
    assert walk.commands(block) == [["a", "x y"], ["b", "--out", "o.png", "--steps", "2"], ["sdfast", "generate", "p"]]
    assert walk.output_paths(["sdfast", "generate", "p"]) == ("out.png",)
    assert walk.output_paths(["sdfast", "export", "--out", "d", "--json", "r.json"]) == ("d", "r.json")
    with pytest.raises(ValueError, match="plain && chains"):
        walk.commands(walk.Block("bash", "a | b\n", 1))


def test_walk_runs_a_trailing_ampersand_in_the_background_and_nothing_else():
    block = walk.Block("bash", "sdfast serve --port 8000 &\ncurl -o r.json http://x\n", 1)
    assert walk.commands(block) == [["sdfast", "serve", "--port", "8000", "&"], ["curl", "-o", "r.json", "http://x"]]
    (server, client) = walk.plan("```bash\n" + block.code + "```\n")
    assert server.text == "sdfast serve --port 8000 &" and server.outputs == ()  # a server writes nothing
    assert client.outputs == ("r.json",)
    for bad in ("a && sdfast serve &\n", "a & b\n"):  # a backgrounded chain, a & mid-line
        with pytest.raises(ValueError):
            walk.commands(walk.Block("bash", bad, 1))


def test_walk_install_check_names_what_is_missing():
    pyproject = {"project": {"dependencies": ["numpy>=1"], "optional-dependencies": {"x": ["surely-not-installed-pkg"]}}}
    assert walk.check_install(["pip", "install", "-e", "."], pyproject) == ""
    assert "surely-not-installed-pkg is not installed" in walk.check_install(["pip", "install", ".[x]"], pyproject)
    assert "extra [nope]" in walk.check_install(["pip", "install", "-e", ".[nope]"], pyproject)
    assert "README pins 0.0.1" in walk.check_install(["pip", "install", "numpy==0.0.1"], pyproject)


def test_walk_fails_an_example_that_draws_something_else(tmp_path):
    from sdfast import toy

    toy.render("circle", "red", "blue", rng=0).save(tmp_path / "c.png")
    right = walk.Step("sdfast generate 'a red circle on a blue background' --out c.png", "run")
    wrong = walk.Step("sdfast generate 'a yellow circle on a blue background' --quiet --out c.png", "run")
    other_model = walk.Step("sdfast generate 'a yellow circle on a blue background' --model x --out c.png", "run")
    assert walk._check_drawing(right, tmp_path) == ""
    assert walk._check_drawing(wrong, tmp_path) == "draws red on blue, the prompt says yellow on blue"
    assert walk._check_drawing(other_model, tmp_path) == ""
