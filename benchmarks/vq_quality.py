"""VQ quality benchmark: perplexity and bits per weight of VQ presets beside the RTN 2-bit baselines and fp.

    nice -n 10 python benchmarks/vq_quality.py --recipes rtn2-g64,rtn2-g32,vq2,vq3 [--max-windows 40]
        [--samples N] [--out-dir /tmp/vq_artifacts] [--results results.jsonl] [--set e2e_embed=true ...]

One JSON line per case on stdout (also appended to --results as each case finishes), then a table.
Perplexity: Lee news evaluation text, non-overlapping 512-token windows, every prediction scored ("all");
the fp reference is measured in the same run on the same windows. Calibration: Wikipedia text only.
Bits per weight count everything stored (codes, codebooks, scales, outliers); `bpw_model` includes the
embeddings/head (kept in fp32). Wall time and process CPU time of the quantization are both reported: the
machine may be shared, so CPU seconds / threads is the better guide to an idle machine's wall time.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch


class _LogRenderer:
    """Progress to stderr with timestamps (blocks, the format bank's blocks, and every tenth of the format search's
    generations and of the end-to-end steps: the log stays short)."""

    def __init__(self):
        self.t0 = time.time()

    def start(self, description, total):
        return [description, total, 0]

    def advance(self, handle, n=1):
        handle[2] += n
        name, total, done = handle
        tenth = total and done % max(1, total // 10) == 0
        if (name in ("vq blocks", "format bank") or (name.startswith("rtn") and done == total)
                or (name.startswith(("vq fine-tune", "vq format search")) and tenth)):
            print(f"[{time.time() - self.t0:7.0f}s] {name} {done}/{total}", file=sys.stderr, flush=True)

    def stop(self, handle):
        pass


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_case(recipe: str, windows, fp_ppl: float, args) -> dict:
    from edgetk.compress import compress, windows_to_draw, with_settings
    from edgetk.compressed import save
    from edgetk.eval import perplexity
    from edgetk.models import load

    lm = load(args.model)
    configs = with_settings(recipe, args.set)
    n_samples = windows_to_draw(configs, args.samples)  # 0: the recipe draws none
    t0, c0 = time.perf_counter(), _cpu()
    reports = compress(lm, configs, n_samples=n_samples, seq_len=512, seed=args.seed)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    totals = {}
    for r in reports:
        totals.update(r.totals)
    name = recipe + "".join(f" {kv}" for kv in args.set)
    case = {"case": name, "model": args.model, "bpw": totals.get("bits_per_weight"),
            "bpw_model": totals.get("bits_per_weight_model"), "quant_wall_s": round(wall, 1),
            "quant_cpu_s": round(cpu, 1), "threads": torch.get_num_threads(),
            "calib_windows": n_samples}
    if args.out_dir:
        art = save(lm, Path(args.out_dir) / name.replace(" ", "_"), reports, recipe=name)
        disk = art.manifest["files"]["model.safetensors"]["bytes"]
        case["safetensors_bytes"] = disk
        case["size_vs_accounting"] = disk / (totals["bits_per_weight_model"] * totals["params"] / 8)
        lm = load(Path(args.out_dir) / name.replace(" ", "_"))  # evaluate what was saved
    ppl = perplexity(lm.model, windows)
    case.update({"perplexity": ppl.perplexity, "windows": ppl.windows, "scoring": ppl.scoring,
                 "fp_perplexity": fp_ppl, "ratio_to_fp": ppl.perplexity / fp_ppl})
    stages = {}
    for r in reports:
        for s in r.stages:
            if "before" not in s or "after" not in s:
                continue
            a = stages.setdefault(s["stage"], [0.0, 0.0])
            a[0] += s["before"]
            a[1] += s["after"]
    if "format_search" in totals:
        fs = totals["format_search"]
        case["format_search"] = {k: fs[k] for k in ("kl_start", "kl_searched", "bits_per_weight_start",
                                                     "bits_per_weight_searched", "alt_per_layer", "alt_per_format",
                                                     "alt_units")}
    case["stage_loss_after_over_before"] = {k: round(b / a, 4) if a else None for k, (a, b) in stages.items()}
    e2e = [s for r in reports for s in r.stages if s.get("stage") == "model.e2e"]
    if e2e:  # the distillation's held-out KL, and what it moved
        case["e2e"] = {k: e2e[-1].get(k) for k in ("before", "after", "kept", "codes_changed", "precision",
                                                    "held_out_windows", "train_kl")}
        case["e2e"]["windows"] = totals.get("calibration", {}).get("e2e_windows")
    return case


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", default="rtn2-g64,rtn2-g32,vq2,vq2-res,vq3")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--samples", type=int, default=None,
                    help="calibration windows of 512 tokens drawn (default: 128, or more if the recipe reads more)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=None, help="save each artifact here (and evaluate the reloaded one)")
    ap.add_argument("--results", default=None, help="append each JSON line to this file as it finishes")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a config field (JSON value) in every case's recipe, e.g. --set e2e_embed=true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from edgetk.data import eval_text, token_windows
    from edgetk.eval import perplexity
    from edgetk.models import load
    from edgetk.progress import use_renderer

    ref = load(args.model)
    windows = token_windows(ref.tokenizer, eval_text(), 512, args.max_windows)
    cases = []
    with use_renderer(_LogRenderer()):
        fp = perplexity(ref.model, windows)
        cases.append({"case": "fp32", "model": args.model, "bpw": 32.0, "bpw_model": 32.0,
                      "perplexity": fp.perplexity, "windows": fp.windows, "scoring": fp.scoring,
                      "fp_perplexity": fp.perplexity, "ratio_to_fp": 1.0})
        _emit(cases[-1], args)
        del ref
        for recipe in [r for r in args.recipes.split(",") if r]:
            cases.append(run_case(recipe, windows, fp.perplexity, args))
            _emit(cases[-1], args)
    _table(cases)
    return 0


def _emit(case: dict, args) -> None:
    line = json.dumps(case, sort_keys=True)
    print(line, flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(line + "\n")


def _table(cases: list[dict]) -> None:
    rtn = [c for c in cases if c["case"].startswith("rtn2")]
    best_rtn = min((c["perplexity"] for c in rtn), default=None)
    cols = ["case", "bpw", "bpw_model", "perplexity", "ratio_to_fp", "vs best rtn2", "quant_wall_s", "quant_cpu_s"]
    print(" | ".join(cols))
    for c in cases:
        vs = c["perplexity"] / best_rtn if best_rtn else None
        row = [c.get("case"), c.get("bpw"), c.get("bpw_model"), c.get("perplexity"), c.get("ratio_to_fp"), vs,
               c.get("quant_wall_s"), c.get("quant_cpu_s")]
        print(" | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))


if __name__ == "__main__":
    sys.exit(main())
