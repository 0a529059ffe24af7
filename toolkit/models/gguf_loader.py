"""Read GGUF files (llama architecture) into HF-named fp32 tensors, a config and a tokenizer.

Tensors are de-quantized with the `gguf` package (Q4_0, Q4_1, Q8_0, F16, F32 and the other types it
knows). llama.cpp's converter permutes q/k rows for its RoPE layout; we undo it so the weights match
Hugging Face's rotate-half convention (the same as transformers' GGUF loader).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from .llama import LlamaConfig

SUPPORTED = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}

_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def _reader(path: str | os.PathLike):
    import gguf

    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"GGUF file {p} does not exist", hint="check the path")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as exc:  # gguf raises ValueError/IndexError/struct errors on damaged files
        raise ModelLoadError(f"{p} is not a readable GGUF file ({type(exc).__name__}: {exc})",
                             hint="the file is truncated or not GGUF; download it again") from None


def _field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_gguf(path: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor], dict]:
    """Return (config, HF-named fp32 state dict, tokenizer metadata)."""
    import gguf

    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported",
                             hint="edgetk reads llama-family GGUF files (llama, qwen2)")
    tokens = _field(r, "tokenizer.ggml.tokens") or []
    heads = int(_field(r, f"{arch}.attention.head_count"))
    kv = int(_field(r, f"{arch}.attention.head_count_kv", heads))
    hidden = int(_field(r, f"{arch}.embedding_length"))
    names = {t.name for t in r.tensors}
    cfg = LlamaConfig(
        vocab_size=int(_field(r, f"{arch}.vocab_size", len(tokens))), hidden_size=hidden,
        intermediate_size=int(_field(r, f"{arch}.feed_forward_length")),
        num_layers=int(_field(r, f"{arch}.block_count")), num_heads=heads, num_kv_heads=kv,
        head_dim=int(_field(r, f"{arch}.rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
        rms_eps=float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=min(int(_field(r, f"{arch}.context_length", 2048)), 8192),
        tie_embeddings="output.weight" not in names, attention_bias=arch == "qwen2",
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"), eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
    )
    state: dict[str, torch.Tensor] = {}
    for t in r.tensors:
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED:
            raise ModelLoadError(f"GGUF tensor {t.name} has type {qtype}, which edgetk cannot de-quantize",
                                 hint=f"supported: {sorted(SUPPORTED)}")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as exc:
            raise ModelLoadError(f"GGUF tensor {t.name} cannot be read ({exc})",
                                 hint="the file is truncated or damaged; download it again") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True).reshape(shape))
        name = _hf_name(t.name)
        if name.endswith("q_proj.weight") and arch == "llama":
            w = _unpermute(w, heads)
        elif name.endswith("k_proj.weight") and arch == "llama":
            w = _unpermute(w, kv)
        state[name] = w
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    tok = {
        "model": _field(r, "tokenizer.ggml.model"), "pre": _field(r, "tokenizer.ggml.pre"),
        "tokens": tokens, "merges": _field(r, "tokenizer.ggml.merges") or [],
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "chat_template": _field(r, "tokenizer.chat_template"),
    }
    return cfg, state, tok


def _hf_name(name: str) -> str:
    if name in _NAMES:
        return _NAMES[name]
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) >= 4 and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    raise ModelLoadError(f"unknown GGUF tensor name {name!r}", hint="only llama-family GGUF files are supported")


def gguf_tokenizer_json(tok: dict) -> str:
    """Build a `tokenizers` byte-level BPE tokenizer (GPT-2 style) from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if tok.get("model") != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer model {tok.get('model')!r} is not supported",
                             hint="edgetk reads byte-level BPE ('gpt2') GGUF tokenizers")
    vocab = {t: i for i, t in enumerate(tok["tokens"])}
    merges = [tuple(m.split(" ", 1)) for m in tok["merges"]]
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if tok.get("pre") == "smollm":  # SmolLM splits every digit on its own
        pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
    t.pre_tokenizer = pre_tokenizers.Sequence(pre)
    t.decoder = decoders.ByteLevel()
    specials = [s for s in tok["tokens"] if s.startswith("<|") and s.endswith("|>")]
    t.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return t.to_str()
