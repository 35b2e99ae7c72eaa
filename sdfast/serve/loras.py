"""The LoRAs a server serves: read from --lora-dir once at start, named by requests (never a path)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument
from ..lora import Lora, LoraFile, check_scale

if TYPE_CHECKING:
    from ..runtime import Pipeline

#: a served LoRA's name: its file's stem in --lora-dir (no path, no separator of the loras field)
LORA_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def load_lora_dir(folder: str | None, pipe: Pipeline) -> dict[str, LoraFile]:
    """name -> LoraFile of every ``*.safetensors`` in ``folder`` (not recursive), each checked to
    fit the model now, so a request never meets a file that does not; {} for no folder."""
    if folder is None:
        return {}
    from ..lora import read_lora

    root = Path(folder)
    if not root.is_dir():
        raise InvalidArgument(f"lora-dir: {root} is not a folder; pass the folder holding the .safetensors LoRAs")
    files = sorted(p for p in root.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if not files:
        raise InvalidArgument(f"lora-dir: {root} holds no .safetensors file; put the LoRAs there or drop --lora-dir")
    loras = {}
    for path in files:
        if not LORA_NAME_RE.fullmatch(path.stem):
            raise InvalidArgument(f"lora-dir: {path.name}: a served LoRA's name (its file's stem) is letters, digits, "
                                  "'.', '_' and '-' (at most 100, no ':' or ','); rename the file")
        loras[path.stem] = read_lora(path)
        pipe.check_loras([loras[path.stem]])
    return loras


def parse_loras_field(value: Any, served: dict[str, LoraFile], max_loras: int) -> list[Lora]:
    """The ``loras`` field, ``"NAME[:SCALE],NAME..."``: names of this server's --lora-dir files
    (never a path); absent or "" is the base model."""
    if value is None or value == "":
        return []
    if not isinstance(value, str):
        raise InvalidArgument(f"loras: must be a string 'NAME[:SCALE],...' but is {json.dumps(value)}")
    if not served:
        raise InvalidArgument("loras: this server serves no LoRAs (it was started without --lora-dir); "
                              "drop the field")
    items = value.split(",")
    if len(items) > max_loras:
        raise InvalidArgument(f"loras: at most {max_loras} per request on this server but "
                              f"{len(items)} were named")
    out, seen = [], set()
    for item in items:
        name, sep, scale_text = item.partition(":")
        name = name.strip()
        if name not in served:
            shown = name if LORA_NAME_RE.fullmatch(name) else repr(name)[:40]
            raise InvalidArgument(f"loras: {shown} is not a LoRA of this server; it serves "
                                  f"{', '.join(sorted(served))}")
        if name in seen:
            raise InvalidArgument(f"loras: {name} is named twice; name it once with the sum of the scales")
        seen.add(name)
        try:
            scale = float(scale_text) if sep else 1.0
        except ValueError:
            raise InvalidArgument(f"loras: the scale of {name} must be a number, like {name}:0.7, not "
                                  f"{scale_text[:20]!r}") from None
        out.append(Lora(served[name], check_scale(scale, "loras")))
    return out
