"""CLIP's byte-level BPE files (vocab.json + merges.txt), built from the shipped merge list.

CLIP's vocabulary is fully determined by its merge list: the 256 byte symbols, the same with the
end-of-word marker ``</w>``, one token per merge in order, then ``<|startoftext|>`` and
``<|endoftext|>`` (49,408 tokens). ``sdfast/data/clip_bpe/`` ships OpenAI's merge list (see the
NOTICE there); ``write_clip_tokenizer`` turns it into the folder ``CLIPTokenizer`` reads.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

CLIP_BPE_FILE = Path(__file__).parent.parent / "data" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
#: CLIP's vocab size; the merge count follows from it: 49408 - 2 specials - 2 × 256 byte symbols.
CLIP_VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def vocab_tokens(merges: list[tuple[str, str]]) -> list[str]:
    """Token strings in id order for a CLIP-layout vocabulary with these merges."""
    base = list(bytes_to_unicode().values())
    return base + [t + "</w>" for t in base] + ["".join(m) for m in merges] + [BOS, EOS]


def clip_merges(path: Path = CLIP_BPE_FILE) -> list[tuple[str, str]]:
    """The merges CLIP uses: the file's first line is a header, then the first 48,894 pairs."""
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    return [tuple(line.split()) for line in lines[1 : n_merges + 1]]


def tokenizer_files(merges: list[tuple[str, str]], model_max_length: int, pad_token: str = EOS) -> dict[str, str]:
    """File name -> text of a ``CLIPTokenizer`` folder."""
    vocab = {t: i for i, t in enumerate(vocab_tokens(merges))}
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(
            {"tokenizer_class": "CLIPTokenizer", **specials, "model_max_length": model_max_length,
             "do_lower_case": True},
            indent=2,
        ),
        "special_tokens_map.json": json.dumps(specials, indent=2),
    }


def write_clip_tokenizer(dest: Path, model_max_length: int = 77, pad_token: str = EOS) -> None:
    """Write CLIP's real tokenizer into ``dest`` (an empty or new folder; the caller makes it atomic)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(clip_merges(), model_max_length, pad_token).items():
        (dest / name).write_text(text, encoding="utf-8")
