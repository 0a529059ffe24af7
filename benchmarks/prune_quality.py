"""Pruning on smollm2-135m: quality vs sparsity (magnitude, Wanda, EvoPress-searched budgets; 30/40/50%, 2:4),
and the ONNX Runtime latency of 25% structured MLP-channel pruning.

Quality: perplexity on the first `--windows` non-overlapping 512-token windows of the evaluation text (all 511
predictions per window scored) and next-token top-1 agreement with the fp model (same definition as
`edgetk.eval.top1_agreement`, computed in the same forward pass against cached fp argmaxes). Calibration
(Wanda norms, EvoPress fitness) uses the Wikipedia calibration text only.

Speed: the fp and the pruned model exported with `torch.onnx.export(dynamo=True)` for a prefill of `--seq`
tokens returning the last position's logits (what a generation prefill computes) and, separately, all
positions' logits; both sessions timed interleaved in one run, medians and p90.

    nice -n 10 python benchmarks/prune_quality.py --part quality evo structured [--windows 20]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgetk.compress import compress
from edgetk.compress.evopress import EvoPruneConfig
from edgetk.compress.prune import PruneConfig
from edgetk.compress.prune_structured import StructuredPruneConfig
from edgetk.data import calibration_windows, eval_text, token_windows
from edgetk.models import LoadedModel, load

ROWS: list[dict] = []


@torch.inference_mode()
def quality(model, windows, ref_top1) -> dict:
    nll, n, agree = 0.0, 0, 0
    for i in range(windows.shape[0]):
        x = windows[i: i + 1]
        logits = model(x).float()
        nll += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        n += x.shape[1] - 1
        agree += (logits.argmax(-1) == ref_top1[i]).sum().item()
    return {"perplexity": math.exp(nll / n), "top1_agreement": agree / (windows.shape[0] * windows.shape[1])}


def fresh(base: LoadedModel) -> LoadedModel:
    return LoadedModel(base.name, base.kind, copy.deepcopy(base.model), base.tokenizer, base.config, base.source)


def emit(row: dict) -> None:
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def run_case(base, name, cfg, calib, windows, ref_top1, fp_ppl) -> LoadedModel:
    m = fresh(base)
    t0 = time.perf_counter()
    reps = compress(m, cfg, calib=calib) if cfg is not None else []
    secs = time.perf_counter() - t0
    q = quality(m.model, windows, ref_top1)
    tot = reps[0].totals if reps else {"sparsity": 0.0}
    emit({"part": "quality", "case": name, "sparsity": round(tot.get("sparsity", 0.0), 4), **q,
          "ppl_ratio_vs_fp": q["perplexity"] / fp_ppl if fp_ppl else 1.0, "compress_s": secs,
          "kl_uniform": tot.get("kl_uniform"), "kl_searched": tot.get("kl_searched"),
          "unit_sparsity": tot.get("unit_sparsity"), "windows": windows.shape[0]})
    return m


def part_quality(base, calib, windows, ref_top1, fp_ppl, sparsities, evo: bool, args) -> None:
    if not evo:
        for s in sparsities:
            run_case(base, f"magnitude-{int(s * 100)}", PruneConfig("magnitude", s), calib, windows, ref_top1, fp_ppl)
            run_case(base, f"wanda-{int(s * 100)}", PruneConfig("wanda", s, n_samples=args.calib), calib, windows,
                     ref_top1, fp_ppl)
        run_case(base, "magnitude-2:4", PruneConfig("magnitude", n=2, m=4), calib, windows, ref_top1, fp_ppl)
        run_case(base, "wanda-2:4", PruneConfig("wanda", n=2, m=4, n_samples=args.calib), calib, windows, ref_top1,
                 fp_ppl)
        run_case(base, "wanda-4:8", PruneConfig("wanda", n=4, m=8, n_samples=args.calib), calib, windows, ref_top1,
                 fp_ppl)
        return
    for s in sparsities:  # the uniform allocation the search starts from, beside the searched one
        run_case(base, f"wanda-{int(s * 100)}", PruneConfig("wanda", s, n_samples=args.calib), calib, windows,
                 ref_top1, fp_ppl)
        cfg = EvoPruneConfig(s, generations=args.generations, offspring=args.offspring, survivors=args.survivors,
                             search_samples=args.search_samples, search_tokens=256, n_samples=args.calib, seed=0)
        run_case(base, f"evopress-{int(s * 100)}", cfg, calib, windows, ref_top1, fp_ppl)


class Prefill(torch.nn.Module):
    def __init__(self, model, last_only: bool):
        super().__init__()
        self.model, self.last_only = model, last_only

    def forward(self, tokens):
        h = self.model.hidden_states(tokens)
        return self.model.lm_head(h[:, -1:] if self.last_only else h)


def part_structured(base, calib, windows, ref_top1, fp_ppl, args) -> None:
    import onnxruntime as ort

    pruned = fresh(base)
    rep = compress(pruned, StructuredPruneConfig("mlp", 0.25, n_samples=args.calib), calib=calib)[0]
    q = quality(pruned.model, windows, ref_top1)
    x = windows[:1, : args.seq]
    with tempfile.TemporaryDirectory() as d:
        for last_only in {"last": (True,), "all": (False,), "both": (True, False)}[args.logits]:
            sessions, parity = {}, {}
            for name, m in (("fp", base.model), ("mlp-25", pruned.model)):
                path = Path(d) / f"{name}-{last_only}.onnx"
                torch.onnx.export(Prefill(m, last_only).eval(), (x,), dynamo=True, input_names=["tokens"],
                                  verbose=False).save(str(path))
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
                with torch.inference_mode():
                    ref = Prefill(m, last_only)(x).numpy()
                parity[name] = float(np.abs(sessions[name].run(None, {"tokens": x.numpy()})[0] - ref).max())
            times = {k: [] for k in sessions}
            for s in sessions.values():
                for _ in range(3):
                    s.run(None, {"tokens": x.numpy()})
            for _ in range(args.reps):
                for k, s in sessions.items():
                    t = time.perf_counter()
                    s.run(None, {"tokens": x.numpy()})
                    times[k].append(time.perf_counter() - t)
            med = {k: float(np.median(v)) for k, v in times.items()}
            emit({"part": "structured", "case": "mlp-25", "logits": "last" if last_only else "all",
                  "seq_len": args.seq, "threads": args.threads, "reps": args.reps,
                  "fp_median_ms": med["fp"] * 1e3, "fp_p90_ms": float(np.percentile(times["fp"], 90) * 1e3),
                  "pruned_median_ms": med["mlp-25"] * 1e3,
                  "pruned_p90_ms": float(np.percentile(times["mlp-25"], 90) * 1e3),
                  "latency_drop": 1 - med["mlp-25"] / med["fp"], "onnx_vs_eager_max_abs": parity,
                  "params_removed": rep.totals["params_removed"], **q, "ppl_ratio_vs_fp": q["perplexity"] / fp_ppl,
                  "windows": windows.shape[0]})


def table() -> None:
    print("\nsmollm2-135m pruning (quality: perplexity over the eval windows, top-1 agreement with fp)")
    print(f"{'case':<16} {'sparsity':>8} {'ppl':>9} {'x fp':>6} {'top1':>6}  kl uniform -> searched")
    for r in ROWS:
        if r["part"] == "quality":
            kl = f"{r['kl_uniform']:.4f} -> {r['kl_searched']:.4f}" if r.get("kl_uniform") is not None else ""
            print(f"{r['case']:<16} {r['sparsity']:>8.3f} {r['perplexity']:>9.2f} {r['ppl_ratio_vs_fp']:>6.2f} "
                  f"{r['top1_agreement']:>6.3f}  {kl}")
        else:
            print(f"structured {r['case']} ({r['logits']} logits, seq {r['seq_len']}, {r['threads']} thr): "
                  f"fp {r['fp_median_ms']:.1f} ms, pruned {r['pruned_median_ms']:.1f} ms, "
                  f"drop {100 * r['latency_drop']:.1f}%, ppl {r['perplexity']:.2f} ({r['ppl_ratio_vs_fp']:.2f}x fp)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["quality", "evo", "structured", "all"], nargs="+", default=["all"])
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--sparsity", type=float, nargs="+", default=[0.3, 0.4, 0.5])
    ap.add_argument("--evo-sparsity", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--calib", type=int, default=8, help="calibration windows (512 tokens) for activation norms")
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--offspring", type=int, default=4)
    ap.add_argument("--survivors", type=int, default=1)
    ap.add_argument("--search-samples", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--logits", choices=["last", "all", "both"], default="last")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    parts = {"quality", "evo", "structured"} if "all" in args.part else set(args.part)
    base = load("smollm2-135m")
    windows = token_windows(base.tokenizer, eval_text(), 512, args.windows)
    calib = calibration_windows(base.tokenizer, max(args.calib, args.search_samples), 512, seed=0)
    with torch.inference_mode():
        ref_top1 = [base.model(windows[i: i + 1]).argmax(-1) for i in range(windows.shape[0])]
    fp = quality(base.model, windows, ref_top1)
    emit({"part": "quality", "case": "fp", "sparsity": 0.0, **fp, "ppl_ratio_vs_fp": 1.0, "compress_s": 0.0,
          "windows": windows.shape[0]})
    if "structured" in parts:
        part_structured(base, calib, windows, ref_top1, fp["perplexity"], args)
    if "quality" in parts:
        part_quality(base, calib, windows, ref_top1, fp["perplexity"], args.sparsity, False, args)
    if "evo" in parts:
        part_quality(base, calib, windows, ref_top1, fp["perplexity"], args.evo_sparsity, True, args)
    table()


if __name__ == "__main__":
    main()
