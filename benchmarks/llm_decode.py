"""Decode speed of the eager LLM runtime: fp model vs VQ 2-bit model, fp cache vs 4-bit KV cache, same run.

    nice -n 10 python benchmarks/llm_decode.py --threads 2 --new-tokens 64 --reps 3 \
        [--vq-artifact DIR | --vq-recipe vq2]

Cases: every (model, cache) pair; a model is the zoo model (fp32) and, when given, a VQ-compressed
artifact (or the zoo model compressed here with `--vq-recipe`). Each case: one warm-up generation, then
`--reps` greedy generations of `--new-tokens` tokens from a real prompt (eval text); reported: median
and p90 decode tok/s, time to first token, prefill tok/s, KV-cache bytes, peak RSS, ratio to the fp
model with fp cache. Cases run interleaved rep by rep so machine-load drift hits all alike.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch


def _models(a) -> dict:
    from edgetk.models import load

    out = {"fp32": load(a.model)}
    if a.vq_artifact:
        out["vq"] = load(a.vq_artifact)
    elif a.vq_recipe:
        from edgetk.compress import compress

        vq = load(a.model)
        compress(vq, a.vq_recipe)
        out[a.vq_recipe] = vq
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--vq-artifact", default=None)
    ap.add_argument("--vq-recipe", default=None)
    ap.add_argument("--kv", nargs="+", default=["fp", "kv4"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=512)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from edgetk.data import eval_text
    from edgetk.runtimes.llm import LLM

    llms = {}
    for mname, lm in _models(a).items():
        for kv in a.kv:
            import copy

            llms[(mname, kv)] = LLM.load(copy.deepcopy(lm) if len(a.kv) > 1 else lm,
                                         kv_cache=None if kv == "fp" else kv, max_seq_len=a.max_seq_len)
    prompt = " ".join(eval_text().split()[:48])
    for llm in llms.values():
        llm.generate(prompt, 4, ignore_eos=True)
    res: dict = {k: [] for k in llms}
    for _ in range(a.reps):
        for k, llm in llms.items():
            res[k].append(llm.generate(prompt, a.new_tokens, ignore_eos=True).metrics)
    base = statistics.median(m.decode_tok_s for m in res[("fp32", "fp")])
    rows = []
    for (mname, kv), ms in res.items():
        tps = sorted(m.decode_tok_s for m in ms)
        row = {"bench": "llm_decode", "model": mname, "kv": kv, "threads": a.threads, "new_tokens": a.new_tokens,
               "reps": a.reps, "decode_tok_s_median": statistics.median(tps), "decode_tok_s_p10": tps[0],
               "ttft_s_median": statistics.median(m.ttft_s for m in ms),
               "prefill_tok_s_median": statistics.median(m.prefill_tok_s for m in ms),
               "kv_cache_bytes": ms[-1].kv_cache_bytes, "peak_rss_mib": max(m.peak_rss_mib for m in ms),
               "ratio_to_fp32_fp": statistics.median(tps) / base}
        rows.append(row)
        print(json.dumps(row, sort_keys=True))
    print(f"\n{'model':<8} {'kv':<6} {'tok/s':>7} {'ratio':>6} {'ttft s':>7} {'KV MiB':>7}")
    for r in rows:
        print(f"{r['model']:<8} {r['kv']:<6} {r['decode_tok_s_median']:>7.2f} {r['ratio_to_fp32_fp']:>6.2f} "
              f"{r['ttft_s_median']:>7.3f} {r['kv_cache_bytes'] / 2**20:>7.2f}")
    return rows


if __name__ == "__main__":
    main()
