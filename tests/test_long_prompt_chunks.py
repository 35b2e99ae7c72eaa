"""Long prompts token by token: how many chunks a text takes, what each chunk holds (BOS, its run
of at most S-2 tokens, EOS) and what fills the rest of the row (the tokenizer's own pad token:
<|endoftext|> for SD 1.x's CLIP, "!" (id 0) for SD 2.x's OpenCLIP and SDXL's second tokenizer).

Every expectation is built from the transformers tokenizer itself (``tok(text, padding=
"max_length")`` of each run of words), never from sdfast: prompts are made of words that are one
token each, so the run of tokens a chunk should hold is the run of words it was made from.
"""

from __future__ import annotations

import logging

import pytest
import torch

from sdfast.engines import load_engines
from sdfast.model.components import Precision
from sdfast.model.info import load_tokenizer, resolve_model
from sdfast.request import Request
from sdfast.runtime import Pipeline
from sdfast.text import SDText, SDXLText, token_chunks

S = 77  # CLIP's window: BOS + 75 tokens + EOS
RUN = S - 2
#: one token each in CLIP's vocabulary and in the tiny model's (asserted by ``words``)
WORDS = list("abcdefghijklmnopqrstuvwxyz0123456789")
#: tokens -> chunks under long_prompt="chunk", written out (not computed)
CHUNKS = {0: 1, 1: 1, 75: 1, 76: 2, 150: 2, 151: 3}


def chunks_for(n: int) -> int:
    """Chunks of ``n`` tokens, up to 225 (the boundaries written out)."""
    assert n <= 225
    return 1 if n <= 75 else 2 if n <= 150 else 3


def words(n: int, start: int = 0) -> str:
    return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n))


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False, verbose=False).input_ids)


def expected_chunks(tok, text: str, k: int) -> list[list[int]]:
    """The k rows the tokenizer itself makes of ``text``'s runs of 75 words (each one token)."""
    parts = text.split()
    assert n_tokens(tok, text) == len(parts), "each word must be one token"
    return [tok(" ".join(parts[j * RUN : (j + 1) * RUN]), padding="max_length", max_length=S).input_ids
            for j in range(k)]


def empty_chunk(tok) -> list[int]:
    return tok("", padding="max_length", max_length=S).input_ids


@pytest.fixture(scope="module")
def clip():
    """The real CLIP tokenizers of each family (config-only folders: no weights are built)."""
    sd1, sd2, sdxl = (resolve_model(n) for n in ("random-sd15", "random-sd21", "random-sdxl"))
    toks = {"sd1": load_tokenizer(sd1), "sd2": load_tokenizer(sd2), "sdxl": load_tokenizer(sdxl),
            "sdxl_2": load_tokenizer(sdxl, "tokenizer_2")}
    # The premise of the pad checks: the families really pad differently.
    eos = toks["sd1"].eos_token_id
    assert toks["sd1"].pad_token_id == eos and toks["sdxl"].pad_token_id == eos
    assert toks["sd2"].pad_token_id == toks["sd2"].convert_tokens_to_ids("!") == 0 != eos
    assert toks["sdxl_2"].pad_token_id == 0
    return {"infos": {"sd2": sd2, "sdxl": sdxl}, **toks}


@pytest.mark.parametrize("n", list(CHUNKS))
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_chunk_count_and_contents_at_the_window_boundaries(clip, family, n):
    tok = clip[family]
    text = words(n)
    ids = token_chunks(tok, [text], S, "chunk")
    assert ids.shape == (1, CHUNKS[n], S)
    assert ids[0].tolist() == expected_chunks(tok, text, CHUNKS[n])


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_each_chunk_is_bos_its_tokens_eos_then_the_tokenizers_pad_id(clip, family):
    tok = clip[family]
    pad = {"sd1": 49407, "sd2": 0}[family]  # <|endoftext|> / "!" in CLIP's 49408-token vocabulary
    ids = token_chunks(tok, [words(151)], S, "chunk")[0].tolist()  # runs of 75, 75 and 1 tokens
    body = tok(words(151), add_special_tokens=False, verbose=False).input_ids
    assert ids[0] == [49406, *body[:75], 49407]
    assert ids[1] == [49406, *body[75:150], 49407]
    assert ids[2] == [49406, body[150], 49407] + [pad] * 74


@pytest.mark.parametrize("n", [75, 76, 151])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_truncate_keeps_one_row_of_the_first_75_tokens_and_names_what_it_dropped(clip, family, n, caplog):
    tok = clip[family]
    text = words(n)
    with caplog.at_level(logging.WARNING, logger="sdfast.text"):
        ids = token_chunks(tok, [text], S, "truncate")
    assert ids.shape == (1, 1, S)
    # diffusers' own tokenization of the prompt
    assert ids[0, 0].tolist() == tok(text, padding="max_length", max_length=S, truncation=True).input_ids
    dropped = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    if n == 75:
        assert dropped == []
    else:
        assert len(dropped) == 1 and repr(" ".join(text.split()[RUN:])) in dropped[0]


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_batch_pads_its_shorter_texts_to_the_longest_with_empty_chunks(clip, family):
    tok = clip[family]
    texts = [words(10), words(151, start=3), words(76, start=7), ""]
    ids = token_chunks(tok, texts, S, "chunk")
    assert ids.shape == (4, 3, S)
    empty = empty_chunk(tok)
    assert empty == [tok.bos_token_id, tok.eos_token_id] + [tok.pad_token_id] * 75
    for row, text in zip(ids.tolist(), texts, strict=True):
        k = chunks_for(n_tokens(tok, text))
        assert row[:k] == expected_chunks(tok, text, k), text[:20]
        assert row[k:] == [empty] * (3 - k), text[:20]  # BOS, EOS, then the pad id: not a copy of the text


def test_a_negative_prompt_longer_than_the_prompt_sets_both_halves_chunk_count(clip):
    info, tok = clip["infos"]["sd2"], clip["sd2"]
    text = SDText(info, [tok], torch.device("cpu"))
    req = Request.build(info, prompt=words(5), negative_prompt=words(151, start=2), steps=2, guidance_scale=7.5)
    batch = text.prepare([req], req.guided, "chunk")
    assert batch.chunks == 3 and batch.ids[0].shape == (2, 3, S)
    neg, pos = (batch.ids[0][r].tolist() for r in batch.rows)  # rows: [uncond, cond]
    assert neg == expected_chunks(tok, words(151, start=2), 3)
    assert pos == expected_chunks(tok, words(5), 1) + [empty_chunk(tok)] * 2
    assert pos[1][2:] == [0] * 75  # SD 2.x's "!" padding, not <|endoftext|>
    # Unguided, the negative is not encoded: the prompt's own length decides.
    unguided = text.prepare([Request.build(info, prompt=words(5), negative_prompt=words(151), guidance_scale=1.0,
                                           steps=2)], False, "chunk")
    assert unguided.ids[0].shape == (1, 1, S)


def test_sdxl_a_long_prompt_2_chunks_both_tokenizers_each_with_its_own_padding(clip):
    info, tok1, tok2 = clip["infos"]["sdxl"], clip["sdxl"], clip["sdxl_2"]
    text = SDXLText(info, [tok1, tok2], torch.device("cpu"))
    short, long = words(10), words(151, start=5)
    req = Request.build(info, prompt=short, prompt_2=long, negative_prompt="x", steps=2)
    batch = text.prepare([req], True, "chunk")
    assert [i.shape for i in batch.ids] == [(2, 3, S), (2, 3, S)]
    pos = batch.rows[1]
    assert batch.ids[0][pos].tolist() == expected_chunks(tok1, short, 1) + [empty_chunk(tok1)] * 2
    assert batch.ids[1][pos].tolist() == expected_chunks(tok2, long, 3)
    assert batch.ids[0][pos, 1, 2:].tolist() == [tok1.eos_token_id] * 75  # CLIP ViT-L pads with EOS
    neg = batch.rows[0]
    assert batch.ids[1][neg].tolist() == expected_chunks(tok2, "x", 1) + [[49406, 49407] + [0] * 75] * 2


def test_sdxl_a_long_first_prompt_pads_the_second_tokenizers_short_prompt_with_its_pad(clip):
    info, tok1, tok2 = clip["infos"]["sdxl"], clip["sdxl"], clip["sdxl_2"]
    text = SDXLText(info, [tok1, tok2], torch.device("cpu"))
    req = Request.build(info, prompt=words(76), prompt_2=words(3), steps=2)  # no negative: zero rows
    batch = text.prepare([req], True, "chunk")
    assert batch.rows[0] is None and len(batch.unique) == 1
    assert [i.shape for i in batch.ids] == [(1, 2, S), (1, 2, S)]
    assert batch.ids[0][0].tolist() == expected_chunks(tok1, words(76), 2)
    assert batch.ids[1][0].tolist() == expected_chunks(tok2, words(3), 1) + [empty_chunk(tok2)]
    assert batch.ids[1][0, 1].tolist() == [49406, 49407] + [0] * 75


def test_sdxl_a_long_negative_prompt_2_sets_the_chunk_count_of_every_row(clip):
    info, tok1, tok2 = clip["infos"]["sdxl"], clip["sdxl"], clip["sdxl_2"]
    text = SDXLText(info, [tok1, tok2], torch.device("cpu"))
    req = Request.build(info, prompt=words(4), negative_prompt="y", negative_prompt_2=words(160), steps=2)
    batch = text.prepare([req], True, "chunk")
    assert [i.shape for i in batch.ids] == [(2, 3, S), (2, 3, S)]
    neg, pos = batch.rows
    assert batch.ids[1][neg].tolist() == expected_chunks(tok2, words(160), 3)
    assert batch.ids[0][neg].tolist() == expected_chunks(tok1, "y", 1) + [empty_chunk(tok1)] * 2
    assert batch.ids[1][pos].tolist() == expected_chunks(tok2, words(4), 1) + [empty_chunk(tok2)] * 2
    truncated = text.prepare([req], True, "truncate")  # truncate: one row each, whatever the lengths
    assert [i.shape for i in truncated.ids] == [(2, 1, S), (2, 1, S)]
    assert truncated.ids[1][neg, 0].tolist() == tok2(words(160), padding="max_length", max_length=S,
                                                     truncation=True).input_ids


# -- end to end on the tiny model: the U-Net's text is the chunks' embeddings, in order ---------

class Recorder:
    """A U-Net engine that records the conditioning it is called with."""

    def __init__(self, unet):
        self.unet, self.spec, self.device = unet, unet.spec, unet.device
        self.precision, self.profile, self.size_multiple, self.graph_safe = (
            unet.precision, unet.profile, unet.size_multiple, unet.graph_safe)
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, **inputs):
        self.calls.append({k: v.clone() for k, v in inputs.items()})
        return self.unet(**inputs)


@pytest.fixture(scope="module")
def recorded(tiny_info):
    engines = load_engines(tiny_info, "torch", torch.device("cpu"), Precision.FP32)
    rec = Recorder(engines["unet"])
    pipe = Pipeline(tiny_info, {**engines, "unet": rec}, torch.device("cpu"), Precision.FP32, "torch")
    return pipe, rec, engines["text_encoder"]


def test_the_unet_reads_a_long_negatives_chunks_and_the_short_prompts_padded_chunks(recorded):
    pipe, rec, text_encoder = recorded
    tok = pipe.tokenizer
    prompt, negative = words(6), words(80, start=4)
    rec.calls.clear()
    pipe.generate(prompt, negative_prompt=negative, steps=1, guidance_scale=5.0, seed=0, long_prompt="chunk")
    hidden = rec.calls[0]["encoder_hidden_states"]
    assert hidden.shape == (2, 2 * S, 32)  # [uncond, cond], each 2 chunks of 77
    for row, text in ((0, negative), (1, prompt)):
        k = chunks_for(n_tokens(tok, text))
        ids = expected_chunks(tok, text, k) + [empty_chunk(tok)] * (2 - k)
        want = text_encoder(input_ids=torch.tensor(ids))["last_hidden_state"].reshape(2 * S, -1)
        torch.testing.assert_close(hidden[row], want, rtol=1e-5, atol=1e-5)
    rec.calls.clear()
    pipe.generate(prompt, negative_prompt=negative, steps=1, guidance_scale=5.0, seed=0, long_prompt="truncate")
    assert rec.calls[0]["encoder_hidden_states"].shape == (2, S, 32)


def test_a_batch_of_a_long_and_a_short_prompt_feeds_the_unet_one_length(recorded):
    pipe, rec, text_encoder = recorded
    tok = pipe.tokenizer
    prompts = [words(151), words(2, start=9)]
    rec.calls.clear()
    pipe.generate(prompts, steps=1, guidance_scale=1.0, seed=0)  # unguided: the prompts' rows only
    hidden = rec.calls[0]["encoder_hidden_states"]
    assert hidden.shape == (2, 3 * S, 32)
    short = expected_chunks(tok, prompts[1], 1) + [empty_chunk(tok)] * 2
    want = text_encoder(input_ids=torch.tensor(short))["last_hidden_state"].reshape(3 * S, -1)
    torch.testing.assert_close(hidden[1], want, rtol=1e-5, atol=1e-5)
