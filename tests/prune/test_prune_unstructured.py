"""Unstructured pruning (magnitude, Wanda) and N:M storage on tiny models, against independent references."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from edgetk.compress import compress
from edgetk.compress.prune import (NMSparseLinear, PruneConfig, nm_mask, pack_indices, prunable_linears,
                                   unpack_indices)
from edgetk.models import load
from tests.conftest import TINY_LLAMA


pytestmark = pytest.mark.usefixtures("one_thread")

def loaded_tiny(model):
    m = load(copy.deepcopy(model))
    m.config = TINY_LLAMA
    return m


def test_magnitude_zeroes_exactly_the_smallest_weights(tiny_llama):
    m = loaded_tiny(tiny_llama)
    rep = compress(m, PruneConfig("magnitude", 0.3))[0]
    orig = dict(tiny_llama.named_modules())
    for name, lin in prunable_linears(m.model).items():
        w0 = orig[name].weight.detach().abs().flatten()
        w = lin.weight.detach().flatten()
        zero = w == 0
        assert int(zero.sum()) == round(0.3 * w.numel())
        assert w0[zero].max() <= w0[~zero].min()  # nothing kept is smaller than anything removed
    assert torch.equal(m.model.model.embed_tokens.weight, tiny_llama.model.embed_tokens.weight)
    assert rep.totals["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert len(rep.layers) == 2 * 7 and all(l.sparsity == pytest.approx(0.3, abs=2e-3) for l in rep.layers)


def test_wanda_mask_matches_numpy_reference(tiny_llama):
    calib = torch.randint(0, 256, (4, 32))
    m = loaded_tiny(tiny_llama)
    lin0 = tiny_llama.model.layers[1].mlp.down_proj
    acts = []
    h = lin0.register_forward_pre_hook(lambda _m, a: acts.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
    with torch.no_grad():
        for i in range(4):
            tiny_llama(calib[i: i + 1])
    h.remove()
    x = torch.cat(acts).double().numpy()
    score = np.abs(lin0.weight.detach().double().numpy()) * np.sqrt((x ** 2).sum(0))[None]
    k = round(0.5 * score.shape[1])
    ref_keep = np.ones_like(score, dtype=bool)
    np.put_along_axis(ref_keep, np.argsort(score, axis=1)[:, :k], False, axis=1)
    compress(m, PruneConfig("wanda", 0.5, n_samples=4), calib=calib)
    got = (m.model.model.layers[1].mlp.down_proj.weight != 0).numpy()
    assert (got == ref_keep).mean() > 0.999  # float32 vs float64 norms may flip a tie


def test_wanda_beats_magnitude_on_outlier_inputs():
    """With a few huge input channels (as in LLM activations), activation-aware scores keep output error lower."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32, bias=False)
    model = nn.Sequential(lin)
    scale = torch.ones(64)
    scale[:4] = 30.0
    calib_x = torch.randn(256, 64) * scale
    errs = {}
    for method in ("magnitude", "wanda"):
        m = load(copy.deepcopy(model))
        pruned = m.model[0]
        from edgetk.compress.prune import input_norms, prune_layer

        norms = input_norms(m.model, {"0": pruned}, calib_x[None]) if method == "wanda" else {}
        prune_layer("0", pruned, PruneConfig(method, 0.5), 0.5, norms.get("0"), m.model)
        errs[method] = ((pruned(calib_x) - lin(calib_x)).norm() / lin(calib_x).norm()).item()
    assert errs["wanda"] < 0.7 * errs["magnitude"]


@pytest.mark.parametrize("n,m,bits", [(2, 4, 2), (4, 8, 4), (1, 4, 2)])
def test_nm_linear_stores_compact_and_matches_masked_dense(n, m, bits):
    torch.manual_seed(0)
    lin = nn.Linear(48, 20)
    keep = nm_mask(lin.weight.detach().abs(), n, m)
    q = NMSparseLinear.from_dense(lin, keep, n, m)
    assert q.bits == bits and q.indices.dtype == torch.uint8
    assert q.values.numel() == 20 * 48 * n // m
    assert q.indices.numel() == -(-(48 // m * n) // (8 // bits)) * 20
    dense = lin.weight.detach() * keep
    assert torch.equal(q.dense_weight(), dense)
    groups = (q.dense_weight() != 0).view(20, -1, m).sum(-1)
    assert bool((groups <= n).all())
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(q(x), nn.functional.linear(x, dense, lin.bias), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_index_packing_roundtrip(bits):
    pos = torch.randint(0, 2 ** bits, (7, 13))
    packed = pack_indices(pos, bits)
    assert packed.shape == (7, -(-13 // (8 // bits)))
    assert torch.equal(unpack_indices(packed, bits, 13), pos)


def test_nm_working_copy_edits_are_packed_on_save():
    torch.manual_seed(0)
    lin = nn.Linear(16, 4, bias=False)
    q = NMSparseLinear.from_dense(lin, nm_mask(lin.weight.detach().abs(), 2, 4), 2, 4)
    before = q.dense_weight().clone()
    q.weight.mul_(2.0)  # e.g. a quantizer writing its dense stand-in
    assert torch.equal(q(torch.eye(16)).T, 2 * before)
    state = q.state_dict()
    fresh = NMSparseLinear(16, 4, 2, 4, bias=False)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.dense_weight(), 2 * before)


def test_nm_recipe_roundtrips_through_artifact(tiny_llama, tmp_path):
    from edgetk.compressed import save

    m = loaded_tiny(tiny_llama)
    reps = compress(m, "prune-2of4", calib=torch.randint(0, 256, (4, 32)))
    assert reps[0].totals["bits_per_weight"] == pytest.approx(0.5 * (32 + 2))
    assert all(type(x) is NMSparseLinear for n, x in m.model.named_modules() if n.endswith("_proj"))
    save(m, tmp_path / "art", reps)
    back = load(tmp_path / "art")
    x = torch.randint(0, 256, (1, 24))
    torch.testing.assert_close(back.model(x), m.model(x), rtol=0, atol=0)
    assert type(back.model.model.layers[0].mlp.up_proj) is NMSparseLinear
    size = (tmp_path / "art" / "model.safetensors").stat().st_size
    dense = sum(p.numel() * 4 for p in tiny_llama.parameters())
    assert size < 0.75 * dense


@pytest.mark.backend
def test_nm_model_exports_to_onnx_and_matches_eager(tiny_llama, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m = loaded_tiny(tiny_llama)
    compress(m, PruneConfig("magnitude", n=2, m=4))
    x = torch.randint(0, 256, (1, 16))
    ep = torch.export.export(m.model, (x,))
    names = [n for n, _ in ep.named_parameters()] + [n for n, _ in ep.named_buffers()]
    assert any(n.endswith("indices") for n in names) and not any(n.endswith("up_proj.weight") for n in names)
    path = tmp_path / "m.onnx"
    torch.onnx.export(m.model, (x,), dynamo=True, input_names=["tokens"]).save(str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"tokens": x.numpy()})[0]
    ref = m.model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
