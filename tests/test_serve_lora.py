"""Per-request LoRAs in `sdfast serve`: names from the server's --lora-dir only (never
a path), each request's PNG and pixels those of the library with the same set, requests with
different sets never in one loop, the swap time in /metrics."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from lora_files import make_lora, sd_layers
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from test_serve import STEPS, client, generate, serving  # noqa: E402

import sdfast  # noqa: E402
from sdfast.errors import InvalidArgument  # noqa: E402
from sdfast.serve import ImageService, ServeConfig  # noqa: E402


@pytest.fixture(scope="module")
def lora_pipe(tiny_info):
    return sdfast.load(tiny_info.path)  # its own: the server changes its LoRA set


@pytest.fixture(scope="module")
def lora_dir(lora_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    mods = lora_pipe._lora_modules()
    make_lora(folder / "style-a.safetensors", mods, sd_layers(), "kohya", seed=31)
    make_lora(folder / "style_b.safetensors", mods, sd_layers(), "peft", seed=32, alpha=None)
    return folder


@pytest.fixture(scope="module")
def service(lora_pipe, lora_dir):
    return ImageService(lora_pipe, ServeConfig(lora_dir=str(lora_dir), max_loras=2))


def png_meta(data: bytes) -> dict:
    return json.loads(Image.open(io.BytesIO(data)).info["sdfast"])


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_requests_with_loras_equal_the_library_and_the_base_comes_back(lora_pipe, lora_dir):
    a, b = lora_dir / "style-a.safetensors", lora_dir / "style_b.safetensors"
    with serving(lora_pipe, lora_dir=str(lora_dir), batch_invariance="allow") as (url, service):
        c = client(url)
        base = generate(c, seed=4)
        with_a = generate(c, seed=4, loras="style-a:0.7")
        with_both = generate(c, seed=4, loras="style-a:0.7, style_b")
        base_again = generate(c, seed=4)
        metrics = httpx.get(f"{url}/metrics").text
        health = httpx.get(f"{url}/health").json()
    lib = {name: lora_pipe.generate("a red circle", seed=4, steps=STEPS, loras=loras)
           for name, loras in (("base", []), ("a", [(a, 0.7)]), ("both", [(a, 0.7), (b, 1.0)]))}
    lora_pipe.set_loras([])
    for data, name in ((base, "base"), (with_a, "a"), (with_both, "both"), (base_again, "base")):
        assert np.array_equal(pixels(data), np.asarray(lib[name].images[0])), name
        assert png_meta(data).get("loras") == (lib[name].loras or None), name
    assert not np.array_equal(pixels(base), pixels(with_a)) and not np.array_equal(pixels(with_a), pixels(with_both))
    assert [lo["name"] for lo in png_meta(with_both)["loras"]] == ["style-a", "style_b"]
    swaps = [line for line in metrics.splitlines() if line.startswith("sdfast_lora_swap_seconds_count")]
    assert swaps and float(swaps[0].split()[-1]) == 3  # base -> a -> a+b -> base
    assert health["loras"] == ["style-a", "style_b"]


def test_requests_with_other_sets_never_share_a_loop(service):
    reqs = [service.parse({"prompt": "x", "size": "64x64", "loras": v}) for v in ("style-a", "style-a:1", "style-a:0.5",
                                                                                "style_b", "", None)]
    keys = [service._batch_key(r) for r in reqs]
    assert keys[0] == keys[1]  # the same set
    assert len({keys[0], keys[2], keys[3], keys[4]}) == 4
    assert keys[4] == keys[5]  # "" and no field: both the base model
    with pytest.raises(InvalidArgument, match="lora_key"):
        service.pipe.run_batch([reqs[0], reqs[3]])


@pytest.mark.parametrize("value,message", [
    ("../style-a", "is not a LoRA of this server"),
    ("/etc/passwd", "is not a LoRA of this server"),
    ("style-a.safetensors", "is not a LoRA of this server"),
    ("sub/style-a", "is not a LoRA of this server"),
    ("STYLE-A", "is not a LoRA of this server"),
    ("nope", "it serves style-a, style_b"),
    (3, "must be a string 'NAME"),
    ("style-a,style_b,style-a", "at most 2 per request"),
    ("style-a,style-a:0.5", "named twice"),
    ("style-a:x", "must be a number, like style-a:0.7"),
    ("style-a:10.5", "a LoRA scale must be a finite number from -10 to 10"),
    ("style-a:nan", "a LoRA scale must be a finite number"),
    ("style-a:", "must be a number"),
])
def test_bad_loras_fields_are_refused_naming_the_field(service, value, message):
    with pytest.raises(InvalidArgument, match=message) as e:
        service.parse({"prompt": "x", "size": "64x64", "loras": value})
    assert str(e.value).startswith("loras: ")


@pytest.mark.parametrize("value,want", [("style-a", [("style-a", 1.0)]), (" style-a : 0.5 ", [("style-a", 0.5)]),
                                        ("style-a:10,style_b:-10", [("style-a", 10.0), ("style_b", -10.0)]),
                                        ("", [])])
def test_the_nearest_good_loras_fields_are_taken(service, value, want):
    req = service.parse({"prompt": "x", "size": "64x64", "loras": value})
    assert [(lo.file.name, lo.scale) for lo in req.loras] == want


def test_a_server_without_a_lora_dir_refuses_the_field(tiny_pipe):
    svc = ImageService(tiny_pipe, ServeConfig())
    with pytest.raises(InvalidArgument, match="started without --lora-dir"):
        svc.parse({"prompt": "x", "loras": "a"})
    assert svc.parse({"prompt": "x"}).loras == ()


def test_lora_dir_is_checked_at_start(lora_pipe, tmp_path, tiny_info):
    with pytest.raises(InvalidArgument, match="is not a folder"):
        ImageService(lora_pipe, ServeConfig(lora_dir=str(tmp_path / "none")))
    with pytest.raises(InvalidArgument, match="holds no .safetensors file"):
        ImageService(lora_pipe, ServeConfig(lora_dir=str(tmp_path)))
    make_lora(tmp_path / "a,b.safetensors", lora_pipe._lora_modules(), sd_layers(), "kohya")
    with pytest.raises(InvalidArgument, match=r"a,b\.safetensors: a served LoRA's name"):
        ImageService(lora_pipe, ServeConfig(lora_dir=str(tmp_path)))
    (tmp_path / "a,b.safetensors").unlink()
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 9, 3, 3),
               "lora_unet_conv_in.lora_up.weight": torch.zeros(32, 4, 1, 1)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(InvalidArgument, match=r"wide\.safetensors.*does not fit"):
        ImageService(lora_pipe, ServeConfig(lora_dir=str(tmp_path)))
    with pytest.raises(InvalidArgument, match="max-loras"):
        ImageService(lora_pipe, ServeConfig(max_loras=0))
