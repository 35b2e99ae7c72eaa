"""Prompts → the U-Net's text conditioning, per model family.

This is where the families differ (with the U-Net's extra inputs): SD 1.x/2.x encode each text
with one CLIP and feed its last hidden states; SDXL encodes with two CLIPs, concatenates their
penultimate hidden states, adds the second one's pooled projection and six size numbers per
row (``text_embeds``, ``time_ids``), and gives an absent negative prompt zero embeddings
(``force_zeros_for_empty_prompt``). Both return the U-Net's conditioning inputs as a dict of
tensors, rows ordered [uncond..., cond...] under guidance; the guided step only passes them on.

Common to both: each distinct text (tuple) is encoded once and its rows gathered, and long
prompts are tokenized by ``token_chunks``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from .model.info import ModelInfo
from .request import Request

log = logging.getLogger(__name__)


def token_chunks(tokenizer, texts: list[str], max_tokens: int, long_prompt: str = "truncate",
                 chunks: int | None = None) -> torch.Tensor:
    """(N,) strings → (N, K, S) token ids, each row of S = BOS, tokens, EOS, padding.

    ``truncate`` (diffusers' behaviour, K = 1): over-long text keeps BOS + the first S-2 tokens
    + EOS (what transformers' truncation keeps), with a warning quoting the dropped text.
    ``chunk`` (AUTOMATIC1111's, compel's): the tokens in runs of S-2, each run with its own BOS
    and EOS; every text gets the longest text's K (or ``chunks``; missing chunks are empty: BOS,
    EOS, padding) so the embeddings concatenate. A text that fits one chunk gives the same row
    either way."""
    s = max_tokens
    full = tokenizer(texts, verbose=False).input_ids  # ragged, untruncated: [BOS, ..., EOS]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    bodies = []
    for ids in full:
        body = ids[1:-1]
        if long_prompt == "truncate" and len(body) > s - 2:
            log.warning("prompt truncated to %d tokens, the text encoder's limit; dropped: %r", s,
                        tokenizer.decode(body[s - 2 :]))
            body = body[: s - 2]
        bodies.append(body)
    k = chunks or max(1, *(-(-len(b) // (s - 2)) for b in bodies))
    rows = []
    for body in bodies:
        for j in range(k):
            part = [bos, *body[j * (s - 2) : (j + 1) * (s - 2)], eos]
            rows.append(part + [pad] * (s - len(part)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(texts), k, s)  # (N, K, S)


@dataclass
class TextBatch:
    """Tokenized texts of one U-Net batch: ``rows[r]`` names row r's entry of ``unique`` (None:
    a zero embedding); ``ids[e]`` holds encoder e's (U, K, S) token ids of ``unique``."""

    rows: list[int | None]
    unique: list[tuple[str, ...]]
    ids: list[torch.Tensor]
    requests: list[Request]
    guided: bool

    @property
    def chunks(self) -> int:
        return self.ids[0].shape[1]


class SDText:
    """SD 1.x / 2.x: one CLIP text encoder, its last hidden states."""

    tokenizer_folders = ("tokenizer",)

    def __init__(self, info: ModelInfo, tokenizers: list, device: torch.device):
        self.info, self.tokenizers, self.device = info, tokenizers, device
        # HF tokenizers are not re-entrant ("Already borrowed"); tokenizing is microseconds.
        self._lock = threading.Lock()

    def row_texts(self, req: Request) -> tuple[list[tuple[str, ...] | None], list[tuple[str, ...]]]:
        """(negative rows, prompt rows) of a request: one text per tokenizer, None = zeros."""
        return [(t,) for t in req.negative_prompts], [(t,) for t in req.prompts]

    def prepare(self, requests: list[Request], guided: bool, long_prompt: str) -> TextBatch:
        negatives, prompts = [], []
        for r in requests:
            n, p = self.row_texts(r)
            negatives += n
            prompts += p
        texts = negatives + prompts if guided else prompts
        unique = list(dict.fromkeys(t for t in texts if t is not None))
        where = {t: i for i, t in enumerate(unique)}
        s = self.info.max_tokens
        with self._lock:
            ids = [token_chunks(tok, [t[e] for t in unique], s, long_prompt) for e, tok in enumerate(self.tokenizers)]
            k = max(i.shape[1] for i in ids)  # SDXL: prompt_2 may need more chunks than prompt
            ids = [i if i.shape[1] == k else token_chunks(tok, [t[e] for t in unique], s, long_prompt, k)
                   for e, (i, tok) in enumerate(zip(ids, self.tokenizers, strict=True))]
        ids = [i.to(self.device) for i in ids]
        return TextBatch([None if t is None else where[t] for t in texts], unique, ids, requests, guided)

    def encode(self, engines: dict, batch: TextBatch) -> dict[str, torch.Tensor]:
        """The U-Net's conditioning inputs for ``batch``'s rows."""
        u, k, s = batch.ids[0].shape
        emb = engines["text_encoder"](input_ids=batch.ids[0].reshape(u * k, s))["last_hidden_state"]
        return {"encoder_hidden_states": gather(emb.reshape(u, k * s, -1), batch.rows)}  # (2B|B, K·S, D)


class SDXLText(SDText):
    """SDXL: two CLIPs (penultimate hidden states concatenated, the second's pooled projection)
    and the size conditioning, as diffusers' StableDiffusionXLPipeline builds them."""

    tokenizer_folders = ("tokenizer", "tokenizer_2")

    def row_texts(self, req: Request) -> tuple[list[tuple[str, ...] | None], list[tuple[str, ...]]]:
        prompts = list(zip(req.prompts, req.prompts_2, strict=True))
        if not req.negative_given and self.info.force_zeros_for_empty_prompt:
            return [None] * len(prompts), prompts
        return list(zip(req.negative_prompts, req.negative_prompts_2, strict=True)), prompts

    def encode(self, engines: dict, batch: TextBatch) -> dict[str, torch.Tensor]:
        u, k, s = batch.ids[0].shape
        h1 = engines["text_encoder"](input_ids=batch.ids[0].reshape(u * k, s))["hidden_states"]
        out2 = engines["text_encoder_2"](input_ids=batch.ids[1].reshape(u * k, s))
        hidden = torch.cat([h1.reshape(u, k * s, -1), out2["hidden_states"].reshape(u, k * s, -1)], dim=-1)
        pooled = out2["text_embeds"].reshape(u, k, -1)[:, 0]  # the first chunk's, as compel and A1111 do
        negative = [r.time_ids()[0] for r in batch.requests for _ in range(r.batch)]
        positive = [r.time_ids()[1] for r in batch.requests for _ in range(r.batch)]
        time_ids = negative + positive if batch.guided else positive
        return {
            "encoder_hidden_states": gather(hidden, batch.rows),  # (2B|B, K·S, D1 + D2)
            "text_embeds": gather(pooled, batch.rows),  # (2B|B, P)
            "time_ids": torch.tensor(time_ids, dtype=torch.float32, device=hidden.device),  # (2B|B, 6)
        }


def gather(emb: torch.Tensor, rows: list[int | None]) -> torch.Tensor:
    """Rows of ``emb`` (U, ...) in ``rows`` order; a None row is zeros (SDXL's empty negative)."""
    if rows == list(range(len(emb))):
        return emb
    table = torch.cat([emb, torch.zeros_like(emb[:1])])  # index U: the zero row
    where = torch.tensor([len(emb) if r is None else r for r in rows], device=emb.device)
    return table.index_select(0, where)


#: model family -> its text conditioning.
TEXT = {"sd": SDText, "sdxl": SDXLText}
