"""The toy model's caption hint: a prompt it cannot draw gets one stderr line naming what it knows."""

from __future__ import annotations

import pytest

from sdfast.cli import main
from sdfast.toy import caption_hint


@pytest.mark.parametrize("prompt,hinted", [
    ("a red circle on a blue background", False),
    ("green square, white background", False),
    ("a red circel", True),  # near miss: the colour is known, the shape misspelt
    ("a cat", True),
    ("a circle", True),  # no colour
])
def test_generate_hints_only_at_prompts_the_toy_model_does_not_know(prompt, hinted, tmp_path, capsys):
    assert main(["generate", prompt, "--model", "tiny", "--steps", "1", "--out", str(tmp_path / "o.png"),
                 "--quiet"]) == 0  # a hint, never an error: the image is written either way
    assert (tmp_path / "o.png").exists()
    err = capsys.readouterr().err
    hints = [line for line in err.splitlines() if line.startswith("hint:")]
    assert len(hints) == (1 if hinted else 0), err
    if hinted:
        assert "circle, square or triangle" in hints[0] and "yellow" in hints[0] and repr(prompt) in hints[0]


def test_hint_names_what_is_missing():
    assert caption_hint("a red circel").endswith("names no shape it knows")
    assert caption_hint("a triangle").endswith("names no colour it knows")
    assert caption_hint("A WHITE Triangle on green") is None  # case does not matter
