"""Per-(block, layer) format search for vector quantization under a bits budget (EvoPress, Sieberling et al., 2024).

Which layers deserve more bits is not obvious (and the error is not additive over layers), so instead of a fixed
rule (`vq2-mix`: the attention k/v/o projections at 3 bits) an evolutionary search picks, for every layer of
every block, one of the formats: the config's plain one or one of `search_alt`'s (';' between several: EvoPress's
levels), minimising the KL divergence between the fp model's next-token distribution and the mixed model's on
calibration windows, with the quantized layers' bits per weight (codebooks, scales, outliers counted) at most
`search_bpw`. A unit's levels are its formats ordered by their storage bits for that layer.

* bank: one pass over the fp blocks (`BlockRunner`, one block's activations at a time) quantizes every layer
  in every format from the fp model's calibration Hessians, as EvoPress builds its database; the dense weights
  of all versions are kept, so a candidate is applied by copying weights;
* start: the config's own formats (each unit's override, or the plain format); it must fit the budget;
* mutation: one or two units go one level down, then, in random order, the other units go one level up while the
  budget allows (with two formats: B -> A, then A -> B);
* selection (1 + λ) in two stages: every offspring is scored on the first window, the best `search_survivors`
  on all `search_samples` windows; the parent is replaced only by a better one, so the result is never worse
  (on that fitness) than the start.

The result is a tuple of per-block overrides ("3.mlp.down_proj:vec_len=2,codebook_size=64") that the normal
sequential quantization (and its fine-tuning stages) then runs with.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from ..errors import ConfigError
from ..progress import task, track
from .calib import BlockRunner, block_hessians
from .evopress import KLFitness

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FormatBank:
    """Every quantized version (dense, W space) of every (block, layer) unit and their storage bits; a choice
    holds one format index per unit (0 = the plain format, k = the k-th of `search_alt`)."""
    units: list[tuple[int, str]]
    dense: list[tuple[torch.Tensor, ...]]  # one per format, per unit
    bits: list[tuple[int, ...]]
    weights: list[int]

    def total_bits(self, choice: list[int]) -> int:
        return sum(b[c] for b, c in zip(self.bits, choice))

    def bpw(self, choice: list[int]) -> float:
        return self.total_bits(choice) / max(1, sum(self.weights))

    def levels(self, u: int) -> list[int]:
        """Unit u's format indices from the fewest storage bits to the most; of formats with equal bits for this
        unit only the first (plain, then `search_alt`'s order) is a level: a move costs or frees bits."""
        out = []
        for k in sorted(range(len(self.bits[u])), key=lambda k: (self.bits[u][k], k)):
            if not out or self.bits[u][k] > self.bits[u][out[-1]]:
                out.append(k)
        return out

    def level(self, u: int, c: int) -> int:
        """The level of format c in unit u (a format that is not a level: the level with its bits)."""
        return [self.bits[u][k] for k in self.levels(u)].index(self.bits[u][c])


def formats(cfg) -> list:
    """The config of each format: the plain config, then the plain config with each of `search_alt`'s."""
    plain = dataclasses.replace(cfg, overrides=(), search_bpw=0.0)
    return [plain, *(dataclasses.replace(plain, **f) for f in cfg.alt_formats())]


def start_choice(cfg, units: list[tuple[int, str]], shapes: list[tuple[int, int]]) -> list[int]:
    """The config's own formats as a choice (the first format that matches); refuses other formats."""
    cfgs = formats(cfg)
    out = []
    for (i, name), shape in zip(units, shapes):
        f = cfg.for_layer(name, i).format_for(*shape)
        known = [c.format_for(*shape) for c in cfgs]
        if f not in known:
            raise ConfigError(f"with search_bpw > 0 every layer starts in the plain format or in one of search_alt's, "
                              f"but the overrides give model.layers.{i}.{name} another one ({f.vec_len=}, "
                              f"{f.codebook_size=}, {f.stages=})", hint="drop that override or make it search_alt")
        out.append(known.index(f))
    return out


def build_bank(model: nn.Module, cfg, calib: torch.Tensor) -> FormatBank:
    """Quantize every layer of every block in every format (fp calibration activations; the model is not changed)."""
    from .vq import quantize_layer  # vq imports this module

    cfgs = formats(cfg)
    units, dense, bits, weights = [], [], [], []
    runner = BlockRunner(model, calib)

    def process(i: int, block: nn.Module, x: torch.Tensor):
        hs, _ = block_hessians(runner, block, cfg.layers, x)
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + i)
        for name in track(cfg.layers, f"format bank, block {i}"):
            w = block.get_submodule(name).weight.detach()
            pair, b = [], []
            for c in cfgs:
                mod, st, p, _ = quantize_layer(w, hs[name], c, gen)
                pair.append(p.dense(st.what()).to(w.dtype))
                b.append(mod.storage_bits())
            units.append((i, name))
            dense.append(tuple(pair))
            bits.append(tuple(b))
            weights.append(w.numel())
        return None

    runner.run(process, track_fn=lambda it, d, n: track(it, "format bank", n))
    return FormatBank(units, dense, bits, weights)


def mutate(parent: list[int], bank: FormatBank, budget: float, g: torch.Generator) -> list[int] | None:
    """One or two units one level down, then the others one level up in random order while the bits fit."""
    child = list(parent)
    levels = [bank.levels(u) for u in range(len(child))]
    high = [u for u, c in enumerate(child) if bank.level(u, c) > 0]
    lowered = set()
    for _ in range(min(len(high), 1 + int(torch.randint(2, (1,), generator=g)))):
        u = high.pop(int(torch.randint(len(high), (1,), generator=g)))
        child[u] = levels[u][bank.level(u, child[u]) - 1]
        lowered.add(u)
    used = bank.total_bits(child)
    for u in torch.randperm(len(child), generator=g).tolist():
        at = bank.level(u, child[u])
        if u not in lowered and at + 1 < len(levels[u]):
            up = levels[u][at + 1]
            extra = bank.bits[u][up] - bank.bits[u][child[u]]
            if used + extra <= budget:
                child[u] = up
                used += extra
    return child if child != parent else None


def search(model: nn.Module, bank: FormatBank, fit: KLFitness, cfg, start: list[int]) -> tuple[list[int], list]:
    budget = cfg.search_bpw * sum(bank.weights)
    if bank.total_bits(start) > budget:
        raise ConfigError(f"the start formats take {bank.bpw(start):.3f} bits per weight, above search_bpw="
                          f"{cfg.search_bpw}", hint="raise search_bpw or start from fewer search_alt layers")
    lin = [model.model.layers[i].get_submodule(name) for i, name in bank.units]
    current: list[int | None] = [None] * len(lin)

    def apply(choice: list[int]) -> None:
        with torch.no_grad():
            for u, c in enumerate(choice):
                if current[u] != c:
                    lin[u].weight.copy_(bank.dense[u][c])
                    current[u] = c

    g = torch.Generator().manual_seed(cfg.seed)
    parent = list(start)
    apply(parent)
    best = fit()
    stages = [{"generation": 0, "kl": best, "bits_per_weight": bank.bpw(parent)}]
    with task("vq format search", cfg.search_generations) as t:
        for gen in range(1, cfg.search_generations + 1):
            kids = [c for c in (mutate(parent, bank, budget, g) for _ in range(cfg.search_offspring)) if c]
            quick = []
            for c in kids:
                apply(c)
                quick.append((fit(1), c))
            quick.sort(key=lambda x: x[0])
            for _, c in quick[: cfg.search_survivors]:
                apply(c)
                kl = fit()
                if kl < best:
                    best, parent = kl, c
            stages.append({"generation": gen, "kl": best, "bits_per_weight": bank.bpw(parent)})
            t.advance()
    return parent, stages


def search_overrides(model: nn.Module, cfg, calib: torch.Tensor) -> tuple[tuple, dict]:
    """Run the search on `model` (fp, in memory; its weights are restored) -> (per-block overrides, record)."""
    if calib.shape[0] < cfg.search_samples:
        raise ConfigError(f"the format search scores {cfg.search_samples} calibration windows but only "
                          f"{calib.shape[0]} are given", hint="lower search_samples or give more calibration text")
    orig = {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(n.endswith(q) for q in cfg.layers)}
    windows = calib[-cfg.search_samples:, : cfg.search_tokens]
    fit = KLFitness(model, windows)  # fp reference distributions, before any weight is swapped
    bank = build_bank(model, cfg, calib)
    shapes = [tuple(d[0].shape) for d in bank.dense]
    start = start_choice(cfg, bank.units, shapes)
    try:
        choice, stages = search(model, bank, fit, cfg, start)
    finally:
        with torch.no_grad():
            for n, m in model.named_modules():
                if n in orig:
                    m.weight.copy_(orig[n])
    alts = [",".join(f"{k}={v}" for k, v in f.items()) for f in cfg.alt_formats()]
    overrides = tuple(f"{i}.{name}:{alts[c - 1]}" for (i, name), c in zip(bank.units, choice) if c)
    per_layer, per_format = {}, {a: 0 for a in alts}
    for (i, name), c in zip(bank.units, choice):
        per_layer[name] = per_layer.get(name, 0) + int(c > 0)
        if c:
            per_format[alts[c - 1]] += 1
    record = {"stage": "model.format_search", "before": stages[0]["kl"], "after": stages[-1]["kl"],
              "kl_start": stages[0]["kl"], "kl_searched": stages[-1]["kl"],
              "bits_per_weight_start": bank.bpw(start), "bits_per_weight_searched": bank.bpw(choice),
              "generations": len(stages) - 1, "alt_per_layer": per_layer, "alt_per_format": per_format,
              "alt_units": sum(c > 0 for c in choice), "units": len(choice)}
    log.info("format search: KL %.4f -> %.4f, %d of %d layers in %s", record["kl_start"], record["kl_searched"],
             record["alt_units"], record["units"], cfg.search_alt)
    return overrides, record
