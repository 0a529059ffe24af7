"""Exporting decoders: a one-token step with the KV cache carried across steps, and the golden check.

Two cache modes, chosen by the format (`Exporter.cache_mode`):

* "explicit" (ONNX, TVM): `DecoderStep(model)(tokens, input_pos, k_cache, v_cache) -> (logits, k_cache, v_cache)`
  is a pure function; the caches are graph inputs and outputs of shape
  [num_layers, batch, num_kv_heads, max_seq_len, head_dim] and the caller feeds the returned caches back.
* "mutable" (ExecuTorch): `DecoderMutable(model)(tokens, input_pos) -> logits`; the caches are the
  model's own buffers, mutated in place inside the program (state lives in the loaded method).

Golden check: feed a prompt one token at a time, then decode greedily `golden_steps` tokens; the artifact's
tokens must equal eager PyTorch's token for token (logit errors recorded as well).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgetk.errors import ConfigError, ParityError

from .common import ExportConfig, ExportPlan, Tolerance, compare

DEFAULT_PROMPT = "The capital of France is"
EXPLICIT_INPUTS = ["tokens", "input_pos", "k_cache", "v_cache"]
EXPLICIT_OUTPUTS = ["logits", "k_cache_out", "v_cache_out"]


class StepKVCache(nn.Module):
    """A functional per-layer cache: reads `k`/`v` set by DecoderStep, leaves updated copies in `new_k`/`new_v`."""

    def __init__(self):
        super().__init__()
        self.k = self.v = self.new_k = self.new_v = None

    def attend(self, q, k_new, v_new, input_pos, cos, sin, mask):
        k = self.k.index_copy(2, input_pos, k_new)
        v = self.v.index_copy(2, input_pos, v_new)
        self.new_k, self.new_v = k, v
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:
            b, h, s, d = k.shape
            k = k[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
            v = v[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@contextlib.contextmanager
def cache_installed(model: nn.Module, max_seq_len: int, factory: Callable | None) -> Iterator[None]:
    """Set up a cache on `model` for the duration; restore whatever cache state it had before."""
    layers = model.model.layers
    saved = ([l.self_attn.kv_cache for l in layers], model.causal_mask, model.cache_len)
    try:
        model.setup_cache(1, max_seq_len, cache_factory=factory)
        yield
    finally:
        for l, c in zip(layers, saved[0]):
            l.self_attn.kv_cache = c
        model.causal_mask, model.cache_len = saved[1], saved[2]


class DecoderStep(nn.Module):
    """Pure decode step with the KV caches as explicit inputs/outputs (install StepKVCache first)."""

    def __init__(self, model: nn.Module, tied_head_as_left_operand: bool = False):
        super().__init__()
        self.model = model
        self.head_left = _tied(model, tied_head_as_left_operand)

    def forward(self, tokens, input_pos, k_cache, v_cache):
        layers = self.model.model.layers
        for i, layer in enumerate(layers):
            c = layer.self_attn.kv_cache
            c.k, c.v = k_cache[i], v_cache[i]
        logits = _logits(self.model, tokens, input_pos, self.head_left)
        new_k = torch.stack([l.self_attn.kv_cache.new_k for l in layers])
        new_v = torch.stack([l.self_attn.kv_cache.new_v for l in layers])
        return logits, new_k, new_v


class DecoderMutable(nn.Module):
    """Decode step over the model's own (mutable) cache buffers."""

    def __init__(self, model: nn.Module, tied_head_as_left_operand: bool = False):
        super().__init__()
        self.model = model
        self.head_left = _tied(model, tied_head_as_left_operand)

    def forward(self, tokens, input_pos):
        return _logits(self.model, tokens, input_pos, self.head_left)


def _tied(model: nn.Module, tied_head_as_left_operand: bool) -> bool:
    """Tied embeddings: logits = (E · hᵀ)ᵀ reads the embedding matrix E as it is, so a format that folds the
    transpose of x · Eᵀ into a constant (TVM's FoldConstant) or hands the head's weight to a backend that keeps
    its own copy (ExecuTorch's XNNPACK delegate) does not store E twice."""
    return tied_head_as_left_operand and model.lm_head.weight is model.model.embed_tokens.weight


def _logits(model: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor, head_left: bool) -> torch.Tensor:
    if not head_left:
        return model(tokens, input_pos)
    h = model.hidden_states(tokens, input_pos)  # [1, T, D]
    return torch.matmul(model.lm_head.weight, h[0].transpose(0, 1)).transpose(0, 1)[None]


def cache_shape(cfg: Any, max_seq_len: int) -> list[int]:
    return [cfg.num_layers, 1, cfg.num_kv_heads, max_seq_len, cfg.head_dim]


def decoder_plan(loaded: Any, cfg: ExportConfig, mode: str, tied_head_as_left_operand: bool = False) -> ExportPlan:
    """The step wrapper and its example inputs. The caller installs the cache (`cache_installed`)."""
    model = loaded.model
    mcfg = getattr(model, "cfg", None)
    if mcfg is None or not hasattr(model, "setup_cache"):
        raise ConfigError(f"decoder {loaded.name} is not an edgetk LlamaForCausalLM (no setup_cache)",
                          hint="pass example_inputs and export it as a plain module")
    if cfg.max_seq_len > mcfg.max_seq_len:
        raise ConfigError(f"config field 'max_seq_len' = {cfg.max_seq_len} exceeds the model's "
                          f"{mcfg.max_seq_len}", hint="lower max_seq_len")
    tokens = torch.zeros(1, 1, dtype=torch.long)
    pos = torch.zeros(1, dtype=torch.long)
    shape = cache_shape(mcfg, cfg.max_seq_len)
    meta = {"mode": mode, "max_seq_len": cfg.max_seq_len, "batch": 1, "tokens_per_step": 1,
            "num_layers": mcfg.num_layers, "num_kv_heads": mcfg.num_kv_heads, "head_dim": mcfg.head_dim,
            "vocab_size": mcfg.vocab_size, "cache_shape": shape, "cache_dtype": "float32"}
    if mode == "explicit":
        z = torch.zeros(shape)
        return ExportPlan(DecoderStep(model, tied_head_as_left_operand), (tokens, pos, z, z.clone()),
                          list(EXPLICIT_INPUTS),
                          list(EXPLICIT_OUTPUTS), kind="decoder", decoder=meta, source=loaded)
    return ExportPlan(DecoderMutable(model, tied_head_as_left_operand), (tokens, pos), ["tokens", "input_pos"],
                      ["logits"], kind="decoder", decoder=meta, source=loaded)


def cache_factory(mode: str) -> Callable | None:
    return (lambda i, c, b, s: StepKVCache()) if mode == "explicit" else None


# -- steppers: one token in, logits out, cache carried inside -----------------------------------------
class ExplicitStepper:
    """Drives an explicit-cache step function `run([tokens, pos, k, v]) -> [logits, k, v]`."""

    def __init__(self, run: Callable[[list[np.ndarray]], list[np.ndarray]], shape: Sequence[int]):
        self._run, self._shape = run, list(shape)
        self.k = np.zeros(self._shape, np.float32)
        self.v = np.zeros(self._shape, np.float32)

    def step(self, token: int, pos: int) -> np.ndarray:
        out = self._run([np.array([[token]], np.int64), np.array([pos], np.int64), self.k, self.v])
        logits, self.k, self.v = out[0], np.asarray(out[1]), np.asarray(out[2])
        return np.asarray(logits).reshape(-1)


class MutableStepper:
    """Drives a stateful step `run([tokens, pos]) -> [logits]` (a freshly loaded program)."""

    def __init__(self, run: Callable[[list[np.ndarray]], list[np.ndarray]]):
        self._run = run

    def step(self, token: int, pos: int) -> np.ndarray:
        return np.asarray(self._run([np.array([[token]], np.int64), np.array([pos], np.int64)])[0]).reshape(-1)


def eager_stepper(plan: ExportPlan) -> Any:
    """The eager counterpart of the exported step (the cache must be installed on the model)."""
    meta = plan.decoder

    @torch.no_grad()
    def run(arrays):
        return [o.numpy() for o in _as_tuple(plan.module(*[torch.from_numpy(np.asarray(a)) for a in arrays]))]

    if meta["mode"] == "explicit":
        return ExplicitStepper(run, meta["cache_shape"])
    for layer in plan.module.model.model.layers:  # fresh, zeroed dense caches
        c = layer.self_attn.kv_cache
        c.k.zero_()
        c.v.zero_()
    return MutableStepper(run)


def _as_tuple(x):
    return x if isinstance(x, (tuple, list)) else (x,)


def prompt_tokens(loaded: Any, vocab: int, prompt: str = DEFAULT_PROMPT) -> list[int]:
    tok = getattr(loaded, "tokenizer", None)
    ids = tok.encode(prompt) if tok is not None else []
    if not ids:
        ids = [(7 * i + 3) % vocab for i in range(6)]
    bos = getattr(getattr(loaded.model, "cfg", None), "bos_token_id", None)
    return ([bos] if bos is not None and tok is not None else []) + ids


def golden(runtime: Any, eager: Any, prompt: list[int], steps: int, tol: Tolerance) -> dict[str, Any]:
    """Greedy decode through both steppers; tokens must be identical, logits within tolerance."""
    tokens_rt: list[int] = []
    tokens_ref: list[int] = []
    worst = {"max_abs": 0.0, "max_rel": 0.0}
    seq = list(prompt)
    for pos in range(len(prompt) + steps):
        token = seq[pos]
        a, b = runtime.step(token, pos), eager.step(token, pos)
        per = compare(["logits"], [a], [b], tol, f"golden decode step {pos} (position {pos})")["logits"]
        worst = {k: max(worst[k], per[k]) for k in worst}
        if pos >= len(prompt) - 1:
            nxt_rt, nxt_ref = int(np.argmax(a)), int(np.argmax(b))
            tokens_rt.append(nxt_rt)
            tokens_ref.append(nxt_ref)
            if nxt_rt != nxt_ref:
                raise ParityError(f"golden decode: greedy token {len(tokens_rt)} differs from eager "
                                  f"({nxt_rt} vs {nxt_ref}) at position {pos + 1}",
                                  hint="the exported step or its cache handling diverges from eager")
            seq.append(nxt_ref)
    return {"prompt_tokens": len(prompt), "steps": steps, "identical": True, "tokens": tokens_ref[:steps],
            "logits_max_abs": worst["max_abs"], "logits_max_rel": worst["max_rel"],
            "atol": tol.atol, "rtol": tol.rtol}
