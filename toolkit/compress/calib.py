"""Helpers shared by the weight quantizers: honest bit accounting and block-by-block calibration.

* `model_bits(model)`: every bit the model's state dict holds (tied tensors counted once).
* `weight_totals(...)`: `bits_per_weight` over the quantized layers and `bits_per_weight_model` over the
  whole model (embeddings, norms and head included), against the original parameter count.
* `take_windows(calib, n, field, what)`: the first n calibration windows, warning when fewer were drawn.
* `kmeans` (weighted by the Hessian diagonal) and `chol_inv_upper` (GPTQ's factor of H⁻¹).
* `BlockRunner`: walks a Llama decoder one transformer block at a time. Only the current block's
  calibration activations (inputs and fp targets) are held; a `load_block(i)` hook can materialise a block
  from disk and `release_block(i)` drop it again, so a model larger than RAM can be quantized.
  `RESIDENT` counts blocks currently checked out (tests assert it never exceeds one).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import ConfigError, DataError

log = logging.getLogger(__name__)

QUANT_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def take_windows(calib: torch.Tensor, n: int, field: str, what: str) -> torch.Tensor:
    """The first `n` calibration windows; fewer drawn than `n` is said (a warning naming `field` and the fix), not
    silent, and the method uses those it has."""
    if n > calib.shape[0]:
        log.warning("%s: %s=%d but only %d calibration windows were drawn: using %d (draw more: --samples %d)",
                    what, field, n, calib.shape[0], calib.shape[0], n)
    return calib[:n]


def unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else id(t)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def model_bits(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in unique_tensors(model))


def param_count(model: nn.Module) -> int:
    """Parameters of the (uncompressed) model, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def weight_totals(model: nn.Module, n_params_orig: int, q_bits: int, q_weights: int) -> dict:
    total = model_bits(model)
    return {"bits_per_weight": q_bits / max(1, q_weights),
            "bits_per_weight_model": total / max(1, n_params_orig),
            "quantized_weights": q_weights, "quantized_bits": q_bits, "model_bits": total,
            "model_bytes": total // 8, "params": n_params_orig,
            "unquantized_bits": total - q_bits}


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def check_finite(name: str, w: torch.Tensor) -> None:
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise DataError(f"layer {name} has {bad} NaN/Inf weight(s); refusing to quantize it",
                        hint="fix or re-load the checkpoint (a NaN weight cannot be represented)")


# -- block-by-block calibration ----------------------------------------------------------------------
RESIDENT: dict[str, int] = {"now": 0, "max": 0}


def _llama(model: nn.Module):
    from ..models.llama import LlamaForCausalLM

    if not isinstance(model, LlamaForCausalLM):
        raise ConfigError(f"calibrated quantization walks Llama-family decoders, not {type(model).__name__}",
                          hint="use an RTN recipe (rtn2-g64) for other modules")
    return model


@dataclass
class BlockRunner:
    """Runs calibration windows through a decoder block by block.

    `process(i, block, x) -> None` quantizes block i in place given its inputs x [N, T, H] (the outputs of the
    already-quantized blocks before it). `load_block` / `release_block` bracket each block (default: the
    in-memory block, nothing released)."""
    model: nn.Module
    calib: torch.Tensor
    batch: int = 8
    load_block: Callable[[int], nn.Module] | None = None
    release_block: Callable[[int, nn.Module], None] | None = None
    blocks_done: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _llama(self.model)
        if self.calib is None or self.calib.ndim != 2 or self.calib.shape[0] == 0 or self.calib.shape[1] < 2:
            raise DataError("calibration needs token windows [N, T] with N >= 1 and T >= 2",
                            hint="pass a longer calibration text (--calib) or more samples")
        if self.calib.shape[1] > self.model.cfg.max_seq_len:
            raise DataError(f"calibration windows of {self.calib.shape[1]} tokens exceed the model's "
                            f"{self.model.cfg.max_seq_len}", hint="use shorter calibration samples")

    @property
    def num_blocks(self) -> int:
        return len(self.model.model.layers)

    @torch.no_grad()
    def embed(self) -> torch.Tensor:
        return torch.cat([self.model.embed(self.calib[i:i + self.batch])
                          for i in range(0, self.calib.shape[0], self.batch)])

    @torch.no_grad()
    def forward_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return torch.cat([block(x[i:i + self.batch], m.rope_cos, m.rope_sin)
                          for i in range(0, x.shape[0], self.batch)])

    def blocks(self) -> Iterator[tuple[int, nn.Module]]:
        for i in range(self.num_blocks):
            block = self.load_block(i) if self.load_block else self.model.model.layers[i]
            RESIDENT["now"] += 1
            RESIDENT["max"] = max(RESIDENT["max"], RESIDENT["now"])
            try:
                yield i, block
            finally:
                RESIDENT["now"] -= 1
                if self.release_block:
                    self.release_block(i, block)

    def run(self, process: Callable[[int, nn.Module, torch.Tensor], Callable | None], track_fn=None) -> None:
        """`process` may return a `finish()` callable, run after the next block's inputs were computed
        (e.g. to swap the dense stand-ins used for propagation for the packed modules)."""
        x = self.embed()
        it = self.blocks()
        for i, block in (track_fn(it, "blocks", self.num_blocks) if track_fn else it):
            finish = process(i, block, x)
            x = self.forward_block(block, x)  # inputs of the next block, through the quantized block
            if finish is not None:
                finish()
            self.blocks_done.append(i)


# -- per-block statistics ----------------------------------------------------------------------------
@torch.no_grad()
def block_hessians(runner: BlockRunner, block: nn.Module, names: tuple, x: torch.Tensor
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """H = XᵀX / tokens of each named linear's input (shared inputs computed once) and the block's
    output on x (the fp targets)."""
    hs: dict[str, torch.Tensor] = {}
    shared: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input tensor, its XᵀX): q/k/v and gate/up share
    count = {"tokens": 0}

    def hook(name):
        def fn(mod, args):
            # match by identity while holding a reference (an address could be reused by a later tensor)
            hit = next((xtx for t, xtx in shared if t is args[0]), None)
            if hit is None:
                inp = args[0].reshape(-1, args[0].shape[-1]).float()
                hit = (inp.T @ inp).double()
                shared.append((args[0], hit))
            hs[name] = hs.get(name, 0) + hit
        return fn

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        ys = []
        for i in range(0, x.shape[0], runner.batch):
            shared.clear()
            xb = x[i:i + runner.batch]
            ys.append(block(xb, runner.model.rope_cos, runner.model.rope_sin))
            count["tokens"] += xb.shape[0] * xb.shape[1]
    finally:
        for h in handles:
            h.remove()
    return {n: (h / count["tokens"]).float() for n, h in hs.items()}, torch.cat(ys)


def block_loss(runner: BlockRunner, block: nn.Module, x: torch.Tensor, y: torch.Tensor,
               weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """MSE of the block's output against y, relative to the block's own contribution ‖y - x‖²
    (optionally with substituted weights)."""
    from torch.func import functional_call

    m = runner.model
    num = den = 0.0
    for i in range(0, x.shape[0], runner.batch):
        xb, yb = x[i:i + runner.batch], y[i:i + runner.batch]
        out = (functional_call(block, weights, (xb, m.rope_cos, m.rope_sin), strict=False) if weights
               else block(xb, m.rope_cos, m.rope_sin))
        num = num + (out - yb).pow(2).sum()
        den = den + (yb - xb).pow(2).sum()
    return num / den


# -- k-means weighted by the Hessian diagonal ------------------------------------------------------
def argmin_last(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmin(-1)` (the first minimum, as argmin takes it), 1.2-2.4x faster on CPU: torch's argmin
    reduction is not vectorized there (~0.4-0.7 G elements/s at the codebook searches' [rows, 256] shapes)."""
    return scores.min(-1).indices


def segment_sum(idx: torch.Tensor, vals: torch.Tensor, n: int) -> torch.Tensor:
    """out[k] = Σ vals[i] over idx[i] == k (idx [N], vals [N, v] -> [n, v] float32): `index_add_` computed with
    one float64 `bincount` per column, ~5x faster on CPU (index_add_ there is a serial scatter)."""
    cols = [torch.bincount(idx, weights=vals[:, t], minlength=n) for t in range(vals.shape[1])]
    return torch.stack(cols, 1).float()


def _assign(x: torch.Tensor, w: torch.Tensor, c: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """argmin_k Σ_i w_i (x_i - c_ki)² for every row of x (x, w [N, v]; c [K, v]) as one fused matmul:
    [w, w⊙x] @ [c²; -2c]ᵀ."""
    out = torch.empty(x.shape[0], dtype=torch.long)
    rhs = torch.cat([c * c, -2 * c], 1).T.contiguous()
    for i in range(0, x.shape[0], chunk):
        ws = w[i:i + chunk]
        out[i:i + chunk] = argmin_last(torch.cat([ws, ws * x[i:i + chunk]], 1) @ rhs)
    return out


def kmeans(x: torch.Tensor, w: torch.Tensor, k: int, iters: int, gen: torch.Generator,
           max_points: int = 24576) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted k-means; iterates on at most `max_points` vectors (seeded sample), assigns all at the end."""
    x_all, w_all = x, w
    if x.shape[0] > max_points:
        pick = torch.randperm(x.shape[0], generator=gen)[:max_points]
        x, w = x[pick], w[pick]
    n = x.shape[0]
    init = torch.randperm(n, generator=gen)[:k]
    if n < k:
        init = torch.cat([init, torch.randint(0, n, (k - n,), generator=gen)])
    c = x[init].clone()
    a = _assign(x, w, c)
    for _ in range(iters):
        num, den = segment_sum(a, w * x, k), segment_sum(a, w, k)
        empty = den.sum(1) <= 0
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
        if empty.any():
            c[empty] = x[torch.randint(0, n, (int(empty.sum()),), generator=gen)]
        a = _assign(x, w, c)
    return c, (a if x is x_all else _assign(x_all, w_all, c))


def chol_inv_upper(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), as GPTQ uses it."""
    hd = h.double()
    for extra in (0.0, 1e-4, 1e-2, 1e-1):
        try:
            eye = torch.eye(hd.shape[0], dtype=hd.dtype)
            l = torch.linalg.cholesky(hd + extra * torch.diag(hd).mean() * eye)
            li = torch.linalg.solve_triangular(l, eye, upper=False)  # faster than cholesky_inverse here
            return torch.linalg.cholesky(li.T @ li, upper=True).float()
        except RuntimeError:  # torch.linalg.LinAlgError derives from RuntimeError
            continue
    raise ConfigError("the calibration Hessian is not positive definite even after damping",
                      hint="raise 'damp' or use more calibration samples")
