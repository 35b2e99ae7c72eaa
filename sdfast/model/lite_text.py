"""The lite path's CLIP text encoder and tokenizer (see sdfast/model/lite.py): transformers'
CLIPTextModel forward (sdpa attention, causal, no mask) and CLIPTokenizer's ``tokenizers``
pipeline, built without importing transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _Lite(nn.Module):
    """What the pipeline reads of a diffusers / transformers module besides its forward."""

    lite = True  # engines/torch.set_attention: these run PyTorch SDPA, nothing else

    def set_attn_processor(self, processor) -> None:
        """diffusers' call, for engines/torch.set_attention: these modules run SDPA only."""
        if type(processor).__name__ != "AttnProcessor2_0":
            raise ValueError(f"sdfast's lite modules run PyTorch SDPA only, not {type(processor).__name__}")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


# -- CLIP text encoder (transformers' CLIPTextModel, sdpa attention) ------------------------

class _CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        input_shape = h.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(h).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(h).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(h).view(hidden_shape).transpose(1, 2)
        q_length = q.shape[2]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scale,
                                             is_causal=q_length > 1)
        out = out.reshape(out.shape[0], -1, q_length, v.shape[-1]).transpose(1, 2).contiguous()
        return self.out_proj(out.reshape(*input_shape, -1).contiguous())


class _CLIPMLP(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, inner), nn.Linear(inner, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.fc1(h)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class _CLIPLayer(nn.Module):
    def __init__(self, dim: int, heads: int, inner: int, eps: float):
        super().__init__()
        self.self_attn = _CLIPAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _CLIPMLP(dim, inner)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.layer_norm1(h))
        return h + self.mlp(self.layer_norm2(h))


class _CLIPEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, dim)
        self.position_embedding = nn.Embedding(positions, dim)
        self.register_buffer("position_ids", torch.arange(positions).expand((1, -1)), persistent=False)


class _CLIPEncoder(nn.Module):
    def __init__(self, layers: list[_CLIPLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class LiteCLIPTextModel(_Lite):
    """CLIPTextModel's last hidden states (``model(ids, return_dict=False)[0]``), as SD calls it."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        dim, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-5)
        self.embeddings = _CLIPEmbeddings(config["vocab_size"], config["max_position_embeddings"], dim)
        self.encoder = _CLIPEncoder([_CLIPLayer(dim, config["num_attention_heads"], config["intermediate_size"], eps)
                                     for _ in range(config["num_hidden_layers"])])
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, input_ids: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        input_ids = input_ids.view(-1, input_ids.size()[-1])
        e = self.embeddings
        h = e.token_embedding(input_ids) + e.position_embedding(e.position_ids[:, : input_ids.shape[-1]])
        for layer in self.encoder.layers:
            h = layer(h)
        return (self.final_layer_norm(h),)


#: tokenizer_config.json keys the lite tokenizer reproduces (any other key: transformers' CLIPTokenizer).
TOKENIZER_KEYS = {"tokenizer_class", "bos_token", "eos_token", "unk_token", "pad_token", "model_max_length",
                  "do_lower_case", "clean_up_tokenization_spaces", "errors", "add_prefix_space"}
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def tokenizer_unsupported(folder: Path) -> str | None:
    """Why ``LiteTokenizer`` cannot stand in for the CLIPTokenizer of ``folder`` (None: it can)."""
    import json

    if (folder / "tokenizer.json").exists() or not (folder / "vocab.json").is_file() \
            or not (folder / "merges.txt").is_file():
        return "not a vocab.json + merges.txt tokenizer"
    cfg_path, special_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    special = json.loads(special_path.read_text()) if special_path.is_file() else {}
    if not set(cfg) <= TOKENIZER_KEYS or cfg.get("tokenizer_class", "CLIPTokenizer") != "CLIPTokenizer":
        return "tokenizer_config.json beyond a plain CLIPTokenizer"
    if cfg.get("clean_up_tokenization_spaces") or cfg.get("errors", "replace") != "replace":
        return "tokenizer clean-up options"
    tokens = {**special, **{k: v for k, v in cfg.items() if k.endswith("_token")}}
    if tokens and tokens != {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}:
        return "special tokens other than CLIP's"
    return None


class _Encoded:
    def __init__(self, input_ids: list[list[int]] | list[int]):
        self.input_ids = input_ids


class LiteTokenizer:
    """transformers' CLIPTokenizer (v5, ``tokenizers``-backed) for the calls sdfast makes:
    ``tok(texts).input_ids`` (untruncated, BOS … EOS), the special ids, ``decode``. The Rust
    tokenizer is built as CLIPTokenizer builds it (normalizer, split pattern, byte-level BPE
    with ``</w>``, the RoBERTa-style post-processor), so the ids are the same."""

    def __init__(self, folder: Path, model_max_length: int):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE

        vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="</w>", fuse_unk=False, unk_token=EOS))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                       r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS)])
        self.bos_token_id, self.eos_token_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
        self.pad_token_id = self.eos_token_id
        tok.post_processor = processors.RobertaProcessing((EOS, self.eos_token_id), (BOS, self.bos_token_id),
                                                          False, False)
        self.backend_tokenizer = tok
        self.model_max_length = model_max_length

    def __call__(self, texts: str | list[str], verbose: bool = False) -> _Encoded:
        if isinstance(texts, str):
            return _Encoded(self.backend_tokenizer.encode(texts).ids)
        return _Encoded([e.ids for e in self.backend_tokenizer.encode_batch(list(texts))])

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend_tokenizer.decode(ids, skip_special_tokens=False).replace("</w>", " ").strip()
