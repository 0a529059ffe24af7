"""TVM TensorIR codebook GEMV (kernels/tir_codebook.py, llvm schedules) vs its peers, same run.

    nice -n 10 python benchmarks/tvm_kernels.py [--threads 1 2] [--reps 30] [--quick]

Cases (one JSON line each, then a table): 2-bit-class codebook GEMV (vec_len 4, 256 codewords, 8-bit codes,
one stage) on 4096x4096 and every linear shape of smollm2-135m, batch 1: the TIR kernel with the direct
gather-dot schedule and with the LUT-GEMV schedule (`tir_direct`, `tir_lut`), edgetk's eager op
(`torch.ops.edgetk.codebook_gemm`, whatever the kernel table picks: the llvmlite kernel when available) and
PyTorch fp32 `F.linear`. Ratios are peer median / TIR-LUT median. Each thread count runs in its own process
(TVM sizes its thread pool once, from TVM_NUM_THREADS). The machine may be shared: compare ratios, not times.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = [(4096, 4096), (576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in)
DT = dict(x_dtype="float32", codebook_dtype="float16", outlier_dtype="float16", scale_dtype="float16",
          bias_dtype="float16")


def timed(fn, reps: int) -> dict:
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    t.sort()
    return {"median_us": 1e6 * statistics.median(t), "p90_us": 1e6 * t[min(len(t) - 1, int(0.9 * len(t)))]}


def run_shape(out_f: int, in_f: int, reps: int, threads: int) -> dict:
    import numpy as np
    import torch
    import tvm

    from edgetk.kernels import codebook_gemm as cg
    from edgetk.kernels import tir_codebook as tc

    fmt = cg.CodebookFormat(out_f, in_f, 4, 8, 256)
    g = torch.Generator().manual_seed(0)
    codes = cg.pack_codes(torch.randint(0, 256, (1, out_f, fmt.n_vec), generator=g), 8)
    cbs = torch.randn(1, 1, 256, 4, generator=g).half()
    e = torch.zeros(0)
    parts = (codes, cbs, e.long(), e.half(), e.half(), e.half())
    x = torch.randn(1, in_f, generator=g)
    ref = cg.codebook_gemm_reference(x, *parts, in_f, 4, 8).numpy()
    k = tc.shape_from_tensors((1, in_f), tuple(codes.shape), tuple(cbs.shape), 0, (0,), 0, 0, in_f, 4, 8, DT)
    args = [tvm.runtime.tensor(a.numpy()) for a in (x, *parts)]
    res: dict = {"case": "tvm_gemv", "out": out_f, "in": in_f, "threads": threads, "bits_per_weight":
                 fmt.bits_per_weight(), "chosen": tc.choose_algo(k, "llvm")}
    for algo in ("direct", "lut"):
        fn = tc.build(k, {"kind": "llvm"}, algo)["codebook_gemm"]
        y = tvm.runtime.empty((1, out_f), "float32")
        res[f"tir_{algo}"] = timed(lambda: fn(*args, y), reps)
        res[f"tir_{algo}"]["max_abs_err"] = float(np.abs(y.numpy() - ref).max())
    with torch.no_grad():
        res["eager_op"] = timed(lambda: torch.ops.edgetk.codebook_gemm(x, *parts, in_f, 4, 8), reps)
        w = torch.randn(out_f, in_f)
        res["torch_linear_fp32"] = timed(lambda: torch.nn.functional.linear(x, w), reps)
    base = res["tir_lut"]["median_us"]
    res["ratios_vs_tir_lut"] = {p: round(res[p]["median_us"] / base, 3)
                                for p in ("tir_direct", "eager_op", "torch_linear_fp32")}
    return res


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads[0])
    shapes = SHAPES[1:3] if args.quick else SHAPES
    for out_f, in_f in shapes:
        print(json.dumps(run_shape(out_f, in_f, args.reps, args.threads[0])), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    for n in args.threads:
        cmd = [sys.executable, __file__, "--child", "--threads", str(n), "--reps", str(args.reps)]
        cmd += ["--quick"] if args.quick else []
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TVM_NUM_THREADS": str(n)},
                             check=True).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                rows.append(json.loads(line))
    print(f"\n{'shape':>11} {'thr':>3} {'algo':>6} {'tir_lut us':>10} {'tir_direct':>10} {'eager op':>9} "
          f"{'F.linear':>9}")
    for r in rows:
        print(f"{r['out']:>5}x{r['in']:<5} {r['threads']:>3} {r['chosen']:>6} {r['tir_lut']['median_us']:>10.1f} "
              f"{r['tir_direct']['median_us']:>10.1f} {r['eager_op']['median_us']:>9.1f} "
              f"{r['torch_linear_fp32']['median_us']:>9.1f}")


if __name__ == "__main__":
    main()
