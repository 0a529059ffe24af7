"""Structured pruning: whole MLP channels removed, leaving physically smaller `nn.Linear` layers.

For each block, channel j of the MLP (row j of the up/gate projections, column j of the down projection) is
scored by its expected contribution to the block output:
  * "activation": ‖X_j‖₂ over calibration tokens at the down projection's input × ‖W_down[:, j]‖₂;
  * "magnitude": ‖W_down[:, j]‖₂ × the mean row norm of the input projections at j.
The lowest `fraction` (rounded so the kept count is a multiple of `multiple`) are removed. The exported graph
holds the smaller matrices, so it is smaller and faster. Saved artifacts record the new Linear shapes as
module specs (edgetk.compressed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config, check, config
from ..errors import ConfigError
from ..models.bert import BertEncoder
from ..models.llama import LlamaForCausalLM
from . import CompressionReport, LayerReport, register_method, register_preset
from .prune import calib_batches, input_norms, set_module

# model type -> (path of the block list, input projections of the MLP, output projection)
MLP_LAYOUTS = {
    LlamaForCausalLM: ("model.layers", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
    BertEncoder: ("encoder.layer", ("intermediate.dense",), "output.dense"),
}
TARGETS = ("mlp",)


@config("prune-structured", version=1)
@dataclass(frozen=True)
class StructuredPruneConfig(Config):
    target: str = "mlp"
    fraction: float = 0.25  # share of channels removed in every block
    method: str = "activation"  # "activation" (calibration) | "magnitude"
    multiple: int = 8  # kept channel count rounded to a multiple of this
    n_samples: int = 16

    def validate(self) -> None:
        check(self.target in TARGETS, "target", self.target, f"one of {TARGETS}")
        check(isinstance(self.fraction, (int, float)) and 0 <= self.fraction < 1, "fraction", self.fraction,
              "a fraction in [0, 1)")
        check(self.method in ("activation", "magnitude"), "method", self.method, "'activation' or 'magnitude'")
        check(self.multiple >= 1, "multiple", self.multiple, "a positive integer")
        check(self.n_samples > 0, "n_samples", self.n_samples, "a positive integer")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "activation"

    @property
    def calib_windows(self) -> int:
        return self.n_samples if self.needs_calibration else 0


def mlp_blocks(model: nn.Module) -> list[tuple[str, tuple[str, ...], str]]:
    """[(block name, input projection names, output projection name)] for a known architecture."""
    layout = MLP_LAYOUTS.get(type(model))
    if layout is None:
        raise ConfigError(f"structured pruning does not know the MLP layout of {type(model).__name__}",
                          hint=f"supported: {', '.join(t.__name__ for t in MLP_LAYOUTS)}; "
                               "use unstructured/N:M pruning for other modules")
    path, ins, out = layout
    blocks = model.get_submodule(path)
    return [(f"{path}.{i}", tuple(f"{path}.{i}.{n}" for n in ins), f"{path}.{i}.{out}") for i in range(len(blocks))]


def keep_count(channels: int, fraction: float, multiple: int) -> int:
    keep = int(round(channels * (1 - fraction) / multiple)) * multiple
    return min(max(keep, multiple), channels)


def channel_scores(model, ins, out, norm: torch.Tensor | None) -> torch.Tensor:
    w_out = model.get_submodule(out).weight.detach().float()
    col = w_out.norm(dim=0)
    if norm is not None:
        return col * norm
    rows = torch.stack([model.get_submodule(n).weight.detach().float().norm(dim=1) for n in ins]).mean(0)
    return col * rows


def shrink_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping rows (dim=0) or columns (dim=1) `idx`."""
    w = lin.weight.detach().index_select(dim, idx)
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.detach() if dim == 1 else lin.bias.detach().index_select(0, idx))
    return new


@register_method(StructuredPruneConfig)
def apply_structured(loaded, cfg: StructuredPruneConfig, calib: torch.Tensor | None) -> CompressionReport:
    model = loaded.model
    blocks = mlp_blocks(model)
    for _, ins, out in blocks:
        for n in (*ins, out):
            if type(model.get_submodule(n)) is not nn.Linear:
                raise ConfigError(f"{n} is a {type(model.get_submodule(n)).__name__}, not a dense nn.Linear",
                                  hint="apply structured pruning before other compression")
    norms = {}
    if cfg.method == "activation":
        outs = {out: model.get_submodule(out) for _, _, out in blocks}
        norms = input_norms(model, outs, calib_batches(calib, cfg.n_samples, "activation-scored structured pruning"))
    layers = []
    for _, ins, out in blocks:
        s = channel_scores(model, ins, out, norms.get(out))
        keep = keep_count(s.numel(), cfg.fraction, cfg.multiple)
        idx = s.topk(keep).indices.sort().values
        for name, dim in [*((n, 0) for n in ins), (out, 1)]:
            lin = model.get_submodule(name)
            before = tuple(lin.weight.shape)
            set_module(model, name, shrink_linear(lin, idx, dim))
            layers.append(LayerReport(name, "prune-mlp", before, None, None, 1 - keep / s.numel(),
                                      note=f"{s.numel()} -> {keep} channels"))
    removed = sum(l.shape[0] * l.shape[1] * l.sparsity for l in layers)
    total = sum(p.numel() for p in model.parameters()) + removed
    return CompressionReport("prune-structured", cfg.to_dict(), layers,
                             {"mlp_channels_removed": 1 - keep / s.numel(), "params_removed": int(removed),
                              "model_params_fraction_removed": removed / total})


register_preset("prune-mlp-25", StructuredPruneConfig("mlp", 0.25),
                description="structured: remove 25% of MLP channels per block (smaller Linears, faster export)")
