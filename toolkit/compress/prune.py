"""Weight pruning: unstructured (magnitude, Wanda-style |W|·‖X‖) and N:M semi-structured (2:4, 4:8).

* magnitude: the smallest |W| of each matrix are zeroed (layer-wise threshold);
* wanda: score |W_ij|·‖X_j‖₂ (input-channel norm over calibration tokens), smallest scores zeroed per output
  row (Sun et al., 2023); activations come from one pass of the dense model over calibration windows;
* N:M (`m > 0`): in every group of `m` consecutive input weights of a row, the `n` best-scoring are kept. With
  `pack=True` the layer becomes an `NMSparseLinear` that stores only the kept values plus their in-group
  position (2-bit indices for m ≤ 4, 4-bit for m ≤ 16): an exporter can keep that compact; its forward is plain
  PyTorch (scatter into a dense weight, then `F.linear`).

Structured pruning (physically smaller layers) lives in `prune_structured.py`, the per-layer budget search in
`evopress.py`; both register from here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..compressed import MODULE_TYPES, ModuleType
from ..config import Config, check, config
from ..errors import ConfigError, DataError
from ..progress import track
from . import CompressionReport, LayerReport, register_method, register_preset
from .calib import take_windows

METHODS_UNSTRUCTURED = ("magnitude", "wanda")


@config("prune", version=1)
@dataclass(frozen=True)
class PruneConfig(Config):
    method: str = "magnitude"  # "magnitude" | "wanda"
    sparsity: float = 0.5  # fraction of zeroed weights per layer (unstructured; ignored when m > 0)
    n: int = 0  # N:M: keep n weights ...
    m: int = 0  # ... of every m consecutive input weights of a row (m = 0: unstructured)
    exclude: tuple = ("lm_head",)  # regexes of Linear names left dense
    n_samples: int = 32  # calibration windows used for activation norms (wanda)
    pack: bool = True  # N:M layers stored compact as NMSparseLinear

    def validate(self) -> None:
        check(self.method in METHODS_UNSTRUCTURED, "method", self.method, f"one of {METHODS_UNSTRUCTURED}")
        check(isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1, "sparsity", self.sparsity,
              "a fraction in [0, 1)")
        check(self.m >= 0 and (self.m == 0 or 1 <= self.m <= 256), "m", self.m, "0 (unstructured) or 1..256")
        if self.m:
            check(0 < self.n < self.m, "n", self.n, f"0 < n < m={self.m} (N:M keeps n of every m weights)")
        check(self.n_samples > 0, "n_samples", self.n_samples, "a positive number of calibration windows")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "wanda"

    @property
    def calib_windows(self) -> int:
        return self.n_samples if self.needs_calibration else 0

    @property
    def label(self) -> str:
        return f"prune-{self.method}-{self.n}:{self.m}" if self.m else f"prune-{self.method}"


# --------------------------------------------------------------------------------------------- selection
def prunable_linears(model: nn.Module, exclude: tuple = ("lm_head",)) -> dict[str, nn.Linear]:
    """Every `nn.Linear` whose name matches none of `exclude`; raises when there is none."""
    pats = [re.compile(p) for p in exclude]
    found = {n: m for n, m in model.named_modules()
             if type(m) is nn.Linear and not any(p.search(n) for p in pats)}
    if not found:
        raise ConfigError(f"{type(model).__name__} has no prunable nn.Linear layers (exclude={list(exclude)})",
                          hint="pruning works on nn.Linear weights; check the model or the 'exclude' patterns")
    return found


def calib_batches(calib: torch.Tensor | None, n_samples: int, what: str) -> torch.Tensor:
    if calib is None or calib.ndim != 2 or calib.shape[0] == 0:
        raise DataError(f"{what} needs calibration token windows [N, T]",
                        hint="pass calib= (edgetk.data.calibration_windows) or use a magnitude recipe")
    return take_windows(calib, n_samples, "n_samples", what)


@torch.inference_mode()
def input_norms(model: nn.Module, linears: dict[str, nn.Module], calib: torch.Tensor,
                desc: str = "activation norms") -> dict[str, torch.Tensor]:
    """‖X_j‖₂ over all calibration tokens for every input channel j of each layer (one dense pass)."""
    sq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}

    def hook(name):
        def fn(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq[name] += x.pow(2).sum(0)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        for i in track(range(calib.shape[0]), desc):
            model(calib[i: i + 1])
    finally:
        for h in handles:
            h.remove()
    return {n: v.sqrt().float() for n, v in sq.items()}


def scores(weight: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().abs().float()
    return w if norm is None else w * norm[None, :]


# --------------------------------------------------------------------------------------------- masks
def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Boolean keep-mask zeroing exactly round(sparsity·count) lowest scores (per row or whole matrix)."""
    if per_row:
        k = int(round(sparsity * score.shape[1]))
        keep = torch.ones_like(score, dtype=torch.bool)
        if k:
            keep.scatter_(1, score.argsort(dim=1)[:, :k], False)
        return keep
    k = int(round(sparsity * score.numel()))
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k:
        keep[score.flatten().argsort()[:k]] = False
    return keep.view_as(score)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out, inp = score.shape
    g = score.view(out, inp // m, m)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(2, g.topk(n, dim=2).indices, True)
    return keep.view(out, inp)


# --------------------------------------------------------------------------------------------- N:M storage
def index_bits(m: int) -> int:
    return 2 if m <= 4 else 4 if m <= 16 else 8


class NMSparseLinear(nn.Module):
    """y = x·Wᵀ + b with W N:M sparse, stored as kept values [out, in·n/m] and packed in-group indices
    (uint8, `index_bits(m)` bits each, little-end first). Forward is plain PyTorch: unpack, scatter, F.linear."""

    def __init__(self, in_features: int, out_features: int, n: int, m: int, bias: bool = True):
        super().__init__()
        if in_features % m:
            raise ConfigError(f"in_features={in_features} is not a multiple of m={m}", hint="N:M needs whole groups")
        self.in_features, self.out_features, self.n, self.m = in_features, out_features, n, m
        self.bits = index_bits(m)
        count = in_features // m * n
        per_byte = 8 // self.bits
        self.values = nn.Parameter(torch.zeros(out_features, count))
        self.register_buffer("indices", torch.zeros(out_features, -(-count // per_byte), dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_dense(cls, linear: nn.Linear, keep: torch.Tensor, n: int, m: int) -> "NMSparseLinear":
        out, inp = linear.weight.shape
        q = cls(inp, out, n, m, bias=linear.bias is not None)
        g = keep.view(out, inp // m, m)
        if not bool((g.sum(-1) == n).all()):
            raise ConfigError(f"mask is not {n}:{m}", hint="build it with nm_mask")
        pos = g.float().argsort(dim=-1, descending=True, stable=True)[..., :n].sort(-1).values  # kept positions
        w = linear.weight.detach().view(out, inp // m, m)
        with torch.no_grad():
            q.values.copy_(w.gather(2, pos).reshape(out, -1))
            q.indices.copy_(pack_indices(pos.reshape(out, -1), q.bits))
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach())
        return q

    def kept_positions(self) -> torch.Tensor:
        pos = unpack_indices(self.indices, self.bits, self.values.shape[1])
        return pos.view(self.out_features, -1, self.n)

    def dense_weight(self) -> torch.Tensor:
        w = torch.zeros(self.out_features, self.in_features // self.m, self.m, dtype=self.values.dtype,
                        device=self.values.device)
        w = w.scatter(2, self.kept_positions(), self.values.view(self.out_features, -1, self.n))
        return w.reshape(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """Dense working copy for code that reads or edits `.weight` in place (e.g. a quantizer applied after
        pruning). Once materialised, forward uses it, and saving packs it back (pruned positions stay zero)."""
        if self.__dict__.get("_work") is None:
            self.__dict__["_work"] = self.dense_weight().detach()
        return self.__dict__["_work"]

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:  # e.g. torch.func.functional_call swapping in a tensor
        self.__dict__["_work"] = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = self.__dict__.get("_work")
        return F.linear(x, work if work is not None else self.dense_weight(), self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        work = self.__dict__.get("_work")
        if work is not None:  # pack edits of the working copy back into the kept values
            with torch.no_grad():
                g = work.view(self.out_features, -1, self.m).gather(2, self.kept_positions())
                self.values.copy_(g.reshape(self.out_features, -1))
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__["_work"] = None  # the loaded values win over a stale working copy
        super()._load_from_state_dict(*args, **kwargs)

    def stored_bits(self) -> int:
        return self.values.numel() * 32 + self.values.numel() * self.bits

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.n}:{self.m}, index_bits={self.bits}"


def pack_indices(pos: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    rows, count = pos.shape
    pad = (-count) % per
    p = F.pad(pos.to(torch.int32), (0, pad)).view(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (p << shifts).sum(-1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Arithmetic unpacking (floor-div and remainder export everywhere; bit shifts do not in ONNX)."""
    per = 8 // bits
    div = (2 ** (torch.arange(per, dtype=torch.int64, device=packed.device) * bits))
    p = torch.div(packed.to(torch.int64)[..., None], div, rounding_mode="floor") % (1 << bits)
    return p.reshape(packed.shape[0], -1)[:, :count]


MODULE_TYPES.register("NMSparseLinear", ModuleType(
    NMSparseLinear,
    lambda q: {"in_features": q.in_features, "out_features": q.out_features, "n": q.n, "m": q.m,
               "bias": q.bias is not None},
    lambda s: NMSparseLinear(s["in_features"], s["out_features"], s["n"], s["m"], s["bias"])))


# --------------------------------------------------------------------------------------------- apply
def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def rel_error(w: torch.Tensor, wp: torch.Tensor) -> float:
    return float((w - wp).norm() / w.norm().clamp_min(1e-12))


def prune_layer(name: str, lin: nn.Linear, cfg: PruneConfig, sparsity: float, norm: torch.Tensor | None,
                root: nn.Module) -> LayerReport:
    """Prune one Linear in place (or swap in an NMSparseLinear); returns its report."""
    w = lin.weight.detach()
    s = scores(w, norm)
    if cfg.m:
        if w.shape[1] % cfg.m:
            return LayerReport(name, cfg.label, tuple(w.shape), 0.0, None, 0.0, note=f"skipped: in % {cfg.m} != 0")
        keep = nm_mask(s, cfg.n, cfg.m)
    else:
        keep = unstructured_mask(s, sparsity, per_row=norm is not None)
    err = rel_error(w, w * keep)
    bits = None
    if cfg.m and cfg.pack:
        q = NMSparseLinear.from_dense(lin, keep, cfg.n, cfg.m)
        set_module(root, name, q)
        bits = q.stored_bits() / w.numel()
    else:
        with torch.no_grad():
            lin.weight.mul_(keep)
    return LayerReport(name, cfg.label, tuple(w.shape), err, bits, 1 - keep.float().mean().item())


def totals_for(layers: list[LayerReport]) -> dict:
    counted = [(math.prod(l.shape), l.sparsity or 0.0) for l in layers]
    total = sum(c for c, _ in counted)
    out = {"sparsity": sum(c * s for c, s in counted) / max(total, 1), "pruned_params": total}
    bits = [(math.prod(l.shape), l.bits_per_weight) for l in layers if l.bits_per_weight is not None]
    if bits:
        out["bits_per_weight"] = sum(c * b for c, b in bits) / sum(c for c, _ in bits)
    return out


@register_method(PruneConfig)
def apply_prune(loaded, cfg: PruneConfig, calib: torch.Tensor | None) -> CompressionReport:
    model = loaded.model
    linears = prunable_linears(model, cfg.exclude)
    norms: dict = {}
    if cfg.method == "wanda":
        norms = input_norms(model, linears, calib_batches(calib, cfg.n_samples, "wanda pruning"))
    layers = [prune_layer(n, lin, cfg, cfg.sparsity, norms.get(n), model)
              for n, lin in track(list(linears.items()), cfg.label)]
    return CompressionReport(cfg.label, cfg.to_dict(), layers, totals_for(layers))


register_preset("prune-mag-50", PruneConfig("magnitude", 0.5),
                description="unstructured magnitude pruning, 50% of every Linear (dense storage)")
register_preset("prune-wanda-50", PruneConfig("wanda", 0.5),
                description="unstructured Wanda pruning (|W|·‖X‖ per row, calibration), 50% of every Linear")
register_preset("prune-2of4", PruneConfig("wanda", 0.5, n=2, m=4),
                description="2:4 semi-structured Wanda pruning, stored as values + 2-bit indices")
register_preset("prune-4of8", PruneConfig("wanda", 0.5, n=4, m=8),
                description="4:8 semi-structured Wanda pruning, stored as values + 4-bit indices")

from . import evopress, prune_structured  # noqa: E402,F401  (register their methods and presets)
