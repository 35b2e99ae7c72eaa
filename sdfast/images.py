"""Init images in: whatever the caller hands over, as the 8-bit RGB image the VAE encoder takes.

Accepted, and how each is read:

- ``PIL.Image.Image``, a path (``str`` / ``os.PathLike``), or the encoded bytes of an image file
  (``bytes``, ``bytearray``, ``memoryview``: PNG, JPEG, WebP, ... whatever Pillow reads).
- ``numpy.ndarray`` in height-width(-channel) layout: ``(H, W)`` grey, ``(H, W, 1)``,
  ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA; ``uint8`` (0..255), ``uint16`` (0..65535) or float
  (0.0..1.0). Channel-first ``(C, H, W)``, batches, other dtypes, NaN and values outside the
  range are refused with ``InvalidArgument`` (a guess there would silently change the image).

Conversions: 16-bit and 32-bit samples are scaled to 8 bits (never clipped); palette images are
expanded; an alpha channel (RGBA, LA, palette transparency) is composited over ``BACKGROUND``
(white, like a page); CMYK, YCbCr, LAB and 1-bit images are converted to RGB by Pillow; the EXIF
orientation of camera JPEGs is applied. Files whose header claims more than ``MAX_PIXELS`` are
refused before any pixel is decoded (a decompression bomb is a few kB that would need GBs).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument, MissingFile

if TYPE_CHECKING:
    from PIL import Image

#: what transparent pixels are composited over.
BACKGROUND = (255, 255, 255)
#: the largest image accepted, in pixels (8192²: four times the largest side a request may have,
#: squared; camera photos are ~12-50 MP). Checked from the header, before decoding.
MAX_PIXELS = 8192 * 8192


def load_init_image(image: Any, arg: str = "image") -> Image.Image:
    """``image`` (see the module doc for what is accepted) as an 8-bit RGB PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        from PIL import ImageOps

        # Upright as a viewer shows it, like a file (an Image.open()ed photo keeps its EXIF
        # orientation; exif_transpose drops the tag, so an image already turned is not turned twice).
        return to_rgb(ImageOps.exif_transpose(image), arg)
    if isinstance(image, bytes | bytearray | memoryview):
        if len(image) == 0:
            raise InvalidArgument(f"{arg}: the bytes are empty; pass the contents of a PNG or JPEG file")
        return _open(io.BytesIO(bytes(image)), arg, "the bytes given")
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise MissingFile(f"{arg}: no file at {str(path)!r}; pass the path of a PNG or JPEG init image")
        return _open(path, arg, repr(str(path)))
    if type(image).__module__ == "numpy":
        return from_array(image, arg)
    raise InvalidArgument(
        f"{arg}: a {type(image).__module__}.{type(image).__name__} is not an image; pass a PIL image, a file path, "
        f"the bytes of an image file, or a numpy array (H, W[, 1|3|4]) of uint8, uint16 or float in [0, 1]"
    )


def _open(src: Any, arg: str, what: str) -> Image.Image:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(src) as im:
            w, h = im.size  # from the header: nothing decoded yet
            if w * h > MAX_PIXELS:
                raise InvalidArgument(f"{arg}: {what} claims {w}x{h} pixels, more than the {MAX_PIXELS:,} allowed "
                                      f"(a decompression bomb or a huge scan); pass an image of at most 8192x8192")
            im.load()
            return to_rgb(ImageOps.exif_transpose(im), arg)
    except Image.DecompressionBombError as e:
        raise InvalidArgument(f"{arg}: {what} is too large to decode safely ({e}); pass a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, InvalidArgument):
            raise
        raise InvalidArgument(f"{arg}: {what} is not a readable image ({type(e).__name__}: {e}); "
                              f"pass a PNG or JPEG file") from None


def to_rgb(im: Image.Image, arg: str = "image") -> Image.Image:
    """Any Pillow mode as 8-bit RGB: high bit depths scaled, alpha composited on ``BACKGROUND``."""
    import numpy as np
    from PIL import Image

    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        if not np.isfinite(a).all():
            raise InvalidArgument(f"{arg}: the image has NaN or infinite samples; pass a finite image")
        if im.mode == "F":  # float samples: 0..1 if they fit, else 0..255
            top = 1.0 if a.max() <= 1.0 else 255.0
        else:  # 16-bit files, and 32-bit "I" images holding 16-bit data, scale from 0..65535
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        grey = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    elif im.mode in ("1", "L", "CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    elif im.mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(base, rgba).convert("RGB")
    return im.convert("RGB")


def from_array(a: Any, arg: str = "image") -> Image.Image:
    """A numpy array in (H, W[, C]) layout (see the module doc) as 8-bit RGB."""
    import numpy as np
    from PIL import Image

    layouts = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        raise InvalidArgument(f"{arg}: the array has shape {a.shape}, channel-first; pass {layouts} "
                              f"(numpy.moveaxis(a, 0, -1) turns (C, H, W) into (H, W, C))")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)) or min(a.shape[:2]) < 1:
        raise InvalidArgument(f"{arg}: the array has shape {a.shape}; pass one image as {layouts}")
    if a.shape[0] * a.shape[1] > MAX_PIXELS:
        raise InvalidArgument(f"{arg}: the array has {a.shape[1]}x{a.shape[0]} pixels, more than {MAX_PIXELS:,}")
    if a.dtype == np.uint8:
        u8 = a
    elif a.dtype == np.uint16:
        u8 = np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InvalidArgument(f"{arg}: a float array must hold finite values in [0, 1] but spans "
                                  f"{float(np.nanmin(a)):g}..{float(np.nanmax(a)):g}; scale it (a / 255 for 0..255)")
        u8 = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise InvalidArgument(f"{arg}: the array's dtype is {a.dtype}; pass uint8 (0..255), uint16 (0..65535) "
                              f"or float (0..1)")
    if u8.ndim == 3 and u8.shape[-1] == 1:
        u8 = u8[..., 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(u8)), arg)  # uint8: L, RGB or RGBA by shape
