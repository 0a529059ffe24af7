"""The LLM runtime on a tiny random decoder: lossless speculative decoding, caches, streaming, bad input."""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from edgetk.errors import ConfigError, DataError, ModelLoadError
from edgetk.models import LoadedModel
from edgetk.runtimes.kv_cache import KVCacheConfig, LayerCalibration, QuantKVCache, cache_factory
from edgetk.runtimes.llm import LLM, NonFiniteLogitsError
from edgetk.runtimes.spec import SpecConfig, build_tree, default_template

PROMPTS = ["hello world, this is a test of the runtime", "abcabcabcabcabc", "the cat sat on the mat. the cat"]
QCACHE = KVCacheConfig(bits=4, key_group=8, value_group=16, fp_window=4)


@pytest.mark.parametrize("kv", [None, QCACHE, QCACHE.replace(key_bits=5, value_bits=3, value_rotation=True)],
                         ids=["fp-cache", "kv4-cache", "k5v3-rotated-cache"])
def test_speculative_greedy_is_token_identical(tiny_lm, kv):
    llm = LLM.load(tiny_lm, kv_cache=kv, max_seq_len=256)
    steps = []
    for p in PROMPTS:
        plain = llm.generate(p, 48)
        for method in ("recycling", "aded"):
            r = llm.generate(p, 48, speculative=method)
            assert r.token_ids == plain.token_ids, (method, p)
            assert r.text == plain.text
            steps.append(r.metrics.steps)
    assert min(steps) < 47  # drafts were really accepted (fewer forward passes than tokens)


def test_tree_template_is_prefix_closed_and_masks_ancestors():
    paths = default_template(top_k=4, max_nodes=12, max_depth=4)
    assert len(paths) == 12 and len(set(paths)) == 12
    assert all(p[:-1] in paths or len(p) == 1 for p in paths)
    tree = build_tree(paths)
    for i in range(tree.size):
        par = int(tree.parents[i])
        assert (par < i) and (par == -1 or tree.ancestors[i, par])
        assert int(tree.ancestors[i].sum()) == int(tree.depth[i]) + 1


def test_speculative_sampling_keeps_target_distribution(tiny_lm):
    """Joint law of the first two sampled tokens: speculative vs exact target probabilities."""
    llm = LLM.load(tiny_lm, max_seq_len=64, spec_config=SpecConfig(max_nodes=6))
    prompt, temp, top_p = "abcabcabc", 0.3, 0.8  # support: 9 token pairs
    ids = llm.encode(prompt)
    model = tiny_lm.model
    from edgetk.kernels.tree_verify import target_probs

    with torch.inference_mode():
        model_c = copy.deepcopy(model)
        model_c.clear_cache()
        p1 = target_probs(model_c(torch.tensor([ids]))[0, -1], temp, top_p)
        exact = {}
        for a in torch.nonzero(p1).flatten().tolist():
            p2 = target_probs(model_c(torch.tensor([ids + [a]]))[0, -1], temp, top_p)
            for b in torch.nonzero(p2).flatten().tolist():
                exact[(a, b)] = float(p1[a] * p2[b])
    n = 300  # the drafter persists across generations: after a warm-up its drafts are the target's top-k
    seen, accepted = Counter(), 0
    for s in range(n):
        r = llm.generate(prompt, 2, greedy=False, temperature=temp, top_p=top_p, seed=s, speculative="recycling")
        seen[tuple(r.token_ids[:2])] += 1
        accepted += r.metrics.mean_accepted > 0
    tv = 0.5 * sum(abs(seen[k] / n - exact.get(k, 0.0)) for k in set(seen) | set(exact))
    assert set(seen) <= set(exact)  # never a token outside the target's support
    assert accepted > n // 4  # the drafts were used
    assert tv < 0.1, (tv, seen.most_common(5))  # plain sampling, same n: ~0.05


def test_streaming_stop_and_metrics(tiny_lm):
    llm = LLM.load(tiny_lm, max_seq_len=128)
    pieces = []
    r = llm.generate("hello", 20, on_token=lambda t, s: pieces.append(s))
    assert "".join(pieces) == r.text and len(r.token_ids) == 20 and r.stop_reason == "length"
    m = r.metrics
    assert m.ttft_s > 0 and m.decode_tok_s > 0 and m.prefill_tok_s > 0 and m.kv_cache_bytes > 0
    assert m.peak_rss_mib > 10 and m.tokens_per_step == pytest.approx(1.0)
    never = llm.generate("hello", 20, stop=["\x00never-appears\x00"])
    assert never.token_ids == r.token_ids and never.stop_reason == "length"
    cut = r.text[5:7]
    stopped = llm.generate("hello", 20, stop=[cut])
    assert stopped.stop_reason == "stop" and stopped.text == r.text[: r.text.find(cut)]
    # the model's 4th token made its EOS: generation ends there, unless told to ignore it (decode benchmarks)
    eos_lm = LoadedModel(tiny_lm.name, tiny_lm.kind, tiny_lm.model, tiny_lm.tokenizer,
                         tiny_lm.config.replace(eos_token_id=r.token_ids[3]))
    eos_llm = LLM.load(eos_lm, max_seq_len=128)
    assert eos_llm.generate("hello", 20).stop_reason == "eos"
    full = eos_llm.generate("hello", 20, ignore_eos=True)
    assert full.stop_reason == "length" and full.token_ids == r.token_ids


def test_bad_input(tiny_lm):
    llm = LLM.load(tiny_lm, max_seq_len=32)
    with pytest.raises(DataError, match="empty"):
        llm.generate("", 4)
    with pytest.raises(DataError, match="KV cache holds 32"):
        llm.generate("x" * 40, 4)
    full = llm.generate("x" * 28, 50)  # fits, but the continuation does not: documented stop
    assert full.stop_reason == "cache_full" and len(full.token_ids) <= 5
    with pytest.raises(ConfigError):
        llm.generate("hi", 0)
    with pytest.raises(ConfigError):
        llm.generate("hi", 4, speculative="medusa")
    with pytest.raises(ConfigError, match="max_seq_len"):
        LLM.load(tiny_lm, max_seq_len=4096)


def test_tokenizer_mismatch(tiny_lm, make_byte_tokenizer):
    from tokenizers import Tokenizer as HFTokenizer

    from edgetk.models import Tokenizer

    other = HFTokenizer.from_str(tiny_lm.tokenizer.json_text)
    other.add_tokens(["<extra>"])
    with pytest.raises(ModelLoadError, match="differs"):
        LLM.load(tiny_lm, tokenizer=Tokenizer(other.to_str()), max_seq_len=32)
    bare = LoadedModel("bare", "decoder", tiny_lm.model, None, tiny_lm.config)
    with pytest.raises(ModelLoadError, match="do not belong together"):
        LLM.load(bare, tokenizer=Tokenizer(other.to_str()), max_seq_len=32)
    assert LLM.load(bare, tokenizer=make_byte_tokenizer(), max_seq_len=32).generate("ok", 2).token_ids


def test_non_finite_logits_raise(tiny_lm):
    broken = copy.deepcopy(tiny_lm)
    with torch.no_grad():
        broken.model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    llm = LLM.load(broken, max_seq_len=64)
    with pytest.raises(NonFiniteLogitsError):
        llm.generate("hello", 4)
    with pytest.raises(NonFiniteLogitsError):
        llm.generate("hello", 4, speculative="recycling")


def test_quant_cache_chunked_prefill_equals_token_by_token(tiny_lm):
    model = tiny_lm.model
    x = torch.randint(0, 256, (1, 90), generator=torch.Generator().manual_seed(3))
    outs = {}
    for name, chunk in {"chunk": 30, "step": 1}.items():
        model.setup_cache(1, 128, cache_factory(QCACHE))
        with torch.inference_mode():
            outs[name] = torch.cat([model(x[:, s: s + chunk], torch.arange(s, min(s + chunk, 90)))
                                    for s in range(0, 90, chunk)], 1)
        n_q = model.model.layers[0].self_attn.kv_cache.n_q
        assert n_q >= 72
    model.clear_cache()
    # the same blocks get quantized either way; only when (inside a chunk) differs. Both stay close to the
    # fp reference, 4-bit far closer than 2-bit (random tiny model: SNR, not exact equality)
    from edgetk.eval import snr_db

    with torch.inference_mode():
        ref = model(x)
    assert snr_db(ref, outs["chunk"]) > 14 and snr_db(ref, outs["step"]) > 14
    model.setup_cache(1, 128, cache_factory(QCACHE.replace(bits=2)))
    with torch.inference_mode():
        two = torch.cat([model(x[:, s: s + 30], torch.arange(s, s + 30)) for s in range(0, 90, 30)], 1)
    model.clear_cache()
    assert snr_db(ref, two) < snr_db(ref, outs["chunk"]) - 6


def test_cache_memory_at_2048_is_3_5x_below_fp16():
    """smollm2-135m's cache geometry (3 KV heads x 64 dims per layer), kv4 preset, context 2048."""
    from edgetk.runtimes.kv_cache import default_levels, preset

    cfg = preset("kv4")
    calib = LayerCalibration(torch.ones(3, 2, 64), default_levels(cfg))
    q = QuantKVCache(cfg, 1, 3, 2048, 64, calib)
    fp16 = 2 * 3 * 2048 * 64 * 2
    assert fp16 / q.nbytes >= 3.5, fp16 / q.nbytes
    calib2 = LayerCalibration(calib.key_range, default_levels(preset("kv2")))
    q2 = QuantKVCache(preset("kv2"), 1, 3, 2048, 64, calib2)
    assert q2.nbytes < q.nbytes


def test_config_validation():
    with pytest.raises(ConfigError, match="bits"):
        KVCacheConfig(bits=5)
    with pytest.raises(ConfigError, match="method"):
        SpecConfig(method="x")
    with pytest.raises(ConfigError, match="calibration"):
        QuantKVCache(KVCacheConfig(key_scaling="calibrated"), 1, 2, 64, 16)
    assert KVCacheConfig.from_json(KVCacheConfig(bits=2, gear_rank=2).to_json()) == KVCacheConfig(bits=2, gear_rank=2)


def test_load_warms_the_kernels_up(tiny_lm):
    """LLM.load runs the model once per WARM_UP_ROWS and once with the draft tree's rows, without a cache, so that
    the layers' kernels (a VQ layer's batch-1 codebook GEMV, few-input GEMM for the verify steps, prefill GEMM:
    JIT-compiled and packed on first use) are ready before the first generation is timed;
    the cache is set up afterwards and generation is unaffected."""
    from edgetk.compress.vq_linear import VQLinear
    from edgetk.kernels import llvm_codebook as lk
    from edgetk.kernels.codebook_gemm import CodebookFormat
    from edgetk.kernels import llvm_codebook_few as few
    from edgetk.runtimes.llm import WARM_UP_ROWS
    from edgetk.runtimes.spec import SpeculativeStepper

    m = tiny_lm.model
    lin = m.model.layers[0].mlp.down_proj
    fmt = CodebookFormat(lin.out_features, lin.in_features, has_scale=True)
    g = torch.Generator().manual_seed(0)
    vq = VQLinear.from_parts(fmt, torch.randint(0, 256, (1, fmt.out_features, fmt.n_vec), generator=g),
                             torch.randn(1, 1, 256, 4, generator=g) / 8, scale=torch.ones(fmt.out_features))
    m.model.layers[0].mlp.down_proj = vq
    want = LLM.load(copy.deepcopy(tiny_lm), max_seq_len=64).generate(PROMPTS[0], max_new_tokens=8).token_ids
    lk._CACHE._d.pop(id(vq.codes), None)
    rows = []
    m.lm_head.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    llm = LLM.load(tiny_lm, max_seq_len=64)
    tree = SpeculativeStepper.tree_size_for(llm.spec_config)
    assert 1 < tree <= few.MAX_ROWS and few.max_rows(64) < WARM_UP_ROWS[-1] and rows == sorted({*WARM_UP_ROWS, tree})
    assert m.model.layers[0].self_attn.kv_cache is not None
    if lk.available():  # the float32 batch-1 kernel packed the layer during load
        assert id(vq.codes) in lk._CACHE._d
    assert llm.generate(PROMPTS[0], max_new_tokens=8).token_ids == want


def test_decode_steps_run_the_thread_parallel_gemv(tiny_lm, monkeypatch):
    """One-token steps route the fp32 nn.Linear weights to llvm_gemv_f32 (MKL's sgemv is single-threaded); the
    tiny model's weights are below MIN_WEIGHTS (F.linear), so lowering it routes them: same greedy tokens."""
    from edgetk.kernels import llvm_gemv_f32 as gv

    want = LLM.load(copy.deepcopy(tiny_lm), max_seq_len=64).generate(PROMPTS[0], max_new_tokens=8).token_ids
    monkeypatch.setattr(gv, "MIN_WEIGHTS", 1)
    calls = []
    orig = gv.gemv_f32
    monkeypatch.setattr(gv, "gemv_f32", lambda *a, **k: calls.append(tuple(a[1].shape)) or orig(*a, **k))
    llm = LLM.load(tiny_lm, max_seq_len=64)
    assert calls or not gv.available()  # the one-row warm-up step ran it (compiled at load, not in the first step)
    got = llm.generate(PROMPTS[0], max_new_tokens=8).token_ids
    assert got == want
    if gv.available():
        cfg = tiny_lm.model.cfg
        assert (cfg.vocab_size, cfg.hidden_size) in calls and len(set(calls)) >= 4  # head, attention, MLP


def test_prompt_head_runs_on_the_last_row_unless_speculating(tiny_lm):
    """Without speculation the prompt's logits are needed for its last token only: the head gets one row (the
    same logits as the full forward's last row); speculative decoding primes its drafts on every row's logits."""
    llm = LLM.load(tiny_lm, max_seq_len=128)
    ids = llm.encode(PROMPTS[0])
    full = llm.decoder.forward(ids, 0)
    last = llm.decoder.forward(ids, 0, last_only=True)
    assert full.shape == (len(ids), tiny_lm.model.cfg.vocab_size) and last.shape == (1, full.shape[1])
    torch.testing.assert_close(last, full[-1:], rtol=1e-5, atol=1e-5)
    rows = []
    hook = tiny_lm.model.lm_head.register_forward_hook(
        lambda m, a, out: rows.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
    try:
        plain = llm.generate(PROMPTS[0], 4)
        assert rows[0] == 1  # prompt: one row through the head
        rows.clear()
        spec = llm.generate(PROMPTS[0], 4, speculative="recycling")
        assert rows[0] == len(ids)
    finally:
        hook.remove()
    assert spec.token_ids == plain.token_ids
