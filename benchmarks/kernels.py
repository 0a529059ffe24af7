"""Kernel benchmark: llvmlite codebook GEMV / prefill GEMM and fused kv_attention vs their peers, same run.

    nice -n 10 python benchmarks/kernels.py [--quick] [--mb 256] [--reps 7] [--formats k256,r16]
        [--only gemv,prefill,few,kv]

Cases (one JSON line each, then a table):
* `bandwidth`: the measured read bandwidth (PyTorch fp32 GEMV and a tensor sum cycling >= 512 MB and >= `--mb`;
  the faster).
* `gemv`: 2-bit codebook GEMV on 4096x4096 and every linear shape of smollm2-135m, 1 and 2 threads, in two
  formats of 2 bits per weight (`--formats`): `k256` (vec_len 4, 256 codewords, 8-bit codes: vq2) and `r16`
  (vec_len 4, 2 residual codebooks of 16, 4-bit codes: vq2-r16, whose tables fit one AVX2 `vpshufb` / NEON
  `tbl`), cycling through >= `--mb` MB of distinct weights for every peer (the `bandwidth` line reports the
  last-level cache size: `--mb` should exceed what of it the process can use): edgetk's batch-1 kernel called
  directly (`edgetk` = the fastest this host runs: the int8 LUT of `llvm_codebook_q8` on AVX-512 VBMI / AVX2 /
  NEON hosts, else the int16 LUT of `llvm_codebook_q16` on AVX-512BW, else the float32 `llvm_codebook.gemv`;
  each one this host runs is reported too) and through `torch.ops.edgetk.codebook_gemm` (the custom-op dispatch
  included; the op's default batch-1 kernel: the float32 one, unless EDGETK_LUT names a LUT kernel) and through
  `codebook_gemm.call` (`module`: what an eager `VQLinear` pays per call, the dispatcher skipped, same kernel as
  the op), onnxruntime `com.microsoft.MatMulNBits` bits=2 block 32 accuracy_level=4 (all weights as nodes of one
  graph, time per node), PyTorch fp32 `F.linear`; `reg` = the few-input kernel (`llvm_codebook_few`) on one input, the
  float32 alternative to the gathering gemv. Ratios are peer time / edgetk time; `bw_frac` = achieved GB/s of the
  stored weight bytes / measured read bandwidth.
* `prefill`: 64 tokens, 4096x4096 and every smollm2 shape (`--quick`: 4096x4096 and 576x1536), peers interleaved
  call by call: the op's default prefill path (`edgetk`: "auto", the float32 path `llvm_codebook.prefill_choice`
  picks for the shape, named in brackets) and each float32 path (`lut`: the LUT GEMM; `dense`: dequantize a float32
  tile + oneDNN fp32 matmul; `panel`: each row tile decoded once into L1, tiles of 6 inputs, `llvm_codebook_few`),
  the opt-in int8 path (EDGETK_PREFILL=int8: int8 codewords x int8 activations, `llvm_gemm_i8`, with its SNR and the
  multiply-add it ran: avx2 / avx512bw / vnni512 / dot), and where oneDNN has bf16 the opt-in bf16 path
  (EDGETK_PREFILL=bf16: dequantize to bf16 + bf16 matmul, with its SNR) vs `F.linear` (one weight, compute bound).
* `few`: 2, 5, 8, 12, 16 and 24 inputs (speculative-decoding verify trees, short chunks), smollm2's shapes
  (`--quick`: 576x576 and 576x1536), 1 and 2 threads, all peers interleaved call by call: the op's default (`edgetk`:
  "auto", its choice in brackets: the few-input kernel `llvm_codebook_few` up to its `max_rows` inputs), each path
  (few, panel, lut, dense, int8), the float32 gemv called once per input, and the fp32 model's few-row `F.linear`
  (`few_rows_linear`); `x_before` = the better of lut / dense (what "auto" ran before the few-input kernel) / edgetk.
* `kv_attention`: 4-bit cache (keys/values 4/4, and 5/3 as the kv4 preset stores them), context 2048, one
  query, smollm2 heads (3 KV / 9 query heads, D 64) vs `scaled_dot_product_attention` over an fp32 cache (expanded
  to the query heads, and `gqa`: 3 heads, `enable_gqa=True`), peers interleaved: `hot` (one layer's cache called
  over and over: the fp32 cache stays in the last-level cache) and per layer of a 30-layer decode step (each
  layer its own cache: the fp32 caches come from DRAM); cache bytes vs an fp16 cache.
Timings: median and p90 over `--reps` passes over the weight set (per call). The machine may be shared.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgetk.kernels import codebook_gemm as cg
from edgetk.kernels import few_rows_linear as few_rows
from edgetk.kernels import kv_attention as kva
from edgetk.kernels import kv_attention_fast as kvf
from edgetk.kernels import llvm_codebook as lk
from edgetk.kernels import llvm_codebook_few as lf

SMOLLM2 = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down
SHAPES = [(4096, 4096), *SMOLLM2]
MB = 1 << 20


def stats(times: list[float], cpu: list[float]) -> dict:
    t = sorted(times)
    return {"median_us": 1e6 * statistics.median(t), "p90_us": 1e6 * t[min(len(t) - 1, int(0.9 * len(t)))],
            "cpu_median_us": 1e6 * statistics.median(cpu)}


def timed_cycles(fn, items: list, reps: int) -> dict:
    """Per-item wall time of `fn(item)` over `reps` passes through `items` (after one warm-up pass), plus the
    process CPU time per item (all threads; on a shared machine wall time includes waiting for a core)."""
    for it in items:
        fn(it)
    per, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        for it in items:
            fn(it)
        per.append((time.perf_counter() - t0) / len(items))
        cpu.append((time.process_time() - c0) / len(items))
    return stats(per, cpu)


def llc_bytes() -> int:
    """The largest CPU cache (sysfs; 0 where unknown), reported beside the bandwidth. Hosts with a last-level cache
    of hundreds of MB exist (a 480 MB L3 on one VM; there, cycling 128, 256 or 1024 MB of codes timed the same: the
    VM's share of it is small), so pass `--mb` above it where it could hold the weights."""
    sizes = []
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        t = Path(f).read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
        try:
            sizes.append(int(t.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return max(sizes, default=0)


def bandwidth(threads: int, reps: int, mb: int = 512) -> dict:
    torch.set_num_threads(threads)
    ws = [torch.randn(4096, 4096) for _ in range(max(8, math.ceil(mb / 64)))]  # 64 MB each, >= 512 MB
    x = torch.randn(1, 4096)
    lin = timed_cycles(lambda w: F.linear(x, w), ws, reps)
    sm = timed_cycles(lambda w: w.sum(), ws, reps)
    nbytes = ws[0].numel() * 4
    gbs = max(nbytes / lin["median_us"] / 1e3, nbytes / sm["median_us"] / 1e3)
    n = len(ws)
    del ws
    return {"case": "bandwidth", "threads": threads, "read_GBps": gbs,
            "linear_GBps": nbytes / lin["median_us"] / 1e3, "sum_GBps": nbytes / sm["median_us"] / 1e3,
            "cycled_MB": n * nbytes / MB, "llc_MB": llc_bytes() / MB}


FORMATS = {"k256": (256, 8, 1), "r16": (16, 4, 2)}  # (codebook size, code bits, stages); vec_len 4: 2 bits/weight


def codebook_weights(out: int, inf: int, n: int, seed: int = 0, fmt: str = "k256") -> list[tuple]:
    K, bits, stages = FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    e = torch.empty(0)
    return [(cg.pack_codes(torch.randint(0, K, (stages, out, inf // 4), generator=g), bits),
             torch.randn(stages, 1, K, 4, generator=g).half(), torch.empty(0, dtype=torch.int64), e, e, e)
            for _ in range(n)]


def ort_matmulnbits(out: int, inf: int, n: int, threads: int):
    """One graph of n MatMulNBits (bits 2, block 32, accuracy_level 4) nodes sharing the input."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nb = inf // 32
    inits, nodes, outs = [], [], []
    for i in range(n):
        inits.append(helper.make_tensor(f"B{i}", TensorProto.UINT8, [out, nb, 8],
                                        rng.integers(0, 256, out * nb * 8, dtype=np.uint8).tobytes(), raw=True))
        inits.append(helper.make_tensor(f"S{i}", TensorProto.FLOAT, [out * nb],
                                        (rng.random(out * nb, dtype=np.float32) * 0.01).tobytes(), raw=True))
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B{i}", f"S{i}"], [f"Y{i}"], domain="com.microsoft",
                                      K=inf, N=out, bits=2, block_size=32, accuracy_level=4))
        outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [1, out]))
    graph = helper.make_graph(nodes, "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, inf])],
                              outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    bytes_per = out * nb * 8 + out * nb * 4
    return sess, bytes_per


def gemv_case(out: int, inf: int, threads: int, mb: int, reps: int, bw: float, fmt: str = "k256") -> dict:
    torch.set_num_threads(threads)
    K, bits, stages = FORMATS[fmt]
    code_bytes = out * inf // 4
    n = max(2, math.ceil(mb * MB / code_bytes))
    ws = codebook_weights(out, inf, n, fmt=fmt)
    ps = [lk.pack_weight(*w, inf, 4, bits) for w in ws]
    cf = cg.CodebookFormat(out, inf, code_bits=bits, codebook_size=K, stages=stages)
    stored = cf.storage_bits() / 8
    x = torch.randn(inf)
    x2 = x[None]
    f32 = timed_cycles(lambda p: lk.gemv(p, x), ps, reps)
    reg = timed_cycles(lambda p: lf.gemm(p, x2), ps, reps)
    del ps
    luts = {}  # the batch-1 LUT kernels this host runs, preferred first (the op's default is the first)
    for name in lk.LUT_KERNELS:
        mod = lk.lut_kernel(name)
        if mod.host_ok():
            ps = [mod.pack_weight(*w, inf, 4, bits) for w in ws]
            if ps[0] is None:  # the format is not one this kernel takes
                continue
            luts[name] = timed_cycles(lambda p: mod.gemv(p, x), ps, reps)
            del ps
    kernel = next(iter(luts), "f32")
    ours = luts.get(kernel, f32)
    op = timed_cycles(lambda w: torch.ops.edgetk.codebook_gemm(x2, *w, inf, 4, bits), ws, reps)
    module = timed_cycles(lambda w: cg.call(x2, *w, inf, 4, bits), ws, reps)
    for cache in (lk._CACHE, *lk._CACHE_LUT.values()):
        cache._d.clear()
    n_lin = max(2, math.ceil(mb * MB / (out * inf * 4)))
    lin_w = [torch.randn(out, inf) for _ in range(n_lin)]
    lin = timed_cycles(lambda w: F.linear(x2, w), lin_w, reps)
    del lin_w
    n_ort = min(n, 4000)
    sess, ort_bytes = ort_matmulnbits(out, inf, n_ort, threads)
    feed = {"A": x2.numpy()}
    ort_t = timed_cycles(lambda _: sess.run(None, feed), [0], reps)
    ort_t = {k: v / n_ort for k, v in ort_t.items()}
    used = lk._threads(lk.pack_weight(*ws[0], inf, 4, bits), None)
    del ws
    del sess
    med = ours["median_us"]
    gbs = stored / med / 1e3
    return {"case": "gemv", "format": fmt, "shape": f"{out}x{inf}", "threads": threads, "n_weights": n,
            "cycled_MB": n * code_bytes / MB, "bits_per_weight": cf.bits_per_weight(),
            "kernel": kernel, "threads_used": used,
            "edgetk_us": ours, "edgetk_f32_us": f32, "edgetk_reg_us": reg,
            **{f"edgetk_{k}_us": v for k, v in luts.items()},
            "edgetk_op_us": op, "edgetk_module_us": module, "ort_mnb2_us": ort_t, "ort_nodes": n_ort,
            "ort_cycled_MB": n_ort * ort_bytes / MB, "linear_fp32_us": lin,
            "x_vs_ort": ort_t["median_us"] / med, "x_vs_linear": lin["median_us"] / med,
            "op_x_vs_linear": lin["median_us"] / op["median_us"],
            "module_x_vs_linear": lin["median_us"] / module["median_us"], "GBps": gbs, "bw_frac": gbs / bw,
            "limit_us": stored / bw / 1e3}


def batch_setup(out: int, inf: int, threads: int, tokens: int) -> tuple:
    """(weight parts, packed weight, inputs [tokens, inf], dense weight, reference output) of a k256 layer."""
    torch.set_num_threads(threads)
    w = codebook_weights(out, inf, 1)[0]
    x = torch.randn(tokens, inf)
    wd = cg.dequantize(w[0], w[1], w[2], w[3], w[4], inf, 4, 8)
    return w, lk.pack_weight(*w, inf, 4, 8), x, wd, cg.codebook_gemm_reference(x, *w, inf, 4, 8)


def prefill_case(out: int, inf: int, threads: int, reps: int, tokens: int = 64) -> dict:
    w, p, x, wd, ref = batch_setup(out, inf, threads, tokens)
    snr = lambda y: 10 * math.log10(ref.pow(2).mean().item() / (y - ref).pow(2).mean().item())  # noqa: E731
    dq = lk.dequant_module()
    pf = dq.pack_weight(*w, inf, 4, 8, dtype=torch.float32)
    choice = lk.prefill_choice(p, tokens, n_threads=threads)  # what the default ("auto") runs here
    m8 = lk.int8_module()  # EDGETK_PREFILL=int8
    p8 = m8.pack_weight(*w, inf, 4, 8)
    peers = {"edgetk": lambda: lk.codebook_gemm_llvm(x, *w, inf, 4, 8), "lut": lambda: lk.gemm(p, x),
             "dense": lambda: dq.gemm(pf, x), "panel": lambda: lk.few_module().gemm(p, x, panel=True),
             "linear": lambda: F.linear(x, wd), "int8": lambda: m8.gemm(p8, x)}
    if dq.host_ok():  # EDGETK_PREFILL=bf16 (or "auto" under torch.set_float32_matmul_precision("medium"))
        pd = dq.pack_weight(*w, inf, 4, 8)
        peers["bf16"] = lambda: dq.gemm(pd, x)
    t = interleaved(peers, reps)
    ours, lut, dense, panel, lin, i8 = (t[k] for k in ("edgetk", "lut", "dense", "panel", "linear", "int8"))
    r = {"case": "prefill", "shape": f"{out}x{inf}", "tokens": tokens, "threads": threads, "auto_choice": choice,
         "edgetk_us": ours, "edgetk_lut_us": lut, "edgetk_dense_us": dense, "edgetk_panel_us": panel,
         "linear_fp32_us": lin,
         "x_vs_linear": lin["median_us"] / ours["median_us"], "lut_x_vs_linear": lin["median_us"] / lut["median_us"],
         "dense_x_vs_linear": lin["median_us"] / dense["median_us"],
         "panel_x_vs_linear": lin["median_us"] / panel["median_us"],
         "max_rel_err": ((lk.codebook_gemm_llvm(x, *w, inf, 4, 8) - ref).abs().max() / ref.abs().max()).item()}
    r.update(edgetk_int8_us=i8, int8_x_vs_linear=lin["median_us"] / i8["median_us"], int8_snr_db=snr(m8.gemm(p8, x)),
             int8_isa=m8.host_isa())
    if "bf16" in t:
        r.update(edgetk_bf16_us=t["bf16"], bf16_x_vs_linear=lin["median_us"] / t["bf16"]["median_us"],
                 bf16_snr_db=snr(dq.gemm(pd, x)))
    return r


def few_case(out: int, inf: int, threads: int, reps: int, rows: int) -> dict:
    """2..24 inputs (a speculative-decoding verify tree, a short chunk): the op's default ("auto") vs each path."""
    w, p, x, wd, ref = batch_setup(out, inf, threads, rows)
    choice = lk.prefill_choice(p, rows, n_threads=threads)
    peers = {"edgetk": lambda: lk.codebook_gemm_llvm(x, *w, inf, 4, 8), "few": lambda: lf.gemm(p, x),
             "panel": lambda: lf.gemm(p, x, panel=True), "lut": lambda: lk.gemm(p, x),
             "dense": lambda: lk.codebook_gemm_llvm(x, *w, inf, 4, 8, prefill="dense"),
             "int8": lambda: lk.codebook_gemm_llvm(x, *w, inf, 4, 8, prefill="int8"),
             "gemv_rows": lambda: [lk.gemv(p, x[i]) for i in range(rows)],
             "linear_fp32": lambda: few_rows.few_rows_linear(x, wd)}
    t = interleaved(peers, reps)
    return {"case": "few", "shape": f"{out}x{inf}", "rows": rows, "threads": threads, "auto_choice": choice,
            **{f"{k}_us": v for k, v in t.items()},
            "x_vs_before": min(t["lut"]["median_us"], t["dense"]["median_us"]) / t["edgetk"]["median_us"],
            "x_vs_linear": t["linear_fp32"]["median_us"] / t["edgetk"]["median_us"],
            "max_rel_err": ((lk.codebook_gemm_llvm(x, *w, inf, 4, 8) - ref).abs().max() / ref.abs().max()).item()}


def interleaved(fns: dict, reps: int, runs: int = 1) -> dict:
    """Median / p90 per peer, the peers called in a fresh random order each pass (drift hits all alike). runs > 1:
    each turn is one untimed call, then `runs` timed back to back (per call: what the peer costs with its data as
    hot in the caches as the call itself leaves it)."""
    import random

    times, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(max(reps, 3) * 5):
        for k in random.sample(list(fns), len(fns)):
            if runs > 1:
                fns[k]()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(runs):
                fns[k]()
            times[k].append((time.perf_counter() - t0) / runs)
            cpu[k].append((time.process_time() - c0) / runs)
    return {k: stats(v, cpu[k]) for k, v in times.items()}


def kv_case(threads: int, reps: int, ctx: int = 2048, kbits: int = 4, vbits: int = 4, layers: int = 30) -> dict:
    """One decode step's attention, two ways, each group's peers interleaved: `hot`, one layer's cache called over
    and over (5 calls a turn after an untimed one: the fp32 cache, 9.4 MB expanded to the query heads, stays in the
    last-level cache as far as it fits: the hardest case for a kernel that trades reads for decoding work), and
    `layers`, a step through `layers` distinct layers' caches as a decoder runs them (smollm2 has 30; the fp32
    caches, 283 MB expanded / 94 MB as 3 KV heads, come from DRAM; the 4-bit ones, 13 MB, may stay cached -- the
    point of compressing them)."""
    torch.set_num_threads(threads)
    H, Hq, D, fp_cap = 3, 9, 64, 32
    g = torch.Generator().manual_seed(0)
    n_fp = 16
    n_q = ctx - n_fp
    q = torch.randn(1, Hq, 1, D, generator=g)
    lev = torch.linspace(-1, 1, 1 << max(kbits, vbits)).repeat(2, 1)
    ang = torch.arange(ctx)[:, None].float() / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.cat([ang, ang], 1)
    cos, sin, e, mask = ang.cos(), ang.sin(), torch.empty(0).half(), torch.ones(1, ctx, dtype=torch.bool)

    def quantized():  # one layer's 4-bit cache (random codes and statistics)
        kc = torch.randint(0, 256, (1, H, ctx, D * kbits // 8), generator=g, dtype=torch.uint8)
        vc = torch.randint(0, 256, (1, H, ctx, D * vbits // 8), generator=g, dtype=torch.uint8)
        km = (torch.rand(1, H, 1, 2, D, generator=g) + 0.1).half()
        vm = (torch.rand(1, H, ctx, 2, 1, generator=g) + 0.1).half()
        fp = torch.randn(2, 1, H, fp_cap, D, generator=g).half()
        return (q, kc, km, vc, vm, lev, fp, torch.empty(0, dtype=torch.int32), e, e, e, cos, sin, mask, n_q, n_fp,
                16, 64, kbits, vbits)

    quant = [quantized() for _ in range(layers)]
    args = quant[0]
    err = (kvf.kv_attention_llvm(*args) - kva.kv_attention_reference(*args)).abs().max().item()
    full = [(torch.randn(1, Hq, ctx, D, generator=g), torch.randn(1, Hq, ctx, D, generator=g)) for _ in range(layers)]
    gqa = [(k[:, ::3].clone(), v[:, ::3].clone()) for k, v in full]  # 3 KV heads, as the model stores them
    sdpa = F.scaled_dot_product_attention
    hot = interleaved({"edgetk": lambda: kvf.kv_attention_llvm(*args), "sdpa": lambda: sdpa(q, *full[0]),
                       "sdpa_gqa": lambda: sdpa(q, *gqa[0], enable_gqa=True)}, reps, runs=5)
    step = interleaved({"edgetk": lambda: [kvf.kv_attention_llvm(*a) for a in quant],
                        "sdpa": lambda: [sdpa(q, k, v) for k, v in full],
                        "sdpa_gqa": lambda: [sdpa(q, k, v, enable_gqa=True) for k, v in gqa]}, max(1, reps // 2))
    step = {k: {f: x / layers for f, x in v.items()} for k, v in step.items()}  # per layer
    cache = sum(t.numel() * t.element_size() for t in (args[1], args[2], args[3], args[4], args[6]))
    fp16 = 2 * H * ctx * D * 2
    ratio = lambda t, k: t[k]["median_us"] / t["edgetk"]["median_us"]  # noqa: E731
    return {"case": "kv_attention", "bits": (kbits + vbits) / 2, "key_bits": kbits, "value_bits": vbits,
            "context": ctx, "threads": threads, "layers": layers, "edgetk_us": hot["edgetk"],
            "sdpa_fp32_us": hot["sdpa"], "sdpa_fp32_gqa_us": hot["sdpa_gqa"], "x_vs_sdpa": ratio(hot, "sdpa"),
            "x_vs_sdpa_gqa": ratio(hot, "sdpa_gqa"), "layers_edgetk_us": step["edgetk"],
            "layers_sdpa_fp32_us": step["sdpa"], "layers_sdpa_fp32_gqa_us": step["sdpa_gqa"],
            "layers_x_vs_sdpa": ratio(step, "sdpa"), "layers_x_vs_sdpa_gqa": ratio(step, "sdpa_gqa"),
            "cache_bytes": cache, "fp16_cache_bytes": fp16, "mem_x_vs_fp16": fp16 / cache,
            "max_abs_err_vs_reference": err}


def row(r: dict) -> str:
    c = r["case"]
    if c == "bandwidth":
        return f"bandwidth  t={r['threads']}  {r['read_GBps']:.1f} GB/s"
    med = r["edgetk_us"]["median_us"]
    if c == "gemv":
        return (f"gemv {r['format']:>4} {r['shape']:>9} t={r['threads']}  edgetk {med:8.1f} us "
                f"[{r['kernel']}] (p90 {r['edgetk_us']['p90_us']:.1f}, "
                + "".join(f"{k} {r[f'edgetk_{k}_us']['median_us']:.1f}, " for k in ("q16", "f32", "reg")
                          if f"edgetk_{k}_us" in r and k != r["kernel"])
                + f"op {r['edgetk_op_us']['median_us']:.1f}, module {r['edgetk_module_us']['median_us']:.1f})  "
                f"ort {r['ort_mnb2_us']['median_us']:8.1f}  "
                f"linear {r['linear_fp32_us']['median_us']:8.1f}  x_ort {r['x_vs_ort']:.2f}  "
                f"x_lin {r['x_vs_linear']:.2f}  {r['GBps']:.2f} GB/s = {100 * r['bw_frac']:.0f}% of limit")
    if c == "prefill":
        bf = (f"  bf16 {r['edgetk_bf16_us']['median_us']:9.1f} us x_lin {r['bf16_x_vs_linear']:.2f} "
              f"({r['bf16_snr_db']:.0f} dB)" if "edgetk_bf16_us" in r else "")
        i8 = (f"  int8 {r['edgetk_int8_us']['median_us']:9.1f} us x_lin {r['int8_x_vs_linear']:.2f} "
              f"({r['int8_snr_db']:.0f} dB, {r['int8_isa']})")
        return (f"prefill {r['shape']:>9} t={r['threads']}  edgetk {med:9.1f} us [{r['auto_choice']}] "
                f"(lut {r['edgetk_lut_us']['median_us']:.1f}, dense {r['edgetk_dense_us']['median_us']:.1f}, "
                f"panel {r['edgetk_panel_us']['median_us']:.1f})  "
                f"linear {r['linear_fp32_us']['median_us']:9.1f} us  x_lin {r['x_vs_linear']:.2f} "
                f"(lut {r['lut_x_vs_linear']:.2f}, dense {r['dense_x_vs_linear']:.2f}, "
                f"panel {r['panel_x_vs_linear']:.2f})" + i8 + bf)
    if c == "few":
        us = lambda k: r[f"{k}_us"]["median_us"]  # noqa: E731
        return (f"few {r['shape']:>9} rows={r['rows']:>2} t={r['threads']}  edgetk {med:7.1f} us [{r['auto_choice']}] "
                f"(few {us('few'):.1f}, panel {us('panel'):.1f}, lut {us('lut'):.1f}, dense {us('dense'):.1f}, "
                f"int8 {us('int8'):.1f}, "
                f"gemv x rows {us('gemv_rows'):.1f})  linear {us('linear_fp32'):7.1f}  "
                f"x_before {r['x_vs_before']:.2f}  x_lin {r['x_vs_linear']:.2f}")
    us = lambda k: r[k]["median_us"]  # noqa: E731
    return (f"kv_attention K{r['key_bits']}V{r['value_bits']} ctx={r['context']} t={r['threads']}  hot: "
            f"edgetk {med:.1f} us  sdpa {us('sdpa_fp32_us'):.1f} (gqa {us('sdpa_fp32_gqa_us'):.1f})  "
            f"x_sdpa {r['x_vs_sdpa']:.2f} (gqa {r['x_vs_sdpa_gqa']:.2f})  |  {r['layers']} layers, per layer: "
            f"edgetk {us('layers_edgetk_us'):.1f} us  sdpa {us('layers_sdpa_fp32_us'):.1f} "
            f"(gqa {us('layers_sdpa_fp32_gqa_us'):.1f})  x_sdpa {r['layers_x_vs_sdpa']:.2f} "
            f"(gqa {r['layers_x_vs_sdpa_gqa']:.2f})  |  mem x{r['mem_x_vs_fp16']:.2f} vs fp16")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="MB of distinct weights each GEMV peer cycles through")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="4096x4096 and one smollm2 shape only")
    ap.add_argument("--formats", default="k256,r16", help=f"gemv formats, among {sorted(FORMATS)}")
    ap.add_argument("--only", default="gemv,prefill,few,kv", help="case groups to run (gemv, prefill, few, kv)")
    args = ap.parse_args(argv)
    results = []
    bw = {t: bandwidth(t, args.reps, args.mb) for t in (1, 2)}
    results += list(bw.values())
    shapes = SHAPES[:2] if args.quick else SHAPES
    formats = [f for f in args.formats.split(",") if f]
    only = set(args.only.split(","))
    bad = [f for f in formats if f not in FORMATS] + sorted(only - {"gemv", "prefill", "few", "kv"})
    if bad:
        ap.error(f"unknown format or case group {bad}: formats {sorted(FORMATS)}, groups gemv, prefill, few, kv")
    for fmt in formats if "gemv" in only else ():
        for out, inf in shapes:
            for t in (1, 2):
                results.append(gemv_case(out, inf, t, args.mb, args.reps, bw[t]["read_GBps"], fmt))
                print(json.dumps(results[-1]), flush=True)
    for out, inf in ([(4096, 4096), (576, 1536)] if args.quick else SHAPES) if "prefill" in only else ():
        for t in (1, 2):
            results.append(prefill_case(out, inf, t, args.reps))
            print(json.dumps(results[-1]), flush=True)
    for out, inf in ([(576, 576), (576, 1536)] if args.quick else SMOLLM2) if "few" in only else ():
        for rows in (2, 5, 8, 12, 16, 24):
            for t in (1, 2):
                results.append(few_case(out, inf, t, args.reps, rows))
                print(json.dumps(results[-1]), flush=True)
    for kb, vb in ((4, 4), (5, 3)) if "kv" in only else ():  # 5/3: the kv4 preset's widths (codes straddle bytes)
        for t in (1, 2):
            results.append(kv_case(t, args.reps, kbits=kb, vbits=vb))
            print(json.dumps(results[-1]), flush=True)
    for r in bw.values():
        print(json.dumps(r))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"case": "process", "peak_rss_MB": rss}))
    print("\n" + "\n".join(row(r) for r in results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
