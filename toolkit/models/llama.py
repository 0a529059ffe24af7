"""edgetk's export-friendly Llama-family decoder (SmolLM2, Llama, Qwen2-style GQA).

Parameter names equal Hugging Face's `LlamaForCausalLM`, so HF safetensors load directly.
The KV cache is a static, pre-allocated object per layer (`DenseKVCache` by default); other caches
(quantized, see edgetk.runtimes) plug in through `model.setup_cache(..., cache_factory=...)`.
All shapes are static given (batch, max_seq_len), which torch.export, ONNX, ExecuTorch and TVM need.

Forward modes:
  * `model(tokens)` with no cache set up: plain causal attention over `tokens` (perplexity, calibration).
  * `model(tokens, input_pos)` after `setup_cache`: writes keys/values at `input_pos` and attends
    to every cached position <= each query's position (prefill: input_pos = arange(T); decode: [pos]).
    In plain eager runs over the default `DenseKVCache` the attention reads only the slots up to the last
    one the mask lets any query see (not the whole static length: decoding at position p of a 2048-slot
    cache costs what a p-slot cache would); traced and exported graphs keep the static shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, check, config


@config("llama", version=1)
@dataclass(frozen=True)
class LlamaConfig(Config):
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # the residual stream runs in a rotated basis (edgetk.compress.rotate): embeddings are multiplied by the
    # orthogonal `rotation` buffer on the way in and by its transpose before the final norm
    residual_rotation: bool = False

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_seq_len"):
            check(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
              f"a divisor of num_heads={self.num_heads}")
        check(self.head_dim % 2 == 0, "head_dim", self.head_dim, "an even number (RoPE rotates pairs)")
        check(self.rms_eps > 0, "rms_eps", self.rms_eps, "> 0")

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rms_eps=hf.get("rms_norm_eps", 1e-5), max_seq_len=min(hf.get("max_position_embeddings", 2048), 8192),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", hf.get("model_type") == "qwen2"),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=_first(hf.get("eos_token_id")),
        )

    def to_hf(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps, "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings, "attention_bias": self.attention_bias,
            "hidden_act": "silu", "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        }


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and not torch.is_grad_enabled() and not _tracing():
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # eager inference: one op, not six
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    t = torch.arange(cfg.max_seq_len, dtype=torch.float64)
    freqs = torch.outer(t, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D] for the positions of x."""
    return x * cos + rotate_half(x) * sin


def rope_rows(cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager decoding: the RoPE rows of positions `pos`, gathered once a step for every layer, with rotate_half's
    sign folded into the sines (`apply_rope_rows`)."""
    half = cos.shape[-1] // 2
    s = sin[pos]
    return cos[pos], torch.cat([-s[:, :half], s[:, half:]], dim=-1)


def apply_rope_rows(x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """`apply_rope` with `rope_rows`' tables: rotate_half(x) * sin = roll(x, D/2) * signed sin (two ops fewer)."""
    cos, sin_signed = rows
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _gqa_attention(q, k, v, n_rep: int, **kw) -> torch.Tensor:
    """SDPA with `n_rep` query heads a KV head. Eager: SDPA's own GQA (no expanded copies of the keys and values:
    a decode step's attention over 128 / 512 slots 2.8x / 2.2x faster on the AVX2 host); tracers (every exporter)
    keep the explicit `repeat_kv`, which every backend lowers."""
    if n_rep > 1 and not _tracing():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), **kw)


def _tracing() -> bool:
    """True under torch.jit tracing, torch.compile and torch.export (static shapes needed)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def attended_prefix(mask: torch.Tensor, input_pos: torch.Tensor | None = None) -> int:
    """The number of leading cache slots that mask [T, S] lets some query see (1 + the last True column; at
    least 1). With `input_pos` the mask is the causal one of those positions: 1 + their maximum, no scan."""
    if input_pos is not None:
        return int(input_pos.max()) + 1
    cols = mask.any(0).nonzero()
    return int(cols[-1]) + 1 if cols.numel() else 1


class DenseKVCache(nn.Module):
    """fp cache [B, KV, S, D]; keys stored after RoPE. `attend` = update + masked attention."""

    def __init__(self, batch: int, num_kv_heads: int, max_seq_len: int, head_dim: int, dtype=torch.float32):
        super().__init__()
        shape = (batch, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, input_pos: torch.Tensor,
               cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q, k_new already rotated for `input_pos`; mask [T, S] boolean (True = attend)."""
        self.k.index_copy_(2, input_pos, k_new)
        self.v.index_copy_(2, input_pos, v_new)
        n_rep = q.shape[1] // self.k.shape[1]
        k, v = self.k, self.v
        if mask.shape[-1] < k.shape[2]:  # eager: the mask was cut after the last slot any query attends
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        return _gqa_attention(q, k, v, n_rep, attn_mask=mask)

    # `hidden_states` may hand `attend` a mask narrower than the cache (see `attended_prefix`)
    takes_short_mask = True

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


CacheFactory = Callable[[int, "LlamaConfig", int, int], nn.Module]  # (layer_idx, cfg, batch, max_seq)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.kv_cache: nn.Module | None = None

    def forward(self, x, cos, sin, input_pos=None, mask=None, rows=None):
        """`rows`: `rope_rows(cos, sin, input_pos)` when the caller gathered them once for every layer (eager)."""
        b, t, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(b, t, -1, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, c.head_dim).transpose(1, 2)
        if self.kv_cache is None:
            q, k = apply_rope(q, cos[:t], sin[:t]), apply_rope(k, cos[:t], sin[:t])
            y = _gqa_attention(q, k, v, c.num_heads // c.num_kv_heads, is_causal=True)
        else:
            raw = getattr(self.kv_cache, "wants_raw_keys", False)  # e.g. KVQuant: keys quantized pre-RoPE
            if rows is not None:
                q, k = apply_rope_rows(q, rows), k if raw else apply_rope_rows(k, rows)
            else:
                cp, sp = cos[input_pos], sin[input_pos]
                q, k = apply_rope(q, cp, sp), k if raw else apply_rope(k, cp, sp)
            y = self.kv_cache.attend(q, k, v, input_pos, cos, sin, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)

    def forward(self, x, cos, sin, input_pos=None, mask=None, rows=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos, mask, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("causal_mask", torch.ones(1, 1, dtype=torch.bool), persistent=False)
        if cfg.residual_rotation:
            self.register_buffer("rotation", torch.eye(cfg.hidden_size))
        self.cache_len = 0
        self._short_mask = False  # every layer's cache takes a mask cut to the attended slots (eager runs)

    # -- cache -----------------------------------------------------------------------------------
    def setup_cache(self, batch: int = 1, max_seq_len: int | None = None,
                    cache_factory: CacheFactory | None = None) -> None:
        s = max_seq_len or self.cfg.max_seq_len
        if s > self.cfg.max_seq_len:
            raise ValueError(f"max_seq_len {s} exceeds the model's {self.cfg.max_seq_len}")
        c = self.cfg
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.kv_cache = (cache_factory(i, c, batch, s) if cache_factory
                                        else DenseKVCache(batch, c.num_kv_heads, s, c.head_dim))
        self.causal_mask = torch.tril(torch.ones(s, s, dtype=torch.bool))
        self.cache_len = s
        self._short_mask = all(getattr(l.self_attn.kv_cache, "takes_short_mask", False) for l in self.model.layers)

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.causal_mask = torch.ones(1, 1, dtype=torch.bool)
        self.cache_len = 0
        self._short_mask = False

    def kv_cache_bytes(self) -> int:
        return sum(int(getattr(l.self_attn.kv_cache, "nbytes", 0)) for l in self.model.layers
                   if l.self_attn.kv_cache is not None)

    # -- forward ---------------------------------------------------------------------------------
    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, rope_pos: torch.Tensor | None = None) -> torch.Tensor:
        """`attn_mask` [T, max_seq_len] bool (True = attend) replaces the causal mask over cache slots and
        `rope_pos` [T] gives RoPE positions differing from the slots `input_pos` (tree attention for
        speculative decoding: draft tokens sit in consecutive slots, at their depth's position)."""
        x = self.embed(tokens)
        mask = None
        cos, sin = self.rope_cos, self.rope_sin
        if self.cache_len:
            if input_pos is None:
                raise ValueError("a KV cache is set up: pass input_pos (positions of `tokens`)")
            mask = self.causal_mask[input_pos] if attn_mask is None else attn_mask
            if self._short_mask and not _tracing():
                mask = mask[:, :attended_prefix(mask, input_pos if attn_mask is None else None)]
            if rope_pos is not None:  # the rows of the new slots carry their tokens' RoPE angles
                cos = cos.index_copy(0, input_pos, cos[rope_pos])
                sin = sin.index_copy(0, input_pos, sin[rope_pos])
        rows = None
        if self.cache_len and not _tracing():  # eager: each layer's RoPE rows gathered once, not per layer
            rows = rope_rows(cos, sin, input_pos)
        for layer in self.model.layers:
            x = layer(x, cos, sin, input_pos, mask, rows)
        if self.cfg.residual_rotation:  # back to the embedding basis (RMSNorm commutes with a rotation)
            x = x @ self.rotation.T
        return self.model.norm(x)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The residual stream's input: token embeddings (rotated when the stream runs rotated)."""
        x = self.model.embed_tokens(tokens)
        return x @ self.rotation if self.cfg.residual_rotation else x

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, rope_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(tokens, input_pos, attn_mask, rope_pos))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def init_random(cfg: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised decoder (tests, tiny benchmarks); weights scaled like trained ones."""
    g = torch.Generator().manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return m.eval()
