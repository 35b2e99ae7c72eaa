"""``POST /v1/images/edits``'s multipart form, as the OpenAI client's ``images.edit`` sends it.

A multipart form carries every field as text, so the fields are turned into the JSON types the
generations endpoint takes (``"42"`` → 42, ``"true"`` → True) and then checked by the same
``ImageService.parse``: an edit and a generation obey one set of rules with one set of messages.

- ``image`` (or ``image[]``, the client's name for a list): exactly one file, the init image.
- ``mask`` (optional): OpenAI's meaning, as ``inpaint.load_mask`` reads every mask. A mask with
  transparent pixels repaints where it is fully transparent (alpha 0) and keeps every other
  pixel, whatever its colours (the API's masks are often the photo itself with a hole cut out).
  A mask without transparency is read by its grey values: white repaints, black keeps. It must
  have the image's size (the API's rule). No mask: the whole image is redrawn
  (img2img, ``strength`` 0.8 unless given).
- Uploads are bounded: the body by ``ServeConfig.max_upload_mb`` (413 past it, never read
  whole), each image by ``max_upload_pixels`` from its header before a pixel is decoded.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument
from ..images import load_init_image

if TYPE_CHECKING:
    from PIL import Image

#: form fields holding numbers / switches, by JSON type (the rest are text)
INT_FIELDS = ("n", "seed", "steps", "partial_images")
FLOAT_FIELDS = ("guidance_scale", "strength")
BOOL_FIELDS = ("stream", "paste_unmasked")
FILE_FIELDS = ("image", "image[]", "mask")


def form_fields(items: list[tuple[str, Any]]) -> tuple[dict[str, Any], bytes, bytes | None]:
    """The form's (name, value) pairs → (typed fields, image bytes, mask bytes or None)."""
    from starlette.datastructures import UploadFile

    fields: dict[str, Any] = {}
    images: list[Any] = []
    mask = None
    seen: set[str] = set()
    for name, value in items:
        is_file = isinstance(value, UploadFile)
        if name in ("image", "image[]"):
            if not is_file:
                raise InvalidArgument(f"{name}: must be an uploaded image file (multipart file part), not text")
            images.append(value)
            continue
        if name in seen:
            raise InvalidArgument(f"{name}: sent twice; send each field once")
        seen.add(name)
        if name == "mask":
            if not is_file:
                raise InvalidArgument("mask: must be an uploaded image file (multipart file part), not text")
            mask = value
            continue
        if is_file:
            raise InvalidArgument(f"{name}: must be a text field, not a file; only image and mask are files")
        fields[name] = typed(name, value)
    if not images:
        raise InvalidArgument("image: required; upload the image to edit as the multipart file 'image'")
    if len(images) > 1:
        raise InvalidArgument(f"image: one image per edit, but {len(images)} were sent; sdfast edits one init "
                              "image (send one file)")
    return fields, images[0].file.read(), None if mask is None else mask.file.read()


def typed(name: str, text: str) -> Any:
    """A text form field as the JSON value it stands for (refused in one line when it is not one)."""
    if name in INT_FIELDS:
        digits = text[1:] if text[:1] == "-" else text
        if not (digits.isascii() and digits.isdigit()):
            raise InvalidArgument(f"{name}: must be an integer but is {text!r}")
        return int(text)
    if name in FLOAT_FIELDS:
        try:
            return float(text)  # the numeric checks refuse nan and inf with their own messages
        except ValueError:
            raise InvalidArgument(f"{name}: must be a number but is {text!r}") from None
    if name in BOOL_FIELDS:
        if text.lower() not in ("true", "false"):
            raise InvalidArgument(f"{name}: must be true or false but is {text!r}")
        return text.lower() == "true"
    return text


def _header_size(data: bytes, arg: str, max_pixels: int) -> tuple[int, int]:
    """The image's (width, height) from its header, refused past ``max_pixels`` before decoding."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidArgument(f"{arg}: the uploaded file is empty; upload a PNG, JPEG or WebP image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidArgument(f"{arg}: the uploaded file is not a readable image ({type(e).__name__}); upload a "
                              "PNG, JPEG or WebP image") from None
    if w * h > max_pixels:
        raise InvalidArgument(f"{arg}: {w}x{h} is {w * h:,} pixels, more than this server's limit of "
                              f"{max_pixels:,} (--max-upload-pixels); upload a smaller image")
    return w, h


def upload_image(data: bytes, max_pixels: int) -> Image.Image:
    """The uploaded init image as 8-bit RGB (sdfast/images.py's reading, alpha over white)."""
    _header_size(data, "image", max_pixels)
    return load_init_image(data, "image")


def upload_mask(data: bytes, size: tuple[int, int], max_pixels: int) -> Image.Image:
    """The uploaded mask as sdfast's grey mask (white repaints), read by ``inpaint.load_mask``:
    a mask with transparent pixels by its alpha alone, one without by its grey values."""
    from ..inpaint import load_mask

    w, h = _header_size(data, "mask", max_pixels)
    if (w, h) != size:
        raise InvalidArgument(f"mask: {w}x{h} but the image is {size[0]}x{size[1]}; the mask must have the "
                              "image's size")
    return load_mask(data, "mask")


def auto_size(image_size: tuple[int, int], max_side: int, multiple: int, min_side: int) -> tuple[int, int]:
    """``size: auto`` for an edit: the image's own size, scaled down (aspect kept) to fit
    ``max_side``, each side rounded down to a multiple of the VAE factor → (height, width)."""
    w, h = image_size
    scale = min(1.0, max_side / max(w, h))
    fit = [max(min_side, int(v * scale) // multiple * multiple) for v in (h, w)]
    return fit[0], fit[1]
