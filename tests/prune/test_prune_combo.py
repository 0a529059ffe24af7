"""Pruning then VQ on the same model, the CLI recipes, and a few checks on the real zoo models."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from edgetk.compress import compress, presets, resolve_recipe
from edgetk.compress.prune import NMSparseLinear, PruneConfig
from edgetk.models import load
from tests.conftest import TINY_LLAMA

RECIPES = ("prune-2of4", "prune-4of8", "prune-mag-50", "prune-wanda-50", "prune-evo-50", "prune-mlp-25", "tome-r8")


def test_recipes_are_listed():
    names = presets()
    assert set(RECIPES) <= set(names) and all(names[r] for r in RECIPES)


@pytest.mark.usefixtures("one_thread")
def test_prune_2of4_then_vq2(tiny_llama, tmp_path):
    pytest.importorskip("edgetk.compress.vq")
    from edgetk.compress.vq import VQConfig
    from edgetk.compress.vq_linear import VQLinear
    from edgetk.compressed import save

    cfgs = resolve_recipe("prune-2of4+vq2")
    assert isinstance(cfgs[0], PruneConfig) and (cfgs[0].n, cfgs[0].m) == (2, 4) and isinstance(cfgs[1], VQConfig)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    m = load(copy.deepcopy(tiny_llama))
    m.config = TINY_LLAMA
    fast = cfgs[1].replace(kmeans_iters=4, refine_rounds=1, cg_iters=3, calib_samples=4, block_steps=5)
    compress(m, cfgs[0], calib=calib)
    pruned = {n: x.dense_weight().clone() for n, x in m.model.named_modules() if isinstance(x, NMSparseLinear)}
    reps = compress(m, fast, calib=calib)
    assert [c["kind"] for c in m.compression] == ["prune", "vq"]
    mods = dict(m.model.named_modules())
    dense = dict(tiny_llama.named_modules())
    for name, wp in pruned.items():
        assert isinstance(mods[name], VQLinear)
        wq = mods[name].dequantize()
        # the quantizer saw the pruned weights: it is much closer to them than to the dense original
        assert (wq - wp).norm() < 0.8 * (wq - dense[name].weight.detach()).norm()
    save(m, tmp_path / "pv", reps)
    x = torch.randint(0, 256, (1, 20))
    torch.testing.assert_close(load(tmp_path / "pv").model(x), m.model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_compress_prune_2of4_on_smollm2(tmp_path):
    from typer.testing import CliRunner

    from edgetk.cli.app import app

    res = CliRunner().invoke(app, ["compress", "smollm2-135m", "--recipe", "prune-2of4", "-o", str(tmp_path / "a"),
                                   "--json", "--samples", "2", "--seq-len", "128"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(l) for l in res.output.splitlines() if l.startswith("{")]
    assert lines
    back = load(tmp_path / "a")
    assert sum(isinstance(x, NMSparseLinear) for x in back.model.modules()) == 30 * 7


@pytest.mark.slow
def test_smollm2_wanda_2of4_beats_magnitude(smollm2):
    from edgetk.data import calibration_windows, eval_text, token_windows
    from edgetk.eval import perplexity

    wins = token_windows(smollm2.tokenizer, eval_text(), 256, 2)
    calib = calibration_windows(smollm2.tokenizer, 2, 256, seed=0)
    ppl = {}
    for method in ("magnitude", "wanda"):
        m = load(copy.deepcopy(smollm2.model))
        m.config, m.tokenizer = smollm2.config, smollm2.tokenizer
        compress(m, PruneConfig(method, n=2, m=4, n_samples=2), calib=calib)
        ppl[method] = perplexity(m.model, wins).perplexity
    fp = perplexity(smollm2.model, wins).perplexity
    assert fp < ppl["wanda"] < ppl["magnitude"]
