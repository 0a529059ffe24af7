"""edgetk's BERT-family sentence encoder (MiniLM, BERT), with mean pooling + L2 normalisation.

Parameter names equal Hugging Face's `BertModel` (no `bert.` prefix), so sentence-transformers
checkpoints load directly. `forward(input_ids, attention_mask)` returns normalised embeddings;
`token_states(...)` returns the last hidden states (token merging works on those).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, check, config


@config("bert", version=1)
@dataclass(frozen=True)
class BertConfig(Config):
    vocab_size: int = 30522
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_layers: int = 6
    num_heads: int = 12
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pooling: str = "mean"
    normalize: bool = True

    def validate(self) -> None:
        check(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
              f"a divisor of hidden_size={self.hidden_size}")
        check(self.pooling in ("mean", "cls"), "pooling", self.pooling, "'mean' or 'cls'")

    @classmethod
    def from_hf(cls, hf: dict, pooling: str = "mean", normalize: bool = True) -> "BertConfig":
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                   intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
                   num_heads=hf["num_attention_heads"], max_position=hf["max_position_embeddings"],
                   type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
                   pooling=pooling, normalize=normalize)

    def to_hf(self) -> dict:
        return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "max_position_embeddings": self.max_position, "type_vocab_size": self.type_vocab_size,
                "layer_norm_eps": self.layer_norm_eps, "hidden_act": "gelu"}


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids):
        t = ids.shape[1]
        pos = torch.arange(t, device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class _Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Dense(c.hidden_size, c.hidden_size, c.layer_norm_eps)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.c = c
        self.attention = _Attention(c)
        self.intermediate = _Dense(c.hidden_size, c.intermediate_size)
        self.output = _Dense(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def attend(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Self-attention output projection (before the residual). bias [B, 1, 1|T, T] additive."""
        b, t, d = x.shape
        h = self.c.num_heads
        sa = self.attention.self
        q, k, v = (m(x).view(b, t, h, d // h).transpose(1, 2) for m in (sa.query, sa.key, sa.value))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.attention.output.dense(y.transpose(1, 2).reshape(b, t, d))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        y = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(x + y)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention.output.LayerNorm(x + self.attend(x, bias))
        return self.mlp(x)


class _Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids: for encoders that replace this one (token merging by word boundaries)
        for layer in self.layer:
            x = layer(x, bias)
        return x


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        bias = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        return self.encoder(self.embeddings(input_ids), bias, input_ids)

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.pooling == "cls":
            emb = states[:, 0]
        else:
            if attention_mask is None:
                emb = states.mean(1)
            else:
                m = attention_mask[..., None].to(states.dtype)
                emb = (states * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(emb, dim=-1) if self.cfg.normalize else emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.token_states(input_ids, attention_mask), attention_mask)


def init_random(cfg: BertConfig, seed: int = 0) -> BertEncoder:
    g = torch.Generator().manual_seed(seed)
    m = BertEncoder(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "LayerNorm" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return m.eval()
