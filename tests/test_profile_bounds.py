"""Exported engines serve their shape profile from its minimum to its maximum: a request below
the minimum batch or side is refused before any work, one exactly at the minimum runs.

The export here serves batch 2..3 and sides 96..128, so the smallest request the API allows
(64 px, one image) lies below it while staying a valid request for the eager backend.
"""

from __future__ import annotations

import pytest

import sdfast
from sdfast.cli import main
from sdfast.errors import InvalidArgument

pytest.importorskip("onnxruntime")

MIN_BATCH, MAX_BATCH = 2, 3
MIN_SIDE, MAX_SIDE = 96, 128
BELOW_SIDE = 80  # a multiple of 16 (the tiny U-Net's side grid), so only the profile can refuse it


@pytest.fixture(scope="module")
def bounded_export(tiny_info, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "engines"
    rc = main(["export", "--model", str(tiny_info.path), "--out", str(out), "--format", "onnx",
               "--precision", "fp32", "--batch", str(MIN_BATCH), "--min-batch", str(MIN_BATCH),
               "--max-batch", str(MAX_BATCH), "--height", str(MIN_SIDE), "--width", str(MIN_SIDE),
               "--min-size", str(MIN_SIDE), "--max-size", str(MAX_SIDE)])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def bounded_pipe(tiny_info, bounded_export):
    return sdfast.load(tiny_info.path, backend="onnxruntime", engines=bounded_export)


@pytest.fixture
def engine_calls(bounded_pipe, monkeypatch):
    """Names of the engines called; the engines stay the pipeline's own objects (their profile
    is what the check reads), only their class's __call__ is wrapped."""
    calls: list[str] = []
    for cls in {type(e) for e in bounded_pipe.engines.values()}:
        real = cls.__call__

        def spy(self, *args, _real=real, **kwargs):
            calls.append(self.spec.name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)
    return calls


@pytest.mark.parametrize("req, reason", [
    (dict(prompt=["a red circle"] * (MIN_BATCH - 1)), f"batch {MIN_BATCH - 1} is outside"),
    (dict(height=BELOW_SIDE), f"height {BELOW_SIDE} is outside"),
    (dict(width=BELOW_SIDE), f"width {BELOW_SIDE} is outside"),
    (dict(prompt=["a red circle"], height=64, width=64), "batch 1 is outside"),
], ids=["batch-below-min", "height-below-min", "width-below-min", "everything-below-min"])
@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["guided", "unguided"])
def test_request_below_the_profile_minimum_is_refused_before_any_work(bounded_pipe, engine_calls, req, reason,
                                                                       guidance):
    kw = dict(prompt=["a red circle"] * MIN_BATCH, height=MIN_SIDE, width=MIN_SIDE) | req
    with pytest.raises(InvalidArgument, match="outside the exported profile") as e:
        bounded_pipe.generate(kw.pop("prompt"), steps=1, guidance_scale=guidance, **kw)
    assert reason in str(e.value)
    assert engine_calls == []  # refused before the text encoder ran


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["guided", "unguided"])
def test_request_exactly_at_the_profile_minimum_runs(bounded_pipe, engine_calls, guidance):
    out = bounded_pipe.generate(["a red circle", "a blue square"], height=MIN_SIDE, width=MIN_SIDE, steps=1,
                                guidance_scale=guidance)
    assert [im.size for im in out.images] == [(MIN_SIDE, MIN_SIDE)] * MIN_BATCH
    assert {"text_encoder", "unet", "vae_decoder"} <= set(engine_calls)


def test_request_at_the_profile_maximum_runs(bounded_pipe):
    out = bounded_pipe.generate(["a"] * MAX_BATCH, height=MAX_SIDE, width=MAX_SIDE, steps=1)
    assert [im.size for im in out.images] == [(MAX_SIDE, MAX_SIDE)] * MAX_BATCH


def test_cli_refuses_a_request_below_the_minimum_with_exit_2(tiny_info, bounded_export, tmp_path, capsys):
    out = tmp_path / "o.png"
    prompts = ["a red circle"] * MIN_BATCH  # several prompts make a batch
    rc = main(["generate", *prompts, "--model", str(tiny_info.path), "--backend", "onnxruntime",
               "--engines", str(bounded_export), "--height", "64",
               "--width", str(MIN_SIDE), "--steps", "1", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "height 64 is outside" in err[0] and "--min-height 64" in err[0]  # names the fix
    assert not list(tmp_path.iterdir())
