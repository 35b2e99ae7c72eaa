"""The command line end to end: PNG + metadata, step frames, animation, and exit 2 on bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdfast.cli import main
from sdfast.media import read_png_metadata


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "sdfast.cli", *args], capture_output=True, text=True, env=env)


def test_generate_writes_png_with_metadata_frames_and_gif(tiny_info, tmp_path, tiny_pipe):
    out, frames, gif = tmp_path / "img.png", tmp_path / "frames", tmp_path / "anim.gif"
    code = main(["generate", "a red circle", "--model", str(tiny_info.path), "--steps", "4", "--seed", "9",
                 "--negative-prompt", "blue", "--scheduler", "euler", "--dtype", "fp32", "--out", str(out),
                 "--save-steps", str(frames), "--animation", str(gif), "--quiet"])
    assert code == 0
    meta = read_png_metadata(out)
    assert meta["prompt"] == "a red circle" and meta["negative_prompt"] == "blue"
    assert (meta["seed"], meta["steps"], meta["scheduler"], meta["guidance_scale"]) == (9, 4, "euler", 7.5)
    assert (meta["height"], meta["width"], meta["backend"]) == (64, 64, "torch")
    assert meta["model"] == tiny_info.path.name
    with Image.open(out) as im:
        assert im.text["prompt"] == "a red circle"  # plain tEXt chunks too, for other viewers
        pixels = np.asarray(im.convert("RGB"))
    assert sorted(p.name for p in frames.iterdir()) == [f"step-{k:04d}.png" for k in range(4)]
    with Image.open(gif) as im:
        assert im.n_frames >= 4
    # The CLI image is the library image for the same request.
    ref = tiny_pipe.generate("a red circle", negative_prompt="blue", steps=4, seed=9, scheduler="euler")
    assert np.array_equal(pixels, np.asarray(ref.images[0]))


def test_generate_mp4_when_ffmpeg_is_available(tiny_info, tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    mp4 = tmp_path / "anim.mp4"
    assert main(["generate", "x", "--model", str(tiny_info.path), "--steps", "2", "--out",
                 str(tmp_path / "o.png"), "--animation", str(mp4), "--quiet"]) == 0
    assert mp4.stat().st_size > 0 and mp4.read_bytes()[4:8] == b"ftyp"


def test_batch_of_prompts_writes_numbered_files(tiny_info, tmp_path):
    assert main(["generate", "-p", "a", "--prompt", "b", "--model", str(tiny_info.path), "--steps", "2",
                 "--out", str(tmp_path / "o.png"), "--quiet"]) == 0
    assert read_png_metadata(tmp_path / "o-1.png")["prompt"] == "b"
    assert (tmp_path / "o-0.png").is_file() and not (tmp_path / "o.png").exists()


def test_num_images_writes_one_file_per_image(tiny_info, tmp_path):
    assert main(["generate", "a cat", "--num-images", "2", "--model", str(tiny_info.path), "--steps", "2",
                 "--out", str(tmp_path / "o.png"), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o-0.png", "o-1.png"]
    assert read_png_metadata(tmp_path / "o-1.png")["batch_index"] == 1


def test_unquoted_prompt_words_are_one_prompt(tiny_info, tmp_path, capsys):
    # `sdfast generate a red circle`: the shell split one prompt; it must not become a batch of 3.
    assert main(["generate", "a", "red", "circle", "--model", str(tiny_info.path), "--steps", "2",
                 "--out", str(tmp_path / "o.png")]) == 0
    assert read_png_metadata(tmp_path / "o.png")["prompt"] == "a red circle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png"]
    line = capsys.readouterr().out
    assert "chosen by --dtype auto" in line  # the precision auto picked is said, not hidden


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--height", "65"], "height: must be a multiple of 8"),
        (["--steps", "0"], "steps: must be an integer from 1 to 1000"),
        (["--guidance-scale", "nan"], "guidance_scale: must be a finite number"),
        (["--guidance-scale", "-2"], "guidance_scale: must be a finite number >= 0"),
        (["--init-image", "/nonexistent.png"], "image: no file"),
        (["--model", "/nonexistent/folder"], "model: no folder"),
        (["--animation", "x.avi"], "animation: 'x.avi' must end in .gif or .mp4"),
        (["--out", "x.jpg"], "out: 'x.jpg' must end in .png"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(tiny_info, tmp_path, args, needle):
    out = tmp_path / "o.png"
    argv = ["generate", "a cat", "--model", str(tiny_info.path), "--steps", "2", "--out", str(out),
            "--save-steps", str(tmp_path / "frames"), "--quiet"]
    r = run_cli(*argv, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert needle in lines[0]
    assert not out.exists() and not (tmp_path / "frames").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_unknown_scheduler_is_an_argparse_error_listing_choices(tiny_info):
    r = run_cli("generate", "x", "--model", str(tiny_info.path), "--scheduler", "pndm")
    assert r.returncode == 2
    assert "lms" in r.stderr and "dpmpp_2m_karras" in r.stderr


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--negative-prompt", "--guidance-scale", "--save-steps", "--animation", "--init-image"):
        assert flag in text
    # every flag the help names exists (the old text spoke of a --prompt flag that did not)
    import re

    from sdfast.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    parser_flags = {f for a in sub._actions for f in a.option_strings}
    assert set(re.findall(r"(?<![\w-])(--[a-z][\w-]+)", text)) <= parser_flags


def test_info_json_runs(capsys):
    assert main(["info", "--json"]) == 0
    assert '"builtin_models"' in capsys.readouterr().out


def test_default_dtype_is_auto_and_recorded(tiny_info, tmp_path):
    from sdfast.hardware import cpu_bf16_supported

    assert main(["generate", "x", "--model", str(tiny_info.path), "--steps", "2", "--out", str(tmp_path / "o.png"),
                 "--quiet"]) == 0
    assert read_png_metadata(tmp_path / "o.png")["dtype"] == ("bf16" if cpu_bf16_supported() else "fp32")


def test_auto_dtype_takes_the_exported_precision(onnx_dynamic, tiny_info):
    import sdfast

    pipe = sdfast.load(tiny_info, backend="onnxruntime", engines=onnx_dynamic, dtype="auto")
    assert pipe.precision.value == "fp32"
