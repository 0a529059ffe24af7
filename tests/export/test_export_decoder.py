"""Decoders: a one-token step with the KV cache carried across steps; greedy tokens identical to eager."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import edgetk
from edgetk.exporters.decoder import DecoderStep, ExplicitStepper, StepKVCache, cache_installed
from edgetk.runtimes import Session


def test_decoder_step_equals_dense_cache_and_restores_model(tiny_llama):
    """The functional step (explicit caches) computes what the model's own dense cache computes."""
    tokens = [5, 17, 42, 7, 99, 3]
    with cache_installed(tiny_llama, 32, None):
        with torch.no_grad():
            ref = [tiny_llama(torch.tensor([[t]]), torch.tensor([i]))[0, -1] for i, t in enumerate(tokens)]
    assert all(l.self_attn.kv_cache is None for l in tiny_llama.model.layers) and tiny_llama.cache_len == 0
    with cache_installed(tiny_llama, 32, lambda *a: StepKVCache()):
        step = DecoderStep(tiny_llama)

        @torch.no_grad()
        def run(arrays):
            return [o.numpy() for o in step(*[torch.from_numpy(a) for a in arrays])]

        st = ExplicitStepper(run, [2, 1, 2, 32, 16])
        got = [st.step(t, i) for i, t in enumerate(tokens)]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-5, rtol=1e-5)
    assert np.abs(st.k[:, :, :, len(tokens):]).max() == 0 and np.abs(st.k[:, :, :, : len(tokens)]).max() > 0


@pytest.mark.backend
@pytest.mark.parametrize("fmt,mode", [("onnx", "explicit")])  # executorch (mutable): the smollm2 zoo test
def test_tiny_decoder_golden(tmp_path, tiny_llama, fmt, mode):
    art = edgetk.export(tiny_llama, format=fmt, out=tmp_path / "a", max_seq_len=48, golden_steps=32)
    m = art.manifest
    assert m["decoder"]["mode"] == mode and m["decoder"]["max_seq_len"] == 48
    golden = m["parity"]["golden"]
    assert golden["identical"] and golden["steps"] == 32 and len(golden["tokens"]) == 32
    assert golden["logits_max_abs"] <= 1e-3
    # the caller drives the artifact: continue decoding from the same prompt and compare with eager
    sess = Session(art)
    if mode == "explicit":
        assert m["inputs"]["names"] == ["tokens", "input_pos", "k_cache", "v_cache"]
        st = ExplicitStepper(sess.run, m["decoder"]["cache_shape"])
        logits = [st.step(t, i) for i, t in enumerate([1, 2, 3])]
    else:
        logits = [sess.run([np.array([[t]]), np.array([i])])[0].reshape(-1) for i, t in enumerate([1, 2, 3])]
    with torch.no_grad():
        ref = tiny_llama(torch.tensor([[1, 2, 3]]))[0]
    np.testing.assert_allclose(np.stack(logits), ref.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.backend
def test_decoder_max_seq_len_checked(tmp_path, tiny_llama):
    with pytest.raises(edgetk.ConfigError, match="golden_steps"):
        edgetk.export(tiny_llama, format="onnx", out=tmp_path / "a", max_seq_len=16, golden_steps=16)
    with pytest.raises(edgetk.ConfigError, match="max_seq_len"):
        edgetk.export(tiny_llama, format="onnx", out=tmp_path / "a", max_seq_len=4096)
