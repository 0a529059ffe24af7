"""Rotating a decoder's residual stream (incoherence processing, as in QuIP#, QuaRot and SpinQuant's R1).

For a random orthogonal Q [hidden, hidden] the model computes exactly the same function when

* each RMSNorm weight is folded into the linears that read its output (q/k/v after `input_layernorm`,
  gate/up after `post_attention_layernorm`; the norm weights become 1, so the norms commute with Q),
* the linears reading the residual stream take W ← W·Q and those writing it (o_proj, down_proj) W ← Qᵀ·W,
* the embeddings enter the stream as E[tok]·Q and the stream leaves it as x·Qᵀ before the final norm
  (`LlamaForCausalLM.embed` / `hidden_states` with `cfg.residual_rotation`; the tied head keeps E as it is).

The rotated weights have no outlier input channels left: every channel carries a mix of all of them, so a
quantizer's error spreads evenly instead of hitting the few channels with the largest activations (on
smollm2-135m, `vq2` without fine-tuning: perplexity 164 -> 137 on the first 40 evaluation windows). Put it first
in a recipe (`rotate+vq2-mix-kd`): it needs the layers dense. The cost at run time is two [hidden, hidden]
products per token (embedding in, final state out); Q is stored once, in float32, and counted in the
whole-model bits.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config, check, config
from ..errors import ConfigError
from . import CompressionReport, register_method, register_preset

_IN = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
       "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}
_OUT = ("self_attn.o_proj", "mlp.down_proj")


@config("rotate", version=1)
@dataclass(frozen=True)
class RotateConfig(Config):
    seed: int = 0  # of the random orthogonal matrix (QR of a Gaussian one, in float64)
    check_tokens: int = 16  # tokens of the before/after logit check reported (0 = skip the check)
    needs_calibration = False

    def validate(self) -> None:
        check(self.seed >= 0, "seed", self.seed, ">= 0")
        check(self.check_tokens >= 0, "check_tokens", self.check_tokens, ">= 0")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal matrix [n, n] (float64), reproducible from `seed`."""
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def _check(model: nn.Module) -> None:
    """A Llama-family decoder whose linears are still dense."""
    from ..models.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise ConfigError(f"rotate works on Llama-family decoders, not {type(model).__name__}",
                          hint="leave 'rotate' out of the recipe for this model")
    for i, layer in enumerate(model.model.layers):
        for name in (*_IN["input_layernorm"], *_IN["post_attention_layernorm"], *_OUT):
            m = layer.get_submodule(name)
            if type(m) is not nn.Linear:
                raise ConfigError(f"rotate needs dense linears, but model.layers.{i}.{name} is a {type(m).__name__}",
                                  hint="put rotate first in the recipe, e.g. 'rotate+vq2'")


@torch.no_grad()
def rotate_residual(model: nn.Module, q: torch.Tensor) -> None:
    """Rotate `model`'s residual stream by the orthogonal `q` [hidden, hidden] in place (composes with an earlier
    rotation). The arithmetic runs in float64, each weight is rounded once to its dtype."""
    _check(model)
    q = q.double()
    for layer in model.model.layers:
        for norm_name, names in _IN.items():
            norm = layer.get_submodule(norm_name)
            g = norm.weight.double()
            for name in names:
                w = layer.get_submodule(name).weight
                w.copy_((w.double() * g[None, :]) @ q)
            norm.weight.fill_(1.0)
        for name in _OUT:
            w = layer.get_submodule(name).weight
            w.copy_(q.T @ w.double())
    prev = model.rotation.double() if model.cfg.residual_rotation else torch.eye(q.shape[0], dtype=torch.float64)
    model.cfg = dataclasses.replace(model.cfg, residual_rotation=True)
    model.register_buffer("rotation", (prev @ q).float())


@register_method(RotateConfig)
def apply_rotate(loaded, cfg: RotateConfig, calib: torch.Tensor | None) -> CompressionReport:
    model = loaded.model
    _check(model)
    earlier = [c.get("kind") for c in loaded.compression if c.get("kind") != "rotate"]
    if earlier:  # e.g. pruned weights are still nn.Linear, but W·Q would fill in their zeros
        raise ConfigError(f"rotate must come before the other compression steps, but this model already went "
                          f"through {earlier}", hint="put rotate first in the recipe, e.g. 'rotate+prune-2of4'")
    hidden, n_check = model.cfg.hidden_size, min(cfg.check_tokens, model.cfg.max_seq_len)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, n_check), generator=torch.Generator().manual_seed(cfg.seed))
    with torch.no_grad():
        before = model(tokens) if n_check else None
    rotate_residual(model, random_orthogonal(hidden, cfg.seed))
    loaded.config = model.cfg
    totals = {"rotation_dim": hidden, "rotation_seed": cfg.seed}
    if before is not None:
        with torch.no_grad():
            after = model(tokens)
        # the rotation is exact up to float32 rounding: this is what the CLI summary shows
        totals["rotation_max_abs_logit_change"] = float((after - before).abs().max())
    return CompressionReport("rotate", cfg.to_dict(), totals=totals)


register_preset("rotate", RotateConfig(), description="rotate the residual stream by a random orthogonal matrix "
                "(exact; spreads outlier channels before quantization). Put it first: rotate+vq2")
