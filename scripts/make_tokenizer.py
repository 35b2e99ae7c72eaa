"""Train a small CLIP-format byte-level BPE tokenizer (vocab.json + merges.txt).

The files follow the layout of OpenAI CLIP's tokenizer, which ``transformers.CLIPTokenizer``
reads: the 256 byte symbols, the same symbols with the end-of-word marker ``</w>``, one token per
merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Any text still tokenizes (byte fallback);
the merges only make the corpus words short.

    python scripts/make_tokenizer.py --out sdfast/data/tokenizer --merges 600 [--corpus FILE]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import tempfile
from pathlib import Path

from sdfast.model.bpe import bytes_to_unicode, tokenizer_files

# The built-in corpus: words of the toy world's captions plus common prompt words.
BUILTIN_CORPUS = """
a an the of on in with and or to at by for from under over above below near next behind front
red green blue yellow white black orange purple pink brown gray grey cyan magenta gold silver
circle square triangle shape shapes disc disk box ball star ring dot round solid plain flat
background backdrop field color colour picture photo image painting drawing render art style
small big large tiny huge little centered middle center one two three single simple bright dark
cat dog horse bird tree house car city mountain river sea sky sun moon flower forest street
portrait landscape astronaut riding photograph highly detailed realistic beautiful lighting
""".split()


WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def train(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    byte_map = bytes_to_unicode()
    freqs: collections.Counter[tuple[str, ...]] = collections.Counter()
    for text in words:
        for w in WORD_RE.findall(text.lower()):
            symbols = [byte_map[b] for b in w.encode("utf-8")]
            symbols[-1] += "</w>"
            freqs[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, f in freqs.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[(a, b)] += f
        if not pairs:
            break
        # Most frequent pair; ties broken by the pair itself so the output is deterministic.
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, f in freqs.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += f
        freqs = merged
    return merges


def write(out: Path, merges: list[tuple[str, str]], model_max_length: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(merges, model_max_length).items():
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for vocab.json, merges.txt, configs")
    ap.add_argument("--merges", type=int, default=600, help="number of BPE merges to learn (default 600)")
    ap.add_argument("--corpus", type=Path, help="extra text file to learn from (one caption per line)")
    ap.add_argument("--model-max-length", type=int, default=77, help="tokens per prompt incl. BOS/EOS")
    args = ap.parse_args()
    words = list(BUILTIN_CORPUS)
    if args.corpus:
        words += args.corpus.read_text(encoding="utf-8").split()
    merges = train(words, args.merges)
    write(args.out, merges, args.model_max_length)
    print(f"wrote {args.out} with {len(merges)} merges")


if __name__ == "__main__":
    main()
