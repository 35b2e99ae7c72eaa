"""The toy world that sdfast's built-in tiny model is trained on, and the checks used to grade it.

Images are single flat-coloured shapes (circle, square, triangle) roughly centred on a flat
background of another colour; captions name the shape, its colour and the background colour. It
is small enough for a tiny Stable Diffusion (CLIP text encoder + U-Net + VAE) to learn on a CPU,
and :func:`classify` reads back what an image shows so tests can check that a generated image
matches its prompt. Only numpy, Pillow and the standard library are needed.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Caption templates; the first is the canonical prompt used for evaluation.
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} on a {background} background",
    "{colour} {shape}, {background} background",
    "a {shape} in {colour} on {background}",
    "a {colour} {shape} on {background}",
    "{colour} {shape} on a {background} background",
)

_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


def combos() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) with colour != background, in a fixed order."""
    return [
        (s, c, b) for s, c, b in itertools.product(SHAPES, COLOURS, COLOURS) if c != b
    ]


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def render(
    shape: str,
    colour: str,
    background: str,
    size: int = 64,
    rng: np.random.Generator | int | None = None,
    palette: dict[str, tuple[int, int, int]] | None = None,
) -> Image.Image:
    """Draw ``shape`` in ``colour`` on ``background``: centred up to ~size/16 px off, 40-60 % of the side.
    ``palette``: colour name -> RGB (default PALETTE; scripts/train_toy_lora.py adds a colour)."""
    palette = PALETTE if palette is None else palette
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour not in palette or background not in palette:
        raise ValueError(f"colours must be among {tuple(palette)}")
    if colour == background:
        raise ValueError("shape colour and background must differ")
    rng = _rng(rng)
    extent = size * rng.uniform(0.40, 0.60)
    jitter = max(1, round(size / 16))
    cx = size / 2 + rng.integers(-jitter, jitter + 1)
    cy = size / 2 + rng.integers(-jitter, jitter + 1)
    half = extent / 2
    img = Image.new("RGB", (size, size), palette[background])
    draw = ImageDraw.Draw(img)
    box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
    fill = palette[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:  # upright triangle filling its bounding box
        draw.polygon([(cx, cy - half), (cx + half - 1, cy + half - 1), (cx - half, cy + half - 1)], fill=fill)
    return img


def caption(
    shape: str, colour: str, background: str, rng: np.random.Generator | int | None = None
) -> str:
    """A caption for the scene: the canonical template or one of its paraphrases (random with ``rng``).

    With ``rng=None`` the canonical form "a {colour} {shape} on a {background} background" is returned.
    """
    template = TEMPLATES[0] if rng is None else TEMPLATES[int(_rng(rng).integers(len(TEMPLATES)))]
    return template.format(shape=shape, colour=colour, background=background)


def sample_dataset(
    n: int, seed: int = 0, size: int = 64
) -> tuple[np.ndarray, list[str], list[tuple[str, str, str]]]:
    """``n`` random scenes, deterministic in ``seed``.

    Returns ``(images, captions, labels)``: a uint8 array ``[n, size, size, 3]``, the captions
    (random paraphrases) and the ``(shape, colour, background)`` labels.
    """
    rng = np.random.default_rng(seed)
    all_combos = combos()
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    labels: list[tuple[str, str, str]] = []
    for i in range(n):
        shape, colour, background = all_combos[int(rng.integers(len(all_combos)))]
        images[i] = np.asarray(render(shape, colour, background, size=size, rng=rng))
        captions.append(caption(shape, colour, background, rng=rng))
        labels.append((shape, colour, background))
    return images, captions, labels


def all_captions() -> list[str]:
    """Every caption the toy world can produce (all combos x all templates), for tokenizer training."""
    return [
        t.format(shape=s, colour=c, background=b) for s, c, b in combos() for t in TEMPLATES
    ]


#: the built-in models trained on this world; ``sdfast generate`` hints at its vocabulary for them.
TOY_MODELS = ("tiny", "tiny-lcm")


def caption_hint(prompt: str) -> str | None:
    """One line saying what the toy models know, when ``prompt`` names no shape or no colour of
    this world (None when it names both). Words are matched whole and lower-cased: "circel" or
    "circles" are not "circle", and the model never saw them either."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    missing = [what for what, known in (("shape", SHAPES), ("colour", COLOURS)) if not words & set(known)]
    if not missing:
        return None
    return (f"hint: the built-in toy model knows only a {', '.join(SHAPES[:-1])} or {SHAPES[-1]} in "
            f"{', '.join(COLOURS[:-1])} or {COLOURS[-1]} on a background of another colour, e.g. "
            f"\"{caption('circle', 'red', 'blue')}\"; {prompt!r} names no {' and no '.join(missing)} it knows")


def nearest_colour(rgb) -> str:
    """Name of the palette colour nearest (Euclidean in RGB) to ``rgb``."""
    v = np.asarray(rgb, dtype=np.float32).reshape(3)
    return COLOURS[int(np.argmin(((_PALETTE_ARRAY - v) ** 2).sum(axis=1)))]


def _dominant(pixels: np.ndarray) -> str:
    px = pixels.reshape(-1, 3).astype(np.float32)
    idx = np.argmin(((px[:, None, :] - _PALETTE_ARRAY[None]) ** 2).sum(axis=2), axis=1)
    counts = Counter(idx.tolist())
    return COLOURS[max(counts.items(), key=lambda kv: (kv[1], -kv[0]))[0]]


def classify(image) -> tuple[str, str]:
    """``(centre colour, corner colour)``: the dominant palette colours of a small centre patch
    (1/8 of the side) and of the four corner patches (1/10 of the side) together.

    ``image`` is a PIL image or an ``[H, W, 3]`` uint8 array.
    """
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {arr.shape}")
    h, w = arr.shape[:2]
    ph, pw = max(1, h // 8), max(1, w // 8)
    top, left = (h - ph) // 2, (w - pw) // 2
    centre = arr[top : top + ph, left : left + pw]
    ch, cw = max(1, h // 10), max(1, w // 10)
    corners = np.concatenate(
        [
            arr[:ch, :cw].reshape(-1, 3),
            arr[:ch, w - cw :].reshape(-1, 3),
            arr[h - ch :, :cw].reshape(-1, 3),
            arr[h - ch :, w - cw :].reshape(-1, 3),
        ]
    )
    return _dominant(centre), _dominant(corners)
