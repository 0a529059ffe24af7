"""EvoPress-style search of per-block sparsity under a fixed global budget (Sieberling et al., 2024).

Error is not monotone in per-layer compression, so instead of a heuristic allocation an evolutionary search
((1 + λ) with level-switch mutation) looks for the per-block levels that minimise the KL divergence between the
dense model's and the pruned model's next-token distributions on calibration windows.

* units: the transformer blocks (Linears grouped by the name prefix up to the first index, e.g.
  `model.layers.3`); each unit has a sparsity level `target + k·step`;
* mutation: raise one unit's level by a step and lower another unit's of the same size by a step, so the global
  sparsity stays exactly on budget;
* selection in two stages (EvoPress): every offspring is scored on the first window, the best `survivors` on all
  `search_samples` windows; the parent is replaced only by a better one;
* inside a unit, weights are pruned Wanda-style (per row, |W|·‖X‖) or by magnitude, from precomputed ranks, so a
  level change costs one masked copy.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from ..config import Config, check, config
from ..errors import ConfigError
from ..progress import task
from . import CompressionReport, LayerReport, register_method, register_preset
from .distill import kl_rows, soft_targets
from .prune import calib_batches, input_norms, prunable_linears, rel_error, scores, totals_for


@config("prune-evo", version=1)
@dataclass(frozen=True)
class EvoPruneConfig(Config):
    sparsity: float = 0.5  # global budget over the pruned Linears
    method: str = "wanda"  # scores inside a unit: "wanda" | "magnitude"
    step: float = 0.05  # level granularity
    max_sparsity: float = 0.9  # no unit goes above this
    generations: int = 60
    offspring: int = 8
    survivors: int = 2
    search_samples: int = 4  # calibration windows scoring the fitness (KL to the dense model)
    search_tokens: int = 256  # tokens per fitness window
    n_samples: int = 32  # calibration windows for activation norms
    seed: int = 0
    exclude: tuple = ("lm_head",)

    def validate(self) -> None:
        check(isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1, "sparsity", self.sparsity,
              "a fraction in [0, 1)")
        check(self.method in ("wanda", "magnitude"), "method", self.method, "'wanda' or 'magnitude'")
        check(0 < self.step < 1, "step", self.step, "a fraction in (0, 1)")
        check(self.sparsity <= self.max_sparsity < 1, "max_sparsity", self.max_sparsity,
              f"in [sparsity={self.sparsity}, 1)")
        for name in ("generations", "offspring", "survivors", "search_samples", "search_tokens", "n_samples"):
            check(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        check(self.survivors <= self.offspring, "survivors", self.survivors, f"<= offspring={self.offspring}")

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def calib_windows(self) -> int:
        """Norms on the first n_samples windows, the fitness on the last search_samples of those read."""
        return max(self.n_samples, self.search_samples)


def unit_of(name: str) -> str:
    """`model.layers.3.mlp.up_proj` -> `model.layers.3`; a name with no index is its own unit."""
    m = re.match(r"(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else name


class LevelBank:
    """Original weights + per-row score ranks, so any per-unit level is applied by one masked copy."""

    def __init__(self, linears: dict, norms: dict, per_row: bool):
        self.linears = linears
        self.units: dict[str, list[str]] = defaultdict(list)
        for n in linears:
            self.units[unit_of(n)].append(n)
        self.names = list(self.units)
        self.size = [sum(linears[n].weight.numel() for n in self.units[u]) for u in self.names]
        self.orig = {n: l.weight.detach().clone() for n, l in linears.items()}
        self.rank = {}
        for n, l in linears.items():
            s = scores(self.orig[n], norms.get(n))
            if not per_row:
                s = s.flatten()[None]
            dtype = torch.int16 if s.shape[-1] < 2 ** 15 else torch.int32
            self.rank[n] = s.argsort(-1).argsort(-1).to(dtype).view_as(self.orig[n])
        self.per_row = per_row
        self.current: list[float | None] = [None] * len(self.names)  # level each unit's weights hold now

    @torch.no_grad()
    def set_unit(self, i: int, sparsity: float) -> None:
        if self.current[i] == sparsity:
            return
        self.current[i] = sparsity
        for n in self.units[self.names[i]]:
            w = self.orig[n]
            count = w.shape[1] if self.per_row else w.numel()
            self.linears[n].weight.copy_(w * (self.rank[n] >= int(round(sparsity * count))))

    def apply(self, levels: list[float]) -> None:
        for i, s in enumerate(levels):
            self.set_unit(i, s)


class KLFitness:
    """Mean per-token KL(dense || candidate) on fixed calibration windows."""

    def __init__(self, model, windows: torch.Tensor):
        self.model, self.windows = model, windows
        with torch.inference_mode():
            self.ref = [soft_targets(self._logits(w)) for w in windows]

    def _logits(self, w: torch.Tensor) -> torch.Tensor:
        out = self.model(w[None])
        return (out if isinstance(out, torch.Tensor) else out[0])[0]

    @torch.inference_mode()
    def __call__(self, n: int | None = None) -> float:
        total = 0.0
        idx = range(len(self.windows) if n is None else n)
        for i in idx:
            total += kl_rows(self._logits(self.windows[i]), self.ref[i]).mean().item()
        return total / len(idx)


def mutate(levels: list[int], sizes: list[int], lo: int, hi: int, g: torch.Generator) -> list[int] | None:
    """Level switch: one unit up a step, another of the same size down a step (budget kept exactly)."""
    up = [i for i, v in enumerate(levels) if v < hi]
    if not up:
        return None
    for _ in range(64):
        i = up[int(torch.randint(len(up), (1,), generator=g))]
        down = [j for j, v in enumerate(levels) if v > lo and j != i and sizes[j] == sizes[i]]
        if down:
            j = down[int(torch.randint(len(down), (1,), generator=g))]
            child = list(levels)
            child[i] += 1
            child[j] -= 1
            return child
    return None


def search(bank: LevelBank, fit: KLFitness, cfg: EvoPruneConfig) -> tuple[list[float], list[dict]]:
    g = torch.Generator().manual_seed(cfg.seed)
    lo = -int(round(cfg.sparsity / cfg.step + 1e-9))  # levels are integer steps around the target
    hi = int((cfg.max_sparsity - cfg.sparsity) / cfg.step + 1e-9)
    to_sparsity = lambda lv: [min(max(cfg.sparsity + k * cfg.step, 0.0), cfg.max_sparsity) for k in lv]
    parent = [0] * len(bank.names)
    bank.apply(to_sparsity(parent))
    best = fit()
    stages = [{"generation": 0, "kl": best}]
    with task("evopress search", cfg.generations) as t:
        for gen in range(1, cfg.generations + 1):
            kids = [c for c in (mutate(parent, bank.size, lo, hi, g) for _ in range(cfg.offspring)) if c]
            if not kids:
                break
            quick = []
            for c in kids:
                bank.apply(to_sparsity(c))
                quick.append((fit(1), c))
            quick.sort(key=lambda x: x[0])
            for _, c in quick[: cfg.survivors]:
                bank.apply(to_sparsity(c))
                kl = fit()
                if kl < best:
                    best, parent = kl, c
            stages.append({"generation": gen, "kl": best})
            t.advance()
    bank.apply(to_sparsity(parent))
    return to_sparsity(parent), stages


@register_method(EvoPruneConfig)
def apply_evo(loaded, cfg: EvoPruneConfig, calib: torch.Tensor | None) -> CompressionReport:
    model = loaded.model
    linears = prunable_linears(model, cfg.exclude)
    calib = calib_batches(calib, cfg.calib_windows, "evopress search")
    norms = input_norms(model, linears, calib[: cfg.n_samples]) if cfg.method == "wanda" else {}
    bank = LevelBank(linears, norms, per_row=cfg.method == "wanda")
    if len(set(bank.size)) == len(bank.size) and len(bank.size) > 1:
        raise ConfigError("no two pruning units have the same size, so no budget-neutral level switch exists",
                          hint="evopress needs repeated blocks (transformer layers)")
    fit = KLFitness(model, calib[-cfg.search_samples:, : cfg.search_tokens])
    levels, stages = search(bank, fit, cfg)
    uniform_kl = stages[0]["kl"]
    per_unit = dict(zip(bank.names, levels))
    layers = []
    for n, lin in linears.items():
        s = per_unit[unit_of(n)]
        w = lin.weight.detach()
        layers.append(LayerReport(n, "prune-evo", tuple(w.shape), rel_error(bank.orig[n], w), None,
                                  1 - (w != 0).float().mean().item(), note=f"unit level {s:.2f}"))
    totals = {**totals_for(layers), "kl_uniform": uniform_kl, "kl_searched": stages[-1]["kl"],
              "unit_sparsity": {u: round(s, 4) for u, s in per_unit.items()}}
    return CompressionReport("prune-evo", cfg.to_dict(), layers, totals, stages)


register_preset("prune-evo-50", EvoPruneConfig(0.5),
                description="50% global sparsity, per-block levels searched by evolution (EvoPress, KL on calib)")
