"""Residual-stream rotation (compress/rotate.py): exact on every forward path, composes, saves and loads with the
quantized layers after it, exports, and refuses what it cannot rotate."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from tests.conftest import TINY_LLAMA
from edgetk.compress import compress
from edgetk.compress.calib import model_bits
from edgetk.compress.rotate import RotateConfig, random_orthogonal
from edgetk.compress.vq import VQConfig
from edgetk.compressed import save
from edgetk.errors import ConfigError
from edgetk.models import llama, load

VQ = VQConfig(vec_len=4, codebook_size=16, kmeans_iters=3, refine_rounds=0, cg_iters=2, calib_samples=6)
TOKENS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 0, 64]])


def _loaded(model):
    lm = load(copy.deepcopy(model))
    lm.config = model.cfg
    return lm


def _decode(model, tokens):
    """Logits of `tokens` fed one at a time through the model's KV cache."""
    model.setup_cache(1, 32)
    try:
        with torch.no_grad():
            return torch.cat([model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(tokens.shape[1])], 1)
    finally:
        model.clear_cache()


@pytest.mark.parametrize("variant", ["tied", "untied-bias"])
def test_rotation_keeps_the_function(variant):
    cfg = TINY_LLAMA if variant == "tied" else dataclasses.replace(TINY_LLAMA, tie_embeddings=False,
                                                                     attention_bias=True)
    model = llama.init_random(cfg, seed=1)
    with torch.no_grad():
        ref = model(TOKENS)
    lm = _loaded(model)
    rep = compress(lm, "rotate")[0]
    m = lm.model
    assert m.cfg.residual_rotation and lm.config.residual_rotation
    q = m.rotation.double()
    torch.testing.assert_close(q @ q.T, torch.eye(cfg.hidden_size, dtype=torch.float64), atol=1e-6, rtol=0)
    assert all(bool((l.input_layernorm.weight == 1).all()) for l in m.model.layers)
    # the weights really moved (a no-op "rotation" would pass the function checks too)
    assert (m.model.layers[0].self_attn.q_proj.weight - model.model.layers[0].self_attn.q_proj.weight).abs().max() > 0.1
    with torch.no_grad():
        got = m(TOKENS)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(_decode(m, TOKENS), ref, atol=1e-4, rtol=1e-4)
    assert rep.totals["rotation_max_abs_logit_change"] < 1e-4 and rep.totals["rotation_dim"] == cfg.hidden_size
    if cfg.tie_embeddings:
        assert m.lm_head.weight is m.model.embed_tokens.weight


def test_rotations_compose(tiny_llama):
    with torch.no_grad():
        ref = tiny_llama(TOKENS)
    lm = _loaded(tiny_llama)
    compress(lm, [RotateConfig(seed=1), RotateConfig(seed=2)])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(TOKENS), ref, atol=1e-4, rtol=1e-4)
    expected = random_orthogonal(TINY_LLAMA.hidden_size, 1) @ random_orthogonal(TINY_LLAMA.hidden_size, 2)
    torch.testing.assert_close(lm.model.rotation.double(), expected, atol=1e-6, rtol=0)


def test_rotate_then_vq_saves_loads_and_counts_the_rotation(tmp_path, tiny_llama):
    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    lm = _loaded(tiny_llama)
    reports = compress(lm, [RotateConfig(), VQ], calib=calib)
    totals = reports[-1].totals
    assert totals["model_bits"] == model_bits(lm.model)
    # the float32 rotation is part of the whole-model bits: one [hidden, hidden] matrix more than without it
    lm0 = _loaded(tiny_llama)
    totals0 = compress(lm0, VQ, calib=calib)[0].totals
    extra = totals["model_bits"] - totals0["model_bits"]
    assert extra == TINY_LLAMA.hidden_size ** 2 * 32
    art = save(lm, tmp_path / "a", reports, recipe="rotate+vq")
    assert art.manifest["base_config"]["residual_rotation"] is True
    back = load(tmp_path / "a")
    assert back.config.residual_rotation
    with torch.no_grad():
        torch.testing.assert_close(back.model(TOKENS), lm.model(TOKENS), atol=0, rtol=0)
    assert torch.equal(back.model.rotation, lm.model.rotation)


def test_rotate_refuses_what_it_cannot_rotate(tiny_llama, tiny_bert):
    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    lm = _loaded(tiny_llama)
    compress(lm, VQ, calib=calib)
    with pytest.raises(ConfigError, match="rotate first"):
        compress(lm, "rotate")
    pruned = _loaded(tiny_llama)  # pruned linears are still nn.Linear: refused by the recipe record
    compress(pruned, "prune-wanda-50", calib=calib)
    with pytest.raises(ConfigError, match=r"before the other compression steps.*prune"):
        compress(pruned, "rotate")
    enc = load(copy.deepcopy(tiny_bert))
    enc.config = tiny_bert.cfg
    with pytest.raises(ConfigError, match="Llama-family"):
        compress(enc, "rotate")
    with pytest.raises(ConfigError, match="seed"):
        RotateConfig(seed=-1)


@pytest.mark.backend
@pytest.mark.parametrize("fmt", ["onnx", "executorch", "tvm"])
def test_rotated_vq_decoder_exports_with_golden(tmp_path, tiny_llama, fmt):
    """The rotation is two matmuls in the exported graph; the 32-token greedy golden must still be identical."""
    import edgetk

    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    lm = _loaded(tiny_llama)
    compress(lm, [RotateConfig(), VQ], calib=calib)
    art = edgetk.export(lm, format=fmt, out=tmp_path / "a", max_seq_len=48, golden_steps=32)
    golden = art.manifest["parity"]["golden"]
    assert golden["identical"] and golden["steps"] == 32 and golden["logits_max_abs"] <= 1e-3
