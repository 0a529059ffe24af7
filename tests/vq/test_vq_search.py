"""Per-(block, layer) format search (EvoPress) for VQ: budget kept, never worse than the start, wired into the
quantization, bad settings refused."""
from __future__ import annotations

import copy

import pytest
import torch

from edgetk.compress import compress
from edgetk.compress.vq import VQConfig
from edgetk.compress.vq_linear import VQLinear
from edgetk.compress.vq_search import FormatBank, mutate
from edgetk.errors import ConfigError
from edgetk.models import load

BASE = dict(vec_len=4, codebook_size=16, kmeans_iters=3, refine_rounds=0, cg_iters=2, calib_samples=6,
            search_alt="vec_len=2,codebook_size=64", search_generations=6, search_offspring=3, search_survivors=1,
            search_samples=2, search_tokens=24)


def _loaded(tiny_llama):
    lm = load(copy.deepcopy(tiny_llama))
    lm.config = tiny_llama.cfg
    return lm


def test_mutation_keeps_the_budget_and_changes_the_parent():
    g = torch.Generator().manual_seed(0)
    bits = [(10, 30), (10, 30), (40, 120), (5, 15), (5, 15)]
    bank = FormatBank([(0, str(u)) for u in range(5)], [None] * 5, bits, [5, 5, 20, 3, 3])
    parent = [1, 0, 0, 1, 0]
    budget = bank.total_bits(parent) + 10
    seen = set()
    for _ in range(200):
        child = mutate(parent, bank, budget, g)
        if child is None:
            continue
        assert child != parent and bank.total_bits(child) <= budget
        seen.add(tuple(child))
    assert len(seen) >= 3  # the search explores


def test_mutation_moves_one_level_at_a_time_between_several_formats():
    # three formats per unit, the plain one (0) in the middle: levels by bits are 1 < 0 < 2
    g = torch.Generator().manual_seed(0)
    bits = [(20, 10, 30)] * 6
    bank = FormatBank([(0, str(u)) for u in range(6)], [None] * 6, bits, [10] * 6)
    assert bank.levels(0) == [1, 0, 2]
    parent = [0] * 6
    budget = bank.total_bits(parent)
    seen = set()
    for _ in range(300):
        child = mutate(parent, bank, budget, g)
        if child is None:
            continue
        assert bank.total_bits(child) <= budget
        assert 1 <= sum(c == 1 for c in child) <= 2  # one or two units one level down (0 -> 1, never 0 -> 2 -> ...)
        assert sum(c == 2 for c in child) == sum(c == 1 for c in child)  # the freed bits went one level up
        seen.add(tuple(child))
    assert len(seen) >= 10
    # formats with equal bits in a unit are one level (the first of them): a move always costs or frees bits
    tie = FormatBank([(0, "0")], [None], [(20, 20, 30)], [10])
    assert tie.levels(0) == [0, 2] and tie.level(0, 1) == 0


def test_format_search_keeps_budget_improves_kl_and_quantizes_with_its_choice(tiny_llama):
    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    plain = VQConfig(**BASE)
    lm0 = _loaded(tiny_llama)
    r0 = compress(lm0, plain, calib=calib)[0]
    lm = _loaded(tiny_llama)
    cfg = VQConfig(**BASE, search_bpw=r0.totals["bits_per_weight"] + 0.8)
    rep = compress(lm, cfg, calib=calib)[0]
    fs = rep.totals["format_search"]
    assert fs["kl_searched"] <= fs["kl_start"]
    assert fs["bits_per_weight_searched"] <= cfg.search_bpw
    assert rep.totals["bits_per_weight"] <= cfg.search_bpw + 1e-9
    assert rep.totals["bits_per_weight"] > r0.totals["bits_per_weight"]  # the slack was spent on 3-bit layers
    alt = {o.split(":")[0] for o in fs["overrides"]}
    assert alt and len(alt) == fs["alt_units"]
    for n, m in lm.model.named_modules():
        if isinstance(m, VQLinear):
            key = n.removeprefix("model.layers.")
            assert (m.fmt.vec_len, m.fmt.codebook_size) == ((2, 64) if key in alt else (4, 16)), n
    # the model was restored before quantizing: the same search again gives the same result (deterministic)
    again = compress(_loaded(tiny_llama), cfg, calib=calib)[0]
    assert again.totals["format_search"]["overrides"] == fs["overrides"]


def test_format_search_between_three_formats(tiny_llama):
    # plain v=4 K=16 (1 bit) in the middle, a cheaper format (v=8 K=16: 0.5 bit) and a dearer one (v=2 K=64: 3 bits);
    # the budget is the plain model's, so a layer goes up only where others went down
    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    r0 = compress(_loaded(tiny_llama), VQConfig(**BASE), calib=calib)[0]
    lm = _loaded(tiny_llama)
    cfg = VQConfig(**{**BASE, "search_alt": "vec_len=8,codebook_size=16;vec_len=2,codebook_size=64",
                      "search_generations": 20}, search_bpw=r0.totals["bits_per_weight"] + 1e-6)
    rep = compress(lm, cfg, calib=calib)[0]
    fs = rep.totals["format_search"]
    assert fs["kl_searched"] < fs["kl_start"]  # bits moved between layers at the same budget lowered the KL
    assert rep.totals["bits_per_weight"] <= cfg.search_bpw + 1e-9
    per = fs["alt_per_format"]
    assert per["vec_len=8,codebook_size=16"] >= 1 and per["vec_len=2,codebook_size=64"] >= 1
    assert sum(per.values()) == fs["alt_units"] == len(fs["overrides"])
    chosen = {o.split(":")[0]: o.split(":")[1] for o in fs["overrides"]}
    for n, m in lm.model.named_modules():
        if isinstance(m, VQLinear):
            want = dict(kv.split("=") for kv in chosen.get(n.removeprefix("model.layers."),
                                                             "vec_len=4,codebook_size=16").split(","))
            assert (m.fmt.vec_len, m.fmt.codebook_size) == (int(want["vec_len"]), int(want["codebook_size"])), n


def test_per_block_overrides_win_over_the_plain_entry(tiny_llama):
    cfg = VQConfig(**BASE, overrides=("mlp.up_proj:vec_len=2,codebook_size=64", "1.mlp.up_proj:stages=2"))
    assert cfg.for_layer("mlp.up_proj", 0).vec_len == 2
    one = cfg.for_layer("mlp.up_proj", 1)
    assert (one.vec_len, one.stages) == (4, 2)
    with pytest.raises(ConfigError, match="layer among"):
        VQConfig(**BASE, overrides=("x.mlp.up_proj:stages=2",))


def test_format_search_refuses_bad_settings(tiny_llama):
    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="search_alt"):
        VQConfig(**{**BASE, "search_alt": "vec_len=two"}, search_bpw=3.0)
    with pytest.raises(ConfigError, match="search_alt"):  # an empty format between the ';'
        VQConfig(**{**BASE, "search_alt": "vec_len=2,codebook_size=64;;vec_len=8"}, search_bpw=3.0)
    with pytest.raises(ConfigError, match="search_bpw"):
        VQConfig(**BASE, search_bpw=-1.0)
    with pytest.raises(ConfigError, match="above search_bpw"):  # the start does not fit the budget
        compress(_loaded(tiny_llama), VQConfig(**BASE, search_bpw=0.5), calib=calib)
    with pytest.raises(ConfigError, match="another one"):  # a start format that is neither of the two
        compress(_loaded(tiny_llama), VQConfig(**BASE, search_bpw=4.0, overrides=("mlp.up_proj:stages=2",)),
                 calib=calib)
