"""`POST /v1/images/edits` and `stream: true`, through the official openai client where it can
send the request: what a product gets back is what the library makes for the same request."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image, ImageOps

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from test_serve import client, serving  # noqa: E402

from sdfast.request import Request  # noqa: E402
from sdfast.stream import Cancelled  # noqa: E402

STEPS = 4


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


@pytest.fixture(scope="module")
def source(tiny_pipe) -> Image.Image:
    return tiny_pipe.generate("a red circle", steps=STEPS, seed=0).images[0]  # 64x64


def hole_mask(size=(64, 64), box=(16, 16, 48, 48)) -> Image.Image:
    """OpenAI's kind of mask: the picture itself, opaque, with a transparent hole to repaint."""
    rng = np.random.default_rng(0)
    m = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert("RGBA")
    m.paste((0, 0, 0, 0), box)
    return m


def library(pipe, **kw):
    return pipe.run(Request.build(pipe.info, steps=STEPS, **kw)).images


# -- edits -----------------------------------------------------------------------------------
def test_the_openai_clients_edit_with_a_transparent_hole_mask_is_the_librarys_inpainting(tiny_pipe, source):
    mask = hole_mask()
    with serving(tiny_pipe) as (url, _):
        r = client(url).images.edit(image=("in.png", png(source), "image/png"), mask=("m.png", png(mask), "image/png"),
                                    prompt="a yellow circle", extra_body={"steps": STEPS, "seed": 7})
    got = decoded(r.data[0].b64_json)
    repaint = ImageOps.invert(mask.getchannel("A"))  # transparent → white: repaint
    want = library(tiny_pipe, prompt="a yellow circle", seed=7, image=source, mask=repaint)[0]
    assert same_pixels(got, want)
    assert got.info["inpainting"] == "latent blending" and float(got.info["strength"]) == 1.0
    # the mask's colours (noise here) do not matter, only its alpha: the library reads it so too
    assert same_pixels(got, library(tiny_pipe, prompt="a yellow circle", seed=7, image=source, mask=mask)[0])
    grey_noise = library(tiny_pipe, prompt="a yellow circle", seed=7, image=source, mask=mask.convert("L"))[0]
    assert not same_pixels(got, grey_noise)


def test_an_edit_without_a_mask_is_img2img_and_takes_strength(tiny_pipe, source):
    with serving(tiny_pipe) as (url, _):
        c = client(url)
        default = c.images.edit(image=("in.png", png(source), "image/png"), prompt="a blue square",
                                extra_body={"steps": STEPS, "seed": 3})
        half = c.images.edit(image=("in.png", png(source), "image/png"), prompt="a blue square",
                             extra_body={"steps": STEPS, "seed": 3, "strength": 0.5})
    assert same_pixels(decoded(default.data[0].b64_json),
                       library(tiny_pipe, prompt="a blue square", seed=3, image=source)[0])  # strength 0.8
    assert same_pixels(decoded(half.data[0].b64_json),
                       library(tiny_pipe, prompt="a blue square", seed=3, image=source, strength=0.5)[0])
    assert not same_pixels(decoded(default.data[0].b64_json), decoded(half.data[0].b64_json))


@pytest.mark.parametrize("size, want", [((96, 80), (96, 80)), ((100, 70), (96, 64)), ((1000, 500), (128, 64)),
                                        ((20, 20), (64, 64))])
def test_size_auto_is_the_images_own_fitted_to_the_limits(tiny_pipe, size, want):
    image = Image.new("RGB", size, (200, 30, 30))
    with serving(tiny_pipe) as (url, _):
        r = client(url).images.edit(image=("in.png", png(image), "image/png"), prompt="x", extra_body={"steps": 2})
    assert decoded(r.data[0].b64_json).size == want  # max side 128 (twice the native 64), multiples of 8


def test_n_edits_and_explicit_size(tiny_pipe, source):
    with serving(tiny_pipe) as (url, _):
        r = client(url).images.edit(image=("in.png", png(source), "image/png"), prompt="a cat", n=2, size="64x64",
                                    extra_body={"steps": STEPS, "seed": 1})
    a, b = (decoded(d.b64_json) for d in r.data)
    want = library(tiny_pipe, prompt=["a cat"] * 2, seed=1, image=source)
    assert same_pixels(a, want[0]) and same_pixels(b, want[1]) and not same_pixels(a, b)


def post_form(url: str, files=None, data=None, **kw):
    return httpx.post(f"{url}/v1/images/edits", files=files, data=data, timeout=60, **kw)


@pytest.mark.parametrize("files, data, param", [
    ("none", {"prompt": "x"}, "image"),
    ("none", {"prompt": "x", "image": "not a file"}, "image"),
    ("two", {"prompt": "x"}, "image"),
    ("bytes", {"prompt": "x"}, "image"),
    ("empty", {"prompt": "x"}, "image"),
    ("small-mask", {"prompt": "x"}, "mask"),
    ("ok", {"prompt": "x", "mask": "text"}, "mask"),
    ("ok", {"prompt": "x", "seed": "abc"}, "seed"),
    ("ok", {"prompt": "x", "seed": "1.5"}, "seed"),
    ("ok", {"prompt": "x", "guidance_scale": "lots"}, "guidance_scale"),
    ("ok", {"prompt": "x", "stream": "yes"}, "stream"),
    ("ok", {"prompt": "x", "strength": "1.5"}, "strength"),
    ("ok", {"prompt": "x", "strength": "nan"}, "strength"),
    ("ok", {"prompt": "x", "colour": "red"}, "colour"),
    ("ok", {"prompt": "x", "partial_images": "2"}, "partial_images"),
    ("ok", {}, "prompt"),
    ("ok", {"prompt": "x", "size": "100x100"}, "height"),
    ("extra-file", {"prompt": "x"}, "seed"),
    ("twice", {"prompt": "x"}, "seed"),
])
def test_bad_parts_are_a_400_naming_the_part(tiny_pipe, source, files, data, param):
    image = ("image", ("in.png", png(source), "image/png"))
    files = {
        "none": [("steps", (None, "2"))],  # (None, text): a text part, so the body is multipart
        "ok": [image],
        "two": [("image[]", ("a.png", png(source), "image/png")), ("image[]", ("b.png", png(source), "image/png"))],
        "bytes": [("image", ("in.png", b"\x89PNG not really", "image/png"))],
        "empty": [("image", ("in.png", b"", "image/png"))],
        "small-mask": [image, ("mask", ("m.png", png(hole_mask((32, 32), (8, 8, 16, 16))), "image/png"))],
        "extra-file": [image, ("seed", ("s.txt", b"1", "text/plain"))],
        "twice": [image, ("seed", (None, "1")), ("seed", (None, "2"))],
    }.get(files, files)
    with serving(tiny_pipe) as (url, service):
        r = post_form(url, files=files, data=data)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["code"] == "invalid_argument" and "\n" not in err["message"]
        assert service.ready  # and the server goes on
        ok = post_form(url, files=[image], data={"prompt": "x", "steps": "2"})
        assert ok.status_code == 200, ok.text


def test_a_json_body_is_refused_saying_what_an_edit_is(tiny_pipe):
    with serving(tiny_pipe) as (url, _):
        r = httpx.post(f"{url}/v1/images/edits", json={"prompt": "x"}, timeout=60)
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]


def test_the_upload_limit_holds_on_both_sides(tiny_pipe, source):
    body = png(source)
    files = [("image", ("in.png", body, "image/png"))]
    form = httpx.Request("POST", "http://x/v1/images/edits", files=files, data={"prompt": "x", "steps": "2"})
    size = len(form.read())
    with serving(tiny_pipe, max_upload_mb=size / (1 << 20)) as (url, _):  # exactly this form's size
        assert post_form(url, files=files, data={"prompt": "x", "steps": "2"}).status_code == 200
        over = post_form(url, files=files, data={"prompt": "x", "steps": "20"})  # one byte more
        assert over.status_code == 413 and "--max-upload-mb" in over.json()["error"]["message"]


def test_the_pixel_limit_is_read_from_the_header_on_both_sides(tiny_pipe):
    at = Image.new("RGB", (64, 64), (10, 200, 10))
    over = Image.new("RGB", (64, 65), (10, 200, 10))
    with serving(tiny_pipe, max_upload_pixels=64 * 64) as (url, _):
        ok = post_form(url, files=[("image", ("a.png", png(at), "image/png"))], data={"prompt": "x", "steps": "2"})
        assert ok.status_code == 200, ok.text
        r = post_form(url, files=[("image", ("a.png", png(over), "image/png"))], data={"prompt": "x", "steps": "2"})
        assert r.status_code == 400 and "--max-upload-pixels" in r.json()["error"]["message"]
        m = post_form(url, files=[("image", ("a.png", png(at), "image/png")),
                                  ("mask", ("m.png", png(over.convert("RGBA")), "image/png"))],
                      data={"prompt": "x", "steps": "2"})
        assert m.status_code == 400 and m.json()["error"]["param"] == "mask"


def test_concurrent_edits_each_get_their_own_answer(tiny_pipe, source):
    jobs = [(f"prompt {i}", 100 + i, source if i % 2 else source.transpose(Image.FLIP_LEFT_RIGHT),
             hole_mask(box=(8 * i, 8, 8 * i + 24, 40)) if i % 3 else None) for i in range(5)]

    def edit(job):
        prompt, seed, image, mask = job
        kw = {"mask": ("m.png", png(mask), "image/png")} if mask is not None else {}
        r = client(url).images.edit(image=("in.png", png(image), "image/png"), prompt=prompt,
                                    extra_body={"steps": STEPS, "seed": seed}, **kw)
        return decoded(r.data[0].b64_json)

    with serving(tiny_pipe, max_queue=16) as (url, _):
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            got = list(pool.map(edit, jobs))
    for (prompt, seed, image, mask), im in zip(jobs, got, strict=True):
        repaint = None if mask is None else ImageOps.invert(mask.getchannel("A"))
        assert same_pixels(im, library(tiny_pipe, prompt=prompt, seed=seed, image=image, mask=repaint)[0]), prompt


# -- streaming -------------------------------------------------------------------------------
def test_a_streamed_generation_ends_with_the_unstreamed_image(tiny_pipe):
    with serving(tiny_pipe) as (url, _):
        c = client(url)
        events = list(c.images.generate(prompt="a red circle", size="64x64", stream=True, partial_images=3,
                                        extra_body={"steps": 8, "seed": 4}))
        plain = c.images.generate(prompt="a red circle", size="64x64", extra_body={"steps": 8, "seed": 4})
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:3]] == [0, 1, 2]
    assert events[-1].b64_json == plain.data[0].b64_json  # the same PNG, metadata and all
    assert events[0].size == "64x64" and events[0].output_format == "png"
    partials = [decoded(e.b64_json) for e in events[:3]]
    assert all(p.size == (64, 64) for p in partials) and not same_pixels(partials[0], partials[2])


def test_streams_of_n_images_and_of_no_partial_images(tiny_pipe):
    with serving(tiny_pipe) as (url, _):
        c = client(url)
        two = list(c.images.generate(prompt="a dog", size="64x64", n=2, stream=True, partial_images=1,
                                     extra_body={"steps": 6, "seed": 2}))
        none = list(c.images.generate(prompt="a dog", size="64x64", stream=True, extra_body={"steps": 6}))
    assert [e.type.split(".")[1] for e in two] == ["partial_image"] * 2 + ["completed"] * 2
    assert [e.model_extra["sdfast"]["image_index"] for e in two] == [0, 1, 0, 1]
    assert not same_pixels(decoded(two[2].b64_json), decoded(two[3].b64_json))
    assert [e.type for e in none] == ["image_generation.completed"]


def test_a_streamed_edit(tiny_pipe, source):
    mask = hole_mask()
    with serving(tiny_pipe) as (url, _):
        events = list(client(url).images.edit(image=("in.png", png(source), "image/png"),
                                              mask=("m.png", png(mask), "image/png"), prompt="a yellow circle",
                                              stream=True, partial_images=2, extra_body={"steps": 6, "seed": 7}))
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    want = tiny_pipe.run(Request.build(tiny_pipe.info, prompt="a yellow circle", steps=6, seed=7, image=source,
                                       mask=ImageOps.invert(mask.getchannel("A")))).images[0]
    assert same_pixels(decoded(events[-1].b64_json), want)


@pytest.mark.parametrize("body, param", [
    ({"stream": False, "partial_images": 2}, "partial_images"),
    ({"stream": True, "partial_images": 4}, "partial_images"),
    ({"stream": True, "partial_images": -1}, "partial_images"),
    ({"stream": "true"}, "stream"),
    ({"stream": True, "partial_images": 1.5}, "partial_images"),
])
def test_bad_stream_fields_are_a_400_before_any_event(tiny_pipe, body, param):
    with serving(tiny_pipe) as (url, _):
        r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "64x64", **body}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert r.headers["content-type"].startswith("application/json")


def settled(service) -> bool:
    """The server has let go of every stream (its generator's clean-up runs just after the client
    read the last event, so it is waited for, up to a minute)."""
    done = threading.Event()
    for _ in range(6000):
        if service._streams == {}:
            return True
        done.wait(0.01)
    return False


class FailingPipe:
    def __init__(self, pipe):
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def run(self, req, **kw):
        raise RuntimeError("the engine fell over")


def test_a_failure_after_the_stream_began_is_an_error_event_the_client_raises(tiny_pipe):
    with serving(FailingPipe(tiny_pipe)) as (url, service):
        with pytest.raises(openai.APIError, match="the engine fell over"):
            list(client(url).images.generate(prompt="x", size="64x64", stream=True, partial_images=1,
                                             extra_body={"steps": 4}))
        assert service.ready and settled(service)


class WatchedPipe(FailingPipe):
    """The real pipeline; records whether a run ended because its stream was cancelled."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.ended = threading.Event()
        self.cancelled = False

    def run(self, req, **kw):
        try:
            return self._pipe.run(req, **kw)
        except Cancelled:
            self.cancelled = True
            raise
        finally:
            self.ended.set()


def test_a_client_that_leaves_mid_stream_stops_its_run_and_frees_the_server(tiny_pipe):
    watched = WatchedPipe(tiny_pipe)
    with serving(watched) as (url, service):
        watched.ended.clear()  # (the warm-up ran through run_batch, not run)
        body = {"prompt": "x", "size": "64x64", "stream": True, "partial_images": 3, "steps": 60}
        with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=60) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data:"):
                    assert json.loads(line[5:])["type"] == "image_generation.partial_image"
                    break  # and hang up
        assert watched.ended.wait(120)
        assert watched.cancelled  # stopped at its next partial image, not run to the end
        ok = client(url).images.generate(prompt="y", size="64x64", extra_body={"steps": 2})
        assert ok.data[0].b64_json
        assert settled(service)


class HeldPipe(FailingPipe):
    """The real pipeline; the first run waits for ``gate``, so later requests queue up behind it."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.gate, self.started = threading.Event(), threading.Event()

    def run(self, req, **kw):
        if not self.started.is_set():
            self.started.set()
            self.gate.wait(120)
        return self._pipe.run(req, **kw)


def test_a_streamed_request_never_shares_a_loop_even_where_batching_is_on(tiny_pipe):
    """Batched, its rows would run without its partial images: it runs alone."""
    held = HeldPipe(tiny_pipe)
    with serving(held, batch_invariance="allow", max_batch=4, max_wait_ms=200) as (url, service):
        c = client(url)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            blocker = pool.submit(c.images.generate, prompt="a", size="64x64", extra_body={"steps": 2})
            assert held.started.wait(60)
            streamed = pool.submit(lambda: list(c.images.generate(prompt="b", size="64x64", stream=True,
                                                                  partial_images=2, extra_body={"steps": 6})))
            plain = pool.submit(c.images.generate, prompt="c", size="64x64", extra_body={"steps": 6})
            while service.batcher.depth < 2:  # both queued behind the held run
                threading.Event().wait(0.01)
            held.gate.set()
            events, _, _ = streamed.result(), plain.result(), blocker.result()
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert events[-1].model_extra["sdfast"]["batch_requests"] == 1
