"""The LLM runtime on the real smollm2-135m: speculative greedy identical to plain greedy on real prompts;
the 4-bit cache keeps perplexity (measured through the cache)."""
from __future__ import annotations

import copy

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm(smollm2):
    from edgetk.runtimes.llm import LLM

    return LLM.load(copy.deepcopy(smollm2), max_seq_len=192)


def _prompts(tok, n):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from spec import prompts_from_eval

    return prompts_from_eval(tok, n, 48)


def test_speculative_greedy_identical_on_real_prompts(llm):
    prompts = _prompts(llm.tokenizer, 2)
    assert len(prompts) == 2
    accepted = []
    for p in prompts:
        plain = llm.generate(p, 32)
        for method in ("recycling", "aded"):
            r = llm.generate(p, 32, speculative=method)
            assert r.token_ids == plain.token_ids, method
            accepted.append(r.metrics.tokens_per_step)
    assert max(accepted) > 1.2  # drafts were accepted on real text


def test_kv4_cache_perplexity_through_the_cache(smollm2, eval_text):
    from edgetk.data import token_windows
    from edgetk.data import calibration_windows
    from edgetk.runtimes.kv_cache import cache_factory, cached_perplexity, calibrate, preset

    model = copy.deepcopy(smollm2.model)
    wins = token_windows(smollm2.tokenizer, eval_text, 256, 2)
    fp = cached_perplexity(model, wins, None, chunk=64)
    q = cached_perplexity(model, wins, cache_factory(preset("kv4-block")), chunk=64)
    assert q["perplexity"] < fp["perplexity"] + 0.3, (q, fp)
    assert q["kv_cache_bytes"] < fp["kv_cache_bytes"] / 2
    # the kv4 preset (keys 5 bits, values 3, calibrated on calibration text) against a uniform 4/4 cache
    # calibrated the same way: same bytes, closer to the fp cache
    ppl = {}
    for name, cfg in {"kv4": preset("kv4"), "4/4": preset("kv4").replace(key_bits=0, value_bits=0)}.items():
        calib = calibrate(model, calibration_windows(smollm2.tokenizer, 2, 256), cfg)
        ppl[name] = cached_perplexity(model, wins, cache_factory(cfg, calib), chunk=64)["perplexity"]
    assert ppl["kv4"] < fp["perplexity"] + 0.15 and ppl["kv4"] < ppl["4/4"], (ppl, fp)
