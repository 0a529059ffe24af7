"""Speculative decoding (Token Recycling, ADED-style tri-grams) vs plain greedy, same runtime, same run.

    nice -n 10 python benchmarks/spec.py --prompts 10 --new-tokens 128 --threads 2

Prompts: the first `--prompt-tokens` tokens of the first `--prompts` articles of the evaluation text.
Per prompt the modes run back to back (plain, recycling, aded; order rotated per prompt so machine
load drifts hit every mode alike); the text of every speculative run must equal plain greedy's.
Reported: decode wall-clock (after the first token) per mode, speedup = sum(plain decode s) /
sum(mode decode s) and the median of per-prompt ratios, tokens per decoder step, mean accepted drafts.
The drafters keep their tables across prompts (`SpecConfig.persist`, as a serving runtime would);
`--cold` gives every prompt a fresh drafter.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

MODES = (None, "recycling", "aded")


def prompts_from_eval(tok, n: int, n_tokens: int) -> list[str]:
    from edgetk.data import eval_text

    arts = [line.strip() for line in eval_text().splitlines() if len(line.split()) > 2 * n_tokens // 3]
    return [tok.decode(tok.encode(a)[:n_tokens]) for a in arts[:n]]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-nodes", type=int, default=4)
    ap.add_argument("--kv", default=None, help="KV-cache preset (default: fp cache)")
    ap.add_argument("--cold", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from edgetk.runtimes.llm import LLM
    from edgetk.runtimes.spec import SpecConfig

    llm = LLM.load(a.model, kv_cache=a.kv, max_seq_len=a.prompt_tokens + a.new_tokens + 64,
                   spec_config=SpecConfig(max_nodes=a.max_nodes, persist=not a.cold))
    prompts = prompts_from_eval(llm.tokenizer, a.prompts, a.prompt_tokens)
    llm.generate("Warm-up.", 8)  # first-call overheads out of the timings
    runs: dict = {str(m): [] for m in MODES}
    for i, p in enumerate(prompts):
        order = MODES[i % 3:] + MODES[: i % 3]
        res = {m: llm.generate(p, a.new_tokens, speculative=m) for m in order}
        for m in MODES:
            r = res[m]
            row = {"bench": "spec", "prompt": i, "mode": str(m), "decode_s": r.metrics.decode_s,
                   "new_tokens": len(r.token_ids), "tokens_per_step": r.metrics.tokens_per_step,
                   "mean_accepted": r.metrics.mean_accepted, "decode_tok_s": r.metrics.decode_tok_s,
                   "identical_to_greedy": r.token_ids == res[None].token_ids}
            runs[str(m)].append(row)
            print(json.dumps(row, sort_keys=True), flush=True)
    plain = runs["None"]
    summary = {"bench": "spec_summary", "model": a.model, "prompts": len(prompts), "new_tokens": a.new_tokens,
               "threads": a.threads, "kv": a.kv, "persist": not a.cold,
               "tree_nodes": llm._stepper("recycling").tree_size}
    for m in MODES[1:]:
        rs = runs[m]
        summary[m] = {
            "speedup_total": sum(r["decode_s"] for r in plain) / sum(r["decode_s"] for r in rs),
            "speedup_median": statistics.median(p["decode_s"] / r["decode_s"] for p, r in zip(plain, rs)),
            "speedup_p10": sorted(p["decode_s"] / r["decode_s"] for p, r in zip(plain, rs))[len(rs) // 10],
            "identical": all(r["identical_to_greedy"] for r in rs),
            "tokens_per_step": statistics.mean(r["tokens_per_step"] for r in rs),
            "mean_accepted": statistics.mean(r["mean_accepted"] for r in rs),
            "decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in rs)}
    summary["plain_decode_tok_s_median"] = statistics.median(r["decode_tok_s"] for r in plain)
    print(json.dumps(summary, sort_keys=True))
    print(f"\n{'mode':<10} {'speedup':>8} {'median':>7} {'tok/step':>9} {'accepted':>9} {'identical':>9}")
    for m in MODES[1:]:
        s = summary[m]
        print(f"{m:<10} {s['speedup_total']:>8.2f} {s['speedup_median']:>7.2f} {s['tokens_per_step']:>9.2f} "
              f"{s['mean_accepted']:>9.2f} {str(s['identical']):>9}")
    return summary


if __name__ == "__main__":
    main()
