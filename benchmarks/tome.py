"""Token merging (ToMe) on minilm-l6: ONNX Runtime latency at sequence length 256 and embedding cosine similarity
to the unmerged model on real passages from the evaluation text (consecutive sentences joined to >= 256 tokens).

Target (issue 4): >= 1.3x faster in onnxruntime at seq 256 with mean cosine >= 0.95.

    nice -n 10 python benchmarks/tome.py [--r 8 16 24] [--passages 32] [--reps 30]

Prints one JSON line per case, then a table. Latencies are medians / p90 of `reps` runs after warm-up, the
unmerged and merged sessions measured in the same process, interleaved round by round.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgetk.compress import compress
from edgetk.compress.token_merge import TokenMergeConfig
from edgetk.data import eval_text, sentences
from edgetk.models import load

SEQ = 256


def passages(tok, n: int) -> list[str]:
    """Join consecutive evaluation sentences until each passage has >= SEQ tokens."""
    out, cur = [], []
    for s in sentences(eval_text()):
        cur.append(s)
        if len(tok.encode(" ".join(cur), add_special_tokens=True)) >= SEQ:
            out.append(" ".join(cur))
            cur = []
            if len(out) == n:
                break
    return out


def export_onnx(model, ids, mask, path: Path) -> None:
    prog = torch.onnx.export(model, (ids, mask), dynamo=True, input_names=["input_ids", "attention_mask"],
                             verbose=False)
    prog.save(str(path))


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def interleaved(sessions: dict, feed: dict, reps: int) -> dict[str, list[float]]:
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    times = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            times[k] += timed(lambda: s.run(None, feed), 1)
    return times


def stats(ts: list[float]) -> dict:
    return {"median_ms": float(np.median(ts) * 1e3), "p90_ms": float(np.percentile(ts, 90) * 1e3)}


@torch.inference_mode()
def cosine(ref_model, model, batch) -> dict:
    a = ref_model(batch["input_ids"], batch["attention_mask"])
    b = model(batch["input_ids"], batch["attention_mask"])
    c = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"mean_cosine": c.mean().item(), "min_cosine": c.min().item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[8, 16, 24, 32])
    ap.add_argument("--passages", type=int, default=32)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = load("minilm-l6")
    texts = passages(base.tokenizer, args.passages)
    batch = base.tokenizer.batch(texts, max_length=SEQ, pad_to=SEQ)
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        export_onnx(base.model, ids, mask, Path(d) / "base.onnx")
        models = {}
        for r in args.r:
            m = load(copy.deepcopy(base.model))
            m.config, m.tokenizer = base.config, base.tokenizer
            compress(m, TokenMergeConfig(r=r))
            models[f"tome-r{r}"] = m.model
            export_onnx(m.model, ids, mask, Path(d) / f"r{r}.onnx")
        for threads in args.threads:
            sessions = {"base": ort_session(Path(d) / "base.onnx", threads)}
            sessions.update({k: ort_session(Path(d) / f"r{k.split('-r')[1]}.onnx", threads) for k in models})
            times = interleaved(sessions, feed, args.reps)
            b = stats(times["base"])
            for k, s in sessions.items():
                model = base.model if k == "base" else models[k]
                parity = float(np.abs(s.run(None, feed)[0] - model(ids, mask).detach().numpy()).max())
                row = {"case": k, "threads": threads, "seq_len": SEQ, **stats(times[k]),
                       "speedup_vs_base": b["median_ms"] / stats(times[k])["median_ms"], "onnx_vs_eager_max_abs": parity,
                       **(cosine(base.model, model, batch) if k != "base" else {"mean_cosine": 1.0, "min_cosine": 1.0}),
                       "passages": len(texts)}
                rows.append(row)
                print(json.dumps(row))
    print(f"\nminilm-l6, seq {SEQ}, onnxruntime CPU, {args.reps} interleaved reps; cosine over {len(texts)} passages")
    print(f"{'case':<10} {'thr':>3} {'median ms':>10} {'p90 ms':>8} {'speedup':>8} {'mean cos':>9} {'min cos':>8}")
    for r in rows:
        print(f"{r['case']:<10} {r['threads']:>3} {r['median_ms']:>10.2f} {r['p90_ms']:>8.2f} "
              f"{r['speedup_vs_base']:>8.2f} {r['mean_cosine']:>9.4f} {r['min_cosine']:>8.4f}")


if __name__ == "__main__":
    main()
