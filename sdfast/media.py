"""Writing images: PNG with generation metadata, grids, and denoising animations.

Every writer goes through ``fsio.atomic_path`` (or a ``fsio.output_group`` slot): the bytes land
in a temporary file next to the target and are renamed over it only when complete, so a crash
never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import InvalidArgument
from .fsio import atomic_path, ordinary_mode  # noqa: F401  (ordinary_mode: re-exported for old callers)

ANIMATION_SUFFIXES = (".gif", ".mp4")


def save_png(image: Image.Image, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """PNG with one tEXt chunk per metadata key plus ``sdfast`` holding them all as JSON (atomic)."""
    with atomic_path(path) as tmp:
        write_png(image, tmp, metadata)


def write_png(image: Image.Image, file: str | os.PathLike, metadata: dict[str, Any] | None = None) -> None:
    """``save_png`` into ``file`` as it is: a temporary path that the caller renames into place."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    if metadata:
        info.add_text("sdfast", json.dumps(metadata, sort_keys=True))
    image.save(file, format="PNG", pnginfo=info)


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    with Image.open(path) as im:
        text = dict(getattr(im, "text", {}))
    return json.loads(text["sdfast"]) if "sdfast" in text else text


def grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile same-sized images row-major into one image."""
    cols = cols or len(images)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h))
    for k, im in enumerate(images):
        out.paste(im, ((k % cols) * w, (k // cols) * h))
    return out


def check_animation_path(path: str | os.PathLike) -> None:
    """Refuse an animation target we could not write, before any work is done."""
    suffix = Path(path).suffix.lower()
    if suffix not in ANIMATION_SUFFIXES:
        raise InvalidArgument(f"animation: {str(path)!r} must end in .gif or .mp4")
    if suffix == ".mp4" and ffmpeg_exe() is None:
        raise InvalidArgument(
            "animation: writing MP4 needs ffmpeg, which was not found; "
            "pip install imageio-ffmpeg (or put ffmpeg on PATH), or write a .gif"
        )


def ffmpeg_exe() -> str | None:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return shutil.which("ffmpeg")


def save_animation(frames: Sequence[Image.Image], path: str | os.PathLike, fps: float = 8.0,
                   hold_last_s: float = 1.0) -> None:
    """GIF with Pillow, MP4 with ffmpeg; the final frame is held ``hold_last_s`` seconds (atomic)."""
    check_animation_path(path)
    with atomic_path(path) as tmp:
        write_animation(frames, tmp, Path(path).suffix, fps, hold_last_s)


def write_animation(frames: Sequence[Image.Image], file: str | os.PathLike, suffix: str, fps: float = 8.0,
                    hold_last_s: float = 1.0) -> None:
    """``save_animation`` into ``file`` as it is, in the format ``suffix`` names (.gif or .mp4)."""
    if not frames:
        raise InvalidArgument("animation: no frames to write")
    hold = max(1, round(hold_last_s * fps))
    seq = list(frames) + [frames[-1]] * hold
    if suffix.lower() == ".gif":
        seq[0].save(file, format="GIF", save_all=True, append_images=seq[1:], duration=round(1000 / fps), loop=0)
    elif suffix.lower() == ".mp4":
        _write_mp4(seq, Path(file), fps)
    else:
        raise InvalidArgument(f"animation: {suffix!r} is not .gif or .mp4")


def _write_mp4(frames: Sequence[Image.Image], path: Path, fps: float) -> None:
    import subprocess

    import numpy as np

    w, h = frames[0].size
    # yuv420p needs even sides; pad by one pixel where needed (scale filter keeps content).
    cmd = [ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2",
           "-pix_fmt", "yuv420p", "-c:v", "libx264", "-f", "mp4", str(path)]
    raw = b"".join(np.asarray(f.convert("RGB"), dtype=np.uint8).tobytes() for f in frames)
    proc = subprocess.run(cmd, input=raw, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace').strip()}")
