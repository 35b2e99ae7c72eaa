"""`sdfast generate` never silently replaces a file it did not write: an existing --out that is
not an sdfast PNG is refused before any work unless --force; its own PNGs are replaced."""

from __future__ import annotations

from PIL import Image

from sdfast.cli import main
from sdfast.media import read_png_metadata


def argv(tiny_info, out, *extra):
    return ["generate", "a red circle on a blue background", "--model", str(tiny_info.path), "--steps", "2",
            "--out", str(out), "--quiet", *extra]


def test_a_file_sdfast_did_not_write_is_kept_unless_forced(tiny_info, tmp_path, capsys):
    out = tmp_path / "out.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)  # a user's own PNG (no sdfast metadata)
    before = out.read_bytes()
    assert main(argv(tiny_info, out)) == 2
    err = capsys.readouterr().err
    assert "out:" in err and "sdfast did not write it" in err and "--force" in err
    assert out.read_bytes() == before
    out.write_text("not a png at all")
    assert main(argv(tiny_info, out)) == 2 and out.read_text() == "not a png at all"
    assert main(argv(tiny_info, out, "--force")) == 0
    assert read_png_metadata(out)["steps"] == 2


def test_its_own_png_is_replaced(tiny_info, tmp_path):
    out = tmp_path / "out.png"
    assert main(argv(tiny_info, out, "--seed", "1")) == 0
    assert main(argv(tiny_info, out, "--seed", "2")) == 0  # no --force needed
    assert read_png_metadata(out)["seed"] == 2


def test_each_image_of_a_batch_is_checked(tiny_info, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "out-1.png")
    assert main(argv(tiny_info, tmp_path / "out.png", "-n", "2")) == 2
    assert not (tmp_path / "out-0.png").exists()
