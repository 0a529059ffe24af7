"""Structured MLP-channel pruning and the EvoPress budget search on tiny models."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgetk.compress import compress
from edgetk.compress.evopress import EvoPruneConfig, mutate
from edgetk.compress.prune_structured import StructuredPruneConfig
from edgetk.models import load
from tests.conftest import TINY_BERT, TINY_LLAMA


pytestmark = pytest.mark.usefixtures("one_thread")

def loaded(model, cfg):
    m = load(copy.deepcopy(model))
    m.config = cfg
    return m


def test_mlp_pruning_equals_zeroing_the_removed_channels(tiny_llama):
    """The smaller model computes exactly what the original computes with those channels zeroed."""
    m = loaded(tiny_llama, TINY_LLAMA)
    rep = compress(m, StructuredPruneConfig("mlp", 0.25, method="magnitude"))[0]
    ref = copy.deepcopy(tiny_llama)
    for i, (blk, small) in enumerate(zip(ref.model.layers, m.model.model.layers)):
        assert small.mlp.up_proj.weight.shape == (120, 64) and small.mlp.down_proj.weight.shape == (64, 120)
        kept = [torch.where((blk.mlp.up_proj.weight == r).all(1))[0].item() for r in small.mlp.up_proj.weight]
        drop = sorted(set(range(160)) - set(kept))
        with torch.no_grad():
            blk.mlp.up_proj.weight[drop] = 0
    x = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(m.model(x), ref(x), rtol=1e-5, atol=1e-5)
    assert rep.totals["mlp_channels_removed"] == pytest.approx(0.25)


def test_activation_scored_bert_mlp_pruning_roundtrips(tiny_bert, tmp_path):
    from edgetk.compressed import save

    m = loaded(tiny_bert, TINY_BERT)
    reps = compress(m, StructuredPruneConfig("mlp", 0.5, n_samples=2), calib=torch.randint(0, 128, (2, 16)))
    assert m.model.encoder.layer[0].intermediate.dense.weight.shape == (64, 64)
    save(m, tmp_path / "a", reps)
    back = load(tmp_path / "a")
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(back.model(ids), m.model(ids), rtol=0, atol=0)


def test_mutation_keeps_the_budget():
    g = torch.Generator().manual_seed(0)
    levels, sizes = [0, 0, 0, 0], [10, 10, 10, 10]
    for _ in range(50):
        child = mutate(levels, sizes, -2, 2, g)
        assert sum(child) == 0 and all(-2 <= v <= 2 for v in child)
        levels = child
    assert mutate([0, 0], [10, 20], -2, 2, g) is None  # no same-size partner: no budget-neutral switch


@pytest.fixture
def tiny4():
    from edgetk.models import llama

    return llama.init_random(TINY_LLAMA.replace(num_layers=4), seed=1)


def test_evopress_keeps_global_sparsity_and_never_loses_to_uniform(tiny4):
    cfg = EvoPruneConfig(0.5, step=0.1, generations=6, offspring=4, survivors=2, search_samples=2,
                         search_tokens=32, n_samples=2, seed=0)
    calib = torch.randint(0, 256, (4, 32))
    m = loaded(tiny4, TINY_LLAMA.replace(num_layers=4))
    rep = compress(m, cfg, calib=calib)[0]
    units = rep.totals["unit_sparsity"]
    assert len(units) == 4 and sum(units.values()) / 4 == pytest.approx(0.5, abs=1e-6)
    # each row keeps round(level * in_features) weights: the budget holds up to that rounding (<= 0.5/64 here)
    assert rep.totals["sparsity"] == pytest.approx(0.5, abs=0.5 / 64)
    assert rep.totals["kl_searched"] <= rep.totals["kl_uniform"]
    kls = [s["kl"] for s in rep.stages]
    assert all(b <= a for a, b in zip(kls, kls[1:]))  # elitist: the parent only improves
    m2 = loaded(tiny4, TINY_LLAMA.replace(num_layers=4))
    assert compress(m2, cfg, calib=calib)[0].totals["unit_sparsity"] == units  # seeded: reproducible


def test_level_bank_rewrites_only_changed_units_and_matches_a_fresh_apply(tiny4):
    from edgetk.compress.evopress import LevelBank
    from edgetk.compress.prune import prunable_linears

    model = copy.deepcopy(tiny4)
    linears = prunable_linears(model, ("lm_head",))
    bank = LevelBank(linears, {}, per_row=False)
    a, b = [0.5, 0.3, 0.7, 0.5], [0.5, 0.4, 0.6, 0.5]
    bank.apply(a)
    bank.apply(b)
    got = {n: l.weight.detach().clone() for n, l in linears.items()}
    fresh_model = copy.deepcopy(tiny4)
    fresh = LevelBank(prunable_linears(fresh_model, ("lm_head",)), {}, per_row=False)
    fresh.apply(b)
    for n, l in fresh.linears.items():
        torch.testing.assert_close(got[n], l.weight.detach(), atol=0, rtol=0)
    unit0 = [linears[n].weight for n in bank.units[bank.names[0]]]
    with torch.no_grad():
        for w in unit0:
            w.fill_(7.0)
    bank.set_unit(0, 0.5)  # same level as held: not rewritten
    assert all(bool((w == 7.0).all()) for w in unit0)
    bank.set_unit(0, 0.4)  # a new level: rewritten from the original weights
    assert not any(bool((w == 7.0).any()) for w in unit0)
    bank.set_unit(0, 0.5)
    sparsity = [1 - sum((linears[n].weight != 0).sum().item() for n in bank.units[u])
                / sum(linears[n].weight.numel() for n in bank.units[u]) for u in bank.names]
    assert sparsity == pytest.approx(b, abs=0.01)
