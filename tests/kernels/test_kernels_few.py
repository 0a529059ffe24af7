"""The few-input codebook GEMM (llvm_codebook_few: speculative-decoding verify trees, short chunks) against the
plain-PyTorch reference, and its routing."""
from __future__ import annotations

import re

import pytest
import torch

from edgetk.kernels import aarch64_check as ac
from edgetk.kernels import codebook_gemm as cg
from edgetk.kernels import llvm_codebook as lk
from edgetk.kernels import llvm_codebook_few as few
from edgetk.kernels import llvm_common as lc

from test_kernels_llvm_codebook import SHAPES, check, make_weight


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("rows,threads", [(1, 1), (2, 3), (5, 1), (8, 2), (9, 3), (17, 2)])
def test_few_matches_reference(shape, rows, threads):
    """Every format (vec_len 2-5, 200-4096 codewords, 8/16-bit codes, residual stages, output groups with rows not a
    multiple of the row tile, outliers + permutation, scale, bias) x 1 / 2-8 inputs (one tile) / 9 and 17 (2 and 3
    tiles, padded) x 1-3 threads: the reference up to summation order."""
    out, inf, v, K, bits, *_ = SHAPES[shape]
    w = make_weight(*SHAPES[shape], seed=rows)
    x = torch.randn(rows, inf)
    p = lk.pack_weight(*w, inf, v, bits)
    check(few.gemm(p, x, threads), cg.codebook_gemm_reference(x, *w, inf, v, bits))


@pytest.mark.parametrize("regs", [16, 32])
@pytest.mark.parametrize("shape,rows,panel", [("groups", 5, False), ("residual", 8, False), ("odd", 13, True),
                                              ("bits5", 7, True)])
def test_row_unroll_of_either_register_file_matches_reference(shape, rows, panel, regs):
    """The row unroll for AVX2's 16 vector registers and for AVX-512's / NEON's 32 (4 rows up to 6 inputs, else 2),
    both built on this host whatever it has: the reference up to summation order."""
    out, inf, v, K, bits, *_ = SHAPES[shape]
    w = make_weight(*SHAPES[shape], seed=rows + 2)
    x = torch.randn(rows, inf)
    p = lk.pack_weight(*w, inf, v, bits)
    check(few.gemm(p, x, 2, panel=panel, regs=regs), cg.codebook_gemm_reference(x, *w, inf, v, bits))


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("rows,threads", [(1, 1), (7, 3), (13, 2), (64, 1)])
def test_panel_matches_reference(shape, rows, threads):
    """The panel GEMM (each row tile decoded once into the thread's scratch, tiles of PANEL_TT inputs, PANEL_UNROLL
    column steps and the remainder): every format x 1 / 7 / 13 / 64 inputs x 1-3 threads, the reference up to
    summation order."""
    out, inf, v, K, bits, *_ = SHAPES[shape]
    w = make_weight(*SHAPES[shape], seed=rows + 1)
    x = torch.randn(rows, inf)
    p = lk.pack_weight(*w, inf, v, bits)
    check(few.gemm(p, x, threads, panel=True), cg.codebook_gemm_reference(x, *w, inf, v, bits))


def test_panel_cost_model_routes_layers_with_few_rows_there(monkeypatch):
    """Past max_rows, "auto" takes the panel GEMM for a smollm2-sized layer (576 x 576, 64 tokens) and the LUT GEMM
    for a 4096 x 4096 one (its LUT serves 4096 rows); the explicit mode "panel" runs it for any count."""
    monkeypatch.delenv("EDGETK_PREFILL", raising=False)
    g = torch.Generator().manual_seed(0)
    parts = {}
    for out, inf in ((576, 576), (4096, 4096)):
        codes = torch.randint(0, 256, (1, out, inf // 4), generator=g, dtype=torch.uint8)
        cb = torch.randn(1, 1, 256, 4, generator=g).half()
        e = torch.empty(0)
        parts[out] = (codes, cb, torch.empty(0, dtype=torch.int64), e, e, e)
    small, big = (lk.pack_weight(*parts[o], o, 4, 8) for o in (576, 4096))
    for nt in (1, 2):
        assert lk.prefill_choice(small, 64, n_threads=nt) == "panel"
        assert lk.prefill_choice(big, 64, n_threads=nt) == "lut"
    assert lk.prefill_choice(big, 64, "panel") == "panel" and lk.prefill_choice(small, 3, "panel") == "panel"
    x = torch.randn(2, 20, 576, generator=g)
    monkeypatch.setenv("EDGETK_PREFILL", "panel")
    y = lk.codebook_gemm_llvm(x, *parts[576], 576, 4, 8)
    assert y.shape == (2, 20, 576) and torch.equal(y, few.gemm(small, x.reshape(40, 576), panel=True).view(2, 20, 576))
    check(y, cg.codebook_gemm_reference(x, *parts[576], 576, 4, 8))


def test_tiles_and_codes_per_vector():
    """Inputs cut into equal tiles of at most TT_MAX; P codes per SIMD vector only where no column block has a
    remainder (P divides JB and n_vec), else one."""
    assert few.tiles(1) == (1, 1) and few.tiles(few.TT_MAX) == (1, few.TT_MAX)
    assert few.tiles(few.TT_MAX + 1) == (2, (few.TT_MAX + 2) // 2) and few.tiles(17) == (3, 6)
    spec = lk.make_spec(4, 256, 1, 64, False, vector_bits=256)
    assert few.codes_per_vector(spec, 144, 8) == 2 and few.codes_per_vector(spec, 143, 8) == 1
    assert few.codes_per_vector(spec, 144, 16) == 4 and few.codes_per_vector(spec, 144, 4) == 1
    spec2 = lk.make_spec(2, 64, 1, 64, False, vector_bits=256)
    assert few.codes_per_vector(spec2, 288, 8) == 4
    spec3 = lk.make_spec(3, 512, 1, 64, False, vector_bits=256)
    assert few.codes_per_vector(spec3, 192, 8) == 2  # <6 x float> vectors: still one load per code


def test_auto_routes_few_inputs_here_and_more_to_the_gemms(monkeypatch):
    """EDGETK_PREFILL unset: 2..max_rows inputs (12, any thread count) run this kernel (any leading shape),
    more go to the panel / LUT / dense GEMM; explicit modes keep their path; EDGETK_PREFILL=few runs it for any
    count."""
    monkeypatch.delenv("EDGETK_PREFILL", raising=False)
    out, inf, v, K, bits, *_ = SHAPES["outliers_perm"]
    w = make_weight(*SHAPES["outliers_perm"])
    p = lk.pack_weight(*w, inf, v, bits)
    assert few.max_rows(1) == few.max_rows(2) == few.max_rows(8) == few.MAX_ROWS == 12
    for nt in (1, 2):
        n = few.max_rows(nt)
        assert lk.prefill_choice(p, 2, n_threads=nt) == "few" and lk.prefill_choice(p, n, n_threads=nt) == "few"
        assert lk.prefill_choice(p, n + 1, n_threads=nt) in ("panel", "lut", "dense")
    assert lk.prefill_choice(p, 5, "lut") == "lut" and lk.prefill_choice(p, 64, "few") == "few"
    x = torch.randn(3, 4, inf)  # 12 inputs
    y = lk.codebook_gemm_llvm(x, *w, inf, v, bits)
    assert y.shape == (3, 4, out) and y.is_contiguous()
    assert torch.equal(y, few.gemm(p, x.reshape(12, inf)).view(3, 4, out))
    assert not torch.equal(y, lk.codebook_gemm_llvm(x, *w, inf, v, bits, prefill="lut"))  # another summation order
    check(y, cg.codebook_gemm_reference(x, *w, inf, v, bits))
    monkeypatch.setenv("EDGETK_PREFILL", "few")
    x = torch.randn(40, inf)
    assert torch.equal(lk.codebook_gemm_llvm(x, *w, inf, v, bits), few.gemm(p, x))
    check(few.gemm(p, x), cg.codebook_gemm_reference(x, *w, inf, v, bits))


def test_non_finite_inputs_stay_in_their_row():
    """A NaN / Inf in one input makes that input's outputs non-finite and leaves the others' as they were (the
    LLM runtime's finite-logits check relies on the first); no inputs, no outputs."""
    out, inf, v, K, bits, *_ = SHAPES["square"]
    w = make_weight(*SHAPES["square"])
    p = lk.pack_weight(*w, inf, v, bits)
    x = torch.randn(5, inf)
    assert few.gemm(p, x[:0]).shape == (0, out)
    clean = few.gemm(p, x)
    x[1, 7], x[3, 0] = float("nan"), float("inf")
    y = few.gemm(p, x)
    assert not y[1].isfinite().any() and not y[3].isfinite().all()
    assert torch.equal(y[[0, 2, 4]], clean[[0, 2, 4]])


def test_large_layer_two_threads_matches_reference():
    """A 576x1536 layer (smollm2's down projection) with 5 and 12 inputs on two threads."""
    w = make_weight(576, 1536, 4, 256, 8, 1, 1, 0, True, False)
    p = lk.pack_weight(*w, 1536, 4, 8)
    for rows in (5, 12):
        x = torch.randn(rows, 1536)
        check(few.gemm(p, x, 2), cg.codebook_gemm_reference(x, *w, 1536, 4, 8))


@pytest.mark.parametrize("regs", [16, 32])
def test_kernel_keeps_the_accumulators_in_registers(regs):
    """The inner loop of the host object (x86 AVX2 / AVX-512): per code pair, TT (here 5) FMAs per row,
    accumulating in registers -- no store inside the loop (no accumulator spills), with the rows `row_unroll` takes
    for 16 vector registers (AVX2) and for 32 (AVX-512 and NEON: twice the rows, where the host has them)."""
    if not (lc.llvm.get_process_triple().startswith("x86_64") and lc.host_vector_bits() >= 256):
        pytest.skip("x86 AVX2 / AVX-512 host only (the aarch64 object is checked under qemu)")
    if regs > few.vector_regs():
        pytest.skip("an AVX-512 host only (32 vector registers)")
    spec = lk.make_spec(4, 256, 1, 576, False)
    lines = lc.emit_assembly(few.build_module(spec, few.codes_per_vector(spec, 144, lc.host_vector_bits() // 32),
                                              5, regs=regs)).splitlines()
    first = next(i for i, ln in enumerate(lines) if "vfmadd" in ln)
    start = max(i for i in range(first) if re.match(r"^\.LBB\d+_\d+:", lines[i]))
    end = next(i for i in range(first, len(lines)) if re.match(r"^\s+j\w+\s", lines[i]))
    body = lines[start:end]
    fmas = [ln for ln in body if "vfmadd231ps" in ln]
    assert len(fmas) == 5 * few.row_unroll(spec, 5, regs)  # each x load serves the row_unroll rows
    assert not [ln for ln in body if re.search(r"vmov\w*\s+%[xyz]mm\d+, .*\(", ln)]


@pytest.mark.skipif(not ac.tools_available(), reason="needs gcc-aarch64-linux-gnu and qemu-user")
@pytest.mark.parametrize("shape,rows,threads", [("groups", 13, 2), ("residual", 7, 1), ("odd", 20, 3), ("bits5", 6, 2)])
def test_aarch64_panel_under_qemu(tmp_path, shape, rows, threads):
    """The panel GEMM's aarch64 object (NEON: 4 rows x PANEL_TT inputs, each thread's row tile decoded into its
    scratch) under qemu-aarch64: the reference up to summation order."""
    out, inf, v, K, bits, *_ = SHAPES[shape]
    w = make_weight(*SHAPES[shape], seed=3)
    p = lk.pack_weight(*w, inf, v, bits, vector_bits=ac.NEON_BITS)
    P = few.codes_per_vector(p.spec, p.n_vec, ac.NEON_BITS // 32)
    exe = ac.build_few(p.spec, P, few.PANEL_TT, tmp_path, panel=True)
    x = torch.randn(rows, inf)
    y = ac.run_few(exe, p, x, threads, tmp_path, few.PANEL_TT, panel=True)
    check(y, cg.codebook_gemm_reference(x, *w, inf, v, bits))


@pytest.mark.skipif(not ac.tools_available(), reason="needs gcc-aarch64-linux-gnu and qemu-user")
@pytest.mark.parametrize("shape,rows,TT,threads", [("groups", 5, 5, 2), ("residual", 3, 4, 1), ("bits12", 2, 2, 2),
                                                   ("odd", 7, 4, 3), ("square", 1, 1, 1)])
def test_aarch64_few_under_qemu(tmp_path, shape, rows, TT, threads):
    """The aarch64 object (4-lane NEON: P = 1 for vec_len 4, 2 for vec_len 2), cross-compiled, linked and run under
    qemu-aarch64: the reference up to summation order (formats without outliers: those are added in torch)."""
    out, inf, v, K, bits, *_ = SHAPES[shape]
    w = make_weight(*SHAPES[shape])
    p = lk.pack_weight(*w, inf, v, bits, vector_bits=ac.NEON_BITS)
    P = few.codes_per_vector(p.spec, p.n_vec, ac.NEON_BITS // 32)
    exe = ac.build_few(p.spec, P, TT, tmp_path)
    x = torch.randn(rows, inf)
    check(ac.run_few(exe, p, x, threads, tmp_path, TT), cg.codebook_gemm_reference(x, *w, inf, v, bits))
