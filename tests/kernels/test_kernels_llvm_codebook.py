"""The llvmlite codebook_gemm kernels (gemv, prefill gemm) against the plain-PyTorch reference."""
from __future__ import annotations

import math

import pytest
import torch

from edgetk.kernels import codebook_gemm as cg
from edgetk.kernels import llvm_codebook as lk
from edgetk.kernels import llvm_codebook_q8 as q8
from edgetk.kernels import llvm_codebook_q16 as q16
from edgetk.kernels import llvm_common as lc
from edgetk.errors import ConfigError
from edgetk.kernels import table

# (out, in, vec_len, K, code_bits, stages, groups, n_outliers, scale, bias)
SHAPES = {
    "square": (64, 64, 4, 256, 8, 1, 1, 0, False, False),
    "tall": (160, 32, 4, 256, 8, 1, 1, 0, False, False),
    "wide": (24, 200, 4, 256, 8, 1, 1, 0, True, False),
    "odd": (37, 53, 3, 200, 8, 1, 1, 0, False, True),
    "outliers_perm": (48, 70, 4, 256, 8, 1, 1, 6, True, True),
    "residual": (32, 64, 4, 256, 8, 2, 1, 0, False, False),
    "groups": (96, 40, 2, 64, 6, 1, 4, 0, True, True),
    "groups_odd_rows": (36, 40, 4, 256, 8, 2, 3, 3, True, True),
    "bits12": (40, 64, 4, 4096, 12, 1, 1, 0, False, False),
    "bits16": (32, 48, 2, 3000, 16, 1, 1, 0, True, False),
    "bits5": (20, 30, 5, 32, 5, 1, 1, 0, False, False),
}


def make_weight(out, inf, v, K, bits, stages, groups, n_out, has_scale, has_bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_vec = math.ceil((inf - n_out) / v)
    codes = cg.pack_codes(torch.randint(0, K, (stages, out, n_vec), generator=g), bits)
    cb = torch.randn(stages, groups, K, v, generator=g).half()
    perm = torch.randperm(inf, generator=g) if n_out else torch.empty(0, dtype=torch.int64)
    ow = torch.randn(out, n_out, generator=g).half() if n_out else torch.empty(0)
    scale = torch.rand(out, generator=g) + 0.5 if has_scale else torch.empty(0)
    bias = torch.randn(out, generator=g) if has_bias else torch.empty(0)
    return codes, cb, perm, ow, scale, bias


def check(y, ref):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = (y - ref).abs().max().item()
    assert err <= 2e-6 * max(1.0, ref.abs().max().item()), f"max abs error {err}"


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("lead", [(1,), (), (1, 1), (2, 9), (5, 13)],
                         ids=["batch1", "batch1_1d", "batch1_3d", "prefill", "prefill_tiles"])
@pytest.mark.parametrize("threads", [1, 3])
def test_llvm_matches_reference(shape, lead, threads):
    """The float32-LUT kernels (exact=True): same result as the reference up to summation order (65 rows: more
    batch tiles than threads, so the prefill GEMM splits the batch tiles instead of the rows)."""
    out, inf, v, K, bits, *_ = SHAPES[shape]
    w = make_weight(*SHAPES[shape])
    x = torch.randn(*lead, inf)
    ref = cg.codebook_gemm_reference(x, *w, inf, v, bits)
    check(lk.codebook_gemm_llvm(x, *w, inf, v, bits, n_threads=threads, exact=True), ref)


Q16_SHAPES = ["square", "tall", "wide", "outliers_perm", "residual", "large"]


@pytest.mark.skipif(not q16.host_ok(), reason="the int16-LUT gemv needs x86 AVX-512BW")
@pytest.mark.parametrize("shape", Q16_SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_q16_gemv_within_the_lut_rounding_bound(shape, threads):
    """Opt-in (EDGETK_LUT=q16) batch-1 path: int16 LUT, one scale per block of 32 columns -> |error| <= sum of
    half-steps."""
    _lut_case(q16, "q16", SHAPES.get(shape, (320, 2048, 4, 256, 8, 1, 5, 0, True, False)), threads)


def _lut_case(mod, name, cfg, threads):
    """(y through LUT kernel `name` of module `mod`, the reference, x, w), after checking y is within the LUT bound."""
    out, inf, v, K, bits, *_ = cfg
    w = make_weight(*cfg)
    x = torch.randn(1, inf)
    assert mod.pack_weight(*w, inf, v, bits) is not None
    ref = cg.codebook_gemm_reference(x, *w, inf, v, bits)
    y = lk.codebook_gemm_llvm(x, *w, inf, v, bits, n_threads=threads, lut=(name,))
    err = (y - ref).abs().max().item()
    bound = lut_bound(x, w, inf, v, mod.QMAX)
    if mod.pack_weight(*w, inf, v, bits).spec.int_lut:  # x and the codebooks in int8 too (AVX-512 VNNI hosts)
        bound = 1.02 * bound + vnni_input_bound(x, w, inf, v)
    assert 0 < err <= bound, err
    return y, ref, x, w


Q8_SHAPES = ["square", "tall", "wide", "odd", "outliers_perm", "residual", "bits5", "large", "k128", "k192", "k64",
             "r16", "r16_odd_block", "k11_v3", "r16_groups"]
EXTRA = {"large": (320, 2048, 4, 256, 8, 1, 5, 0, True, False), "k128": (192, 576, 4, 128, 7, 1, 1, 0, True, False),
         "k192": (96, 200, 4, 192, 8, 1, 1, 0, True, False),  # 12 tables of 16 on AVX2: an uneven blend tree
         "k64": (128, 300, 2, 64, 6, 1, 1, 0, True, True),  # vq3's format
         # K <= 16: codes streamed as nibbles (vq2-r16's format); an odd last block (21 code vectors); odd JB
         "r16": (192, 576, 4, 16, 4, 2, 1, 0, True, False), "r16_odd_block": (64, 85, 4, 16, 4, 2, 1, 1, True, True),
         "k11_v3": (96, 99, 3, 11, 4, 1, 1, 0, False, False), "r16_groups": (128, 256, 4, 16, 4, 2, 2, 0, True, False)}


@pytest.mark.skipif(not q8.host_ok(), reason="the int8-LUT gemv runs on x86 AVX2 / AVX-512 VBMI or aarch64 hosts")
@pytest.mark.parametrize("shape", Q8_SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_q8_gemv_within_the_lut_rounding_bound(shape, threads):
    """Opt-in batch-1 path (EDGETK_LUT=q8 / "llvm-q8"): int8 LUT, one scale per 64 inputs -> within the sum of
    half-steps, and an SNR against the reference like int8 activations (>= 30 dB; measured 37-43 dB)."""
    cfg = SHAPES.get(shape) or EXTRA[shape]
    out, inf, v, K, bits, *_ = cfg
    y, ref, x, w = _lut_case(q8, "q8", cfg, threads)
    assert snr_db(y, ref) >= 30
    with table.force("llvm-q8"):  # the op's thread count may differ: split-K partial sums, float reordering only
        torch.testing.assert_close(torch.ops.edgetk.codebook_gemm(x, *w, inf, v, bits), y, rtol=1e-5,
                                   atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("kernel", ["f32", "q8"])
def test_gemv_from_concurrent_python_threads(kernel):
    """The batch-1 launch caches a filled argument block per weight and calling thread (the kernel runs without the
    GIL): Python threads calling one weight at once each get their own input's result."""
    import concurrent.futures

    mod = {"f32": lk, "q8": q8}[kernel]
    if kernel == "q8" and not q8.host_ok():
        pytest.skip("the int8-LUT gemv runs on x86 AVX2 / AVX-512 VBMI or aarch64 hosts")
    cfg = (576, 576, 4, 256, 8, 1, 1, 0, True, True)
    p = mod.pack_weight(*make_weight(*cfg), 576, 4, 8)
    xs = [torch.randn(576, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [mod.gemv(p, x, n_threads=1) for x in xs]

    def work(i):
        return all(torch.equal(mod.gemv(p, xs[(i + k) % 4], n_threads=1), want[(i + k) % 4]) for k in range(200))

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        assert all(ex.map(work, range(4)))
    assert len({k[2] for k in p.__dict__["_launch"]}) >= 2  # blocks of several threads


def test_default_batch1_kernel_is_the_float32_one_unless_asked(monkeypatch):
    """Eager runs equal the reference up to summation order by default (no LUT kernel); EDGETK_LUT=q8 opts into
    the int8 LUT, EDGETK_LUT=q16 into the int16 one."""
    monkeypatch.delenv("EDGETK_LUT", raising=False)
    assert lk.default_lut() == ()
    w0, x0 = make_weight(*SHAPES["square"]), torch.randn(1, 64)
    check(lk.codebook_gemm_llvm(x0, *w0, 64, 4, 8), cg.codebook_gemm_reference(x0, *w0, 64, 4, 8))
    monkeypatch.setenv("EDGETK_LUT", "q16")
    assert lk.default_lut() == ("q16",)
    monkeypatch.setenv("EDGETK_LUT", "q8,q16")
    assert lk.default_lut() == ("q8", "q16")
    w, x = make_weight(*SHAPES["square"]), torch.randn(1, 64)
    if q8.host_ok():
        assert torch.equal(lk.codebook_gemm_llvm(x, *w, 64, 4, 8), lk.codebook_gemm_llvm(x, *w, 64, 4, 8, lut=("q8",)))
    monkeypatch.setenv("EDGETK_LUT", "none")
    assert lk.default_lut() == ()
    check(lk.codebook_gemm_llvm(x, *w, 64, 4, 8), cg.codebook_gemm_reference(x, *w, 64, 4, 8))
    monkeypatch.setenv("EDGETK_LUT", "q4")
    with pytest.raises(ConfigError, match="EDGETK_LUT"):
        lk.codebook_gemm_llvm(x, *w, 64, 4, 8)


def test_batch1_output_takes_the_input_leading_dims_for_every_kernel(monkeypatch):
    """The batch-1 kernels allocate y with x's leading dimensions ([in] -> [out], [1, 1, in] -> [1, 1, out]),
    including a row count the kernel pads (37 rows: the padded y is cut to a fresh tensor)."""
    monkeypatch.delenv("EDGETK_LUT", raising=False)
    cfg = (37, 64, 4, 256, 8, 1, 1, 0, True, False)
    w = make_weight(*cfg)
    for lut in ((), *((name,) for name in lk.LUT_KERNELS if lk.lut_available(name))):
        for lead in ((), (1,), (1, 1)):
            x = torch.randn(*lead, 64)
            y = lk.codebook_gemm_llvm(x, *w, 64, 4, 8, lut=lut)
            ref = cg.codebook_gemm_reference(x, *w, 64, 4, 8)
            assert y.shape == (*lead, 37) and y.is_contiguous() and y.untyped_storage().nbytes() == 37 * 4
            assert (y - ref).abs().max().item() <= (0.05 if lut else 2e-6) * ref.abs().max().item()


def test_env_reads_follow_os_environ(monkeypatch):
    """table.env (the per-call settings read) sees changes made through os.environ at once."""
    monkeypatch.delenv("EDGETK_TEST_SETTING", raising=False)
    assert table.env("EDGETK_TEST_SETTING") is None
    monkeypatch.setenv("EDGETK_TEST_SETTING", "q8 é")
    assert table.env("EDGETK_TEST_SETTING") == "q8 é"
    monkeypatch.delenv("EDGETK_TEST_SETTING")
    assert table.env("EDGETK_TEST_SETTING") is None


def test_avx512_kernels_generate_and_fall_back_where_the_host_lacks_them():
    """The AVX-512 LUT kernels (q16: AVX-512BW, q8: VBMI) compile for an AVX-512 CPU on any host (their table
    permutes are in the code); the AVX2 one uses vpshufb on ymm only. On a host without the ISA the format falls
    back: q16 declines (the op runs the exact float32 kernel), q8 takes the AVX2 variant."""
    spec16 = lk.KernelSpec(4, 256, 1, q16.R, q16.JB, 2, 16, 1)
    asm = lc.emit_assembly(q16.build_module(spec16), cpu="sapphirerapids")
    assert asm.count("vpermt2w") + asm.count("vpermi2w") >= 4 and "zmm" in asm
    asm = lc.emit_assembly(q8.build_module(q8.make_spec(4, 256, 1, 64, False, isa="avx512vbmi"), "avx512vbmi"),
                           cpu="icelake-server")
    assert asm.count("vpermt2b") + asm.count("vpermi2b") >= 2 and "vrangeps" in asm
    # VNNI: the LUT built with vpdpbusd and rescaled with vpmulhrsw (not the float build: no vrangeps max)
    asm = lc.emit_assembly(q8.build_module(q8.make_spec(4, 256, 1, 64, False, isa="avx512vbmi", vnni=True),
                                           "avx512vbmi"), cpu="icelake-server")
    assert asm.count("vpdpbusd") >= 16 and "vpmulhrsw" in asm and "vrangeps" not in asm  # no float build
    # AVX-VNNI (AVX2 hosts with the VEX vpdpbusd: Alder Lake and later clients): the same build on ymm
    asm = lc.emit_assembly(q8.build_module(q8.make_spec(4, 256, 1, 64, False, isa="avx2", vnni=True), "avx2"),
                           cpu="alderlake")
    assert asm.count("{vex}\tvpdpbusd\t%ymm") >= 32 and "vpmulhrsw" in asm and "zmm" not in asm
    # ... and on AVX-512 VNNI hosts without VBMI (Cascade Lake: the AVX2 lookups), its EVEX ymm form
    asm = lc.emit_assembly(q8.build_module(q8.make_spec(4, 256, 1, 64, False, isa="avx2", vnni=True), "avx2"),
                           cpu="cascadelake")
    assert asm.count("vpdpbusd\t%ymm") >= 32 and "{vex}" not in asm and "vpdpbusd\t%zmm" not in asm
    asm = lc.emit_assembly(q8.build_module(q8.make_spec(4, 16, 2, 64, False, isa="avx2"), "avx2"), cpu="znver3")
    assert asm.count("vpshufb") >= 2 and "zmm" not in asm
    # K = 256 on AVX2: 16 low-nibble shuffles and a tree of 15 byte blends per 32 codes (no per-table saturation)
    asm = lc.emit_assembly(q8.build_module(q8.make_spec(4, 256, 1, 64, False, isa="avx2"), "avx2"), cpu="znver3")
    assert asm.count("vpblendvb") >= 15 and asm.count("vpshufb") >= 16 and "vpaddusb" not in asm
    w, x = make_weight(*SHAPES["square"]), torch.randn(1, 64)
    if not q16.host_ok():
        assert q16.pack_weight(*w, 64, 4, 8) is None
        check(lk.codebook_gemm_llvm(x, *w, 64, 4, 8, lut=("q16",)), cg.codebook_gemm_reference(x, *w, 64, 4, 8))
    if lc.llvm.get_process_triple().startswith("x86_64") and lc.llvm.get_host_cpu_features().get("avx2"):
        assert q8.host_isa() in ("avx2", "avx512vbmi")


def test_q8_declines_formats_it_does_not_take():
    """Groups whose rows are not whole 64-row tiles and codebooks over 256 entries go to the next kernel."""
    for shape in ("groups", "groups_odd_rows", "bits12", "bits16"):
        out, inf, v, K, bits, *_ = SHAPES[shape]
        w = make_weight(*SHAPES[shape])
        assert q8.pack_weight(*w, inf, v, bits, isa="avx512vbmi") is None
        x = torch.randn(1, inf)
        err = (lk.codebook_gemm_llvm(x, *w, inf, v, bits) - cg.codebook_gemm_reference(x, *w, inf, v, bits)).abs()
        assert err.max().item() <= default_bound(x, w, inf, v, bits)


def lut_bound(x, w, inf, v, qmax):
    """Worst case of a quantised LUT (|q| <= qmax): every looked-up entry off by half a step of the largest
    block scale."""
    codes, cb, perm, ow, scale, _ = w
    n_out = ow.shape[1] if ow.numel() else 0
    xp = x[:, perm] if perm.numel() else x
    n_vec = math.ceil((inf - n_out) / v)
    xq = torch.nn.functional.pad(xp[0, n_out:], (0, n_vec * v - inf + n_out)).view(n_vec, v)
    lut_max = torch.einsum("jv,sgkv->sgjk", xq, cb.float()).abs().max().item()
    row_scale = scale.abs().max().item() if scale.numel() else 1.0
    return codes.shape[0] * n_vec * lut_max / (2 * qmax) * row_scale + 1e-5


def vnni_input_bound(x, w, inf, v):
    """Worst case added by the VNNI build's int8 inputs: per looked-up entry, x (half a step of its block's
    max / 127) and the codebook (half a step of its max / 127) in each of the v products, plus the halved LSB."""
    codes, cb, perm, ow, scale, _ = w
    n_out = ow.shape[1] if ow.numel() else 0
    n_vec = math.ceil((inf - n_out) / v)
    xmax = (x[:, perm] if perm.numel() else x)[0, n_out:].abs().max().item()
    cbmax = cb.float().abs().max().item()
    row_scale = scale.abs().max().item() if scale.numel() else 1.0
    per_entry = v * xmax * cbmax * (1 / 254 + 1 / 254 + 1 / (4 * 127 * 127)) + 2 * xmax * cbmax / 127 ** 2
    return codes.shape[0] * n_vec * per_entry * row_scale + 1e-5


def vnni_model(p, x, w, inf, v, bits):
    """Plain-PyTorch model of the integer LUT build (`q8._emit_lut_int`: AVX-512 VNNI, AVX-VNNI, aarch64 `sdot`) and
    the int8 lookups, from the packed weight's integer codebooks: the kernel's result up to float rounding of the
    scales and summation order."""
    codes, cb, perm, ow, scale, bias = w
    spec, S, G = p.spec, p.spec.stages, p.groups
    Kp, JB, isa = spec.K, spec.JB, q8.spec_isa(p.spec)
    nb = S * G * Kp * 4
    raw = p.cbt[:nb].view(S, G, Kp, 4)
    slots = raw.view(torch.int8).long() if isa == "neon" else raw.long() - q8.CB_BIAS  # sdot: signed bytes
    cb_scale = p.cbt[nb:].view(torch.float32).view(S, G).double()
    cbq = torch.empty_like(slots)
    cbq[:, :, q8.int_slot_order(Kp, isa)] = slots  # codeword order
    xp = x[0, perm] if perm.numel() else x[0]
    xq = torch.nn.functional.pad(xp[p.n_out:], (0, p.n_vec * v - (inf - p.n_out))).view(p.n_vec, v)
    idx = cg.unpack_codes(codes, bits, p.n_vec)
    half = int(v * 127 * q8.CB_QMAX > 32767)
    rpg = p.out_f // G
    y = torch.zeros(p.out_f, dtype=torch.float64)
    for j0 in range(0, p.n_vec, JB):
        xb = xq[j0:j0 + JB]
        jl, xmax = xb.shape[0], xb.abs().max()
        inv = torch.tensor(127.0) / xmax if xmax > 0 else torch.tensor(0.0)
        x8 = torch.nn.functional.pad(torch.round(xb * inv).long(), (0, 4 - v))
        for s in range(S):
            for g in range(G):
                d = torch.div(x8 @ cbq[s, g].T, 2 ** half, rounding_mode="floor")  # [jl, Kp]
                m = int(d.abs().max())
                if m == 0:
                    continue
                sh = max(0, 8 - m.bit_length())
                M = (127 << 15) // (m << sh)
                q = torch.div(torch.div((d << sh) * M, 2 ** 14, rounding_mode="floor") + 1, 2, rounding_mode="floor")
                assert int(q.abs().max()) <= 127
                blk = 2 ** 15 / (M * 2 ** sh) * float(xmax) * 2 ** half / 127 * cb_scale[s, g]
                rows = slice(g * rpg, (g + 1) * rpg)
                y[rows] += blk * q[torch.arange(jl), idx[s, rows, j0:j0 + jl]].sum(1).double()
    if p.n_out:
        y += ow.double() @ xp[:p.n_out].double()
    if scale.numel():
        y *= scale.double()
    if bias.numel():
        y += bias.double()
    return y.float()


VNNI_SHAPES = ["square", "odd", "outliers_perm", "residual", "large", "k128", "k192", "k64", "r16", "r16_odd_block",
               "k11_v3", "r16_groups"]


def int_isas():
    """The integer LUT builds this host runs: its own, and the AVX-VNNI (ymm) one on an AVX-512 VNNI host."""
    return [isa for isa in ("avx512vbmi", "avx2", "neon") if q8.runs_here(isa, int_lut=True)]


@pytest.mark.skipif(not q8.host_vnni(), reason="the integer LUT build needs an int8 dot product (VNNI, AVX-VNNI, "
                    "aarch64 dotprod)")
@pytest.mark.parametrize("shape", VNNI_SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_q8_vnni_matches_its_integer_model(shape, threads):
    """On hosts with an int8 dot product the q8 LUT is built from int8 x and codebooks: the kernel (the host's, and
    on AVX-512 the AVX-VNNI one too) equals the plain-PyTorch model of that integer arithmetic (`vnni_model`) to
    float rounding, and stays >= 30 dB from the float reference."""
    cfg = SHAPES.get(shape) or EXTRA[shape]
    out, inf, v, K, bits, *_ = cfg
    w = make_weight(*cfg)
    x = torch.randn(1, inf)
    ran = 0
    for isa in int_isas():
        p = q8.pack_weight(*w, inf, v, bits, isa=None if isa == q8.host_isa() else isa, vnni=True)
        if p is None or not p.spec.int_lut:  # AVX2: nibble formats (K <= 16) keep the float build
            assert isa == "avx2" and K <= 16, (isa, shape)
            continue
        ran += 1
        y = q8.gemv(p, x[0], n_threads=threads)
        want = vnni_model(p, x, w, inf, v, bits)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert snr_db(y[None], cg.codebook_gemm_reference(x, *w, inf, v, bits)) >= 30
        p32 = q8.pack_weight(*w, inf, v, bits, isa=isa, vnni=False)  # the float32 build, same layout otherwise
        assert not p32.spec.int_lut and snr_db(q8.gemv(p32, x[0], n_threads=threads)[None], want[None]) >= 30
    assert ran


@pytest.mark.skipif(not q8.host_vnni(), reason="the integer LUT build needs an int8 dot product")
def test_q8_vnni_blocks_of_zeros_and_tiny_dot_products():
    """A block of zero inputs (scale 0) and a block whose largest integer dot product is < 128 (the entries are
    shifted left before the rescale) both match the integer model."""
    cfg = (64, 192, 4, 256, 8, 1, 1, 0, False, False)
    w = list(make_weight(*cfg))
    cb = w[1].float()
    cb[..., 0] = cb[..., 0].sign() * cb[..., 1:].abs().max() / 127  # first inputs: entries of one int8 step
    w[1] = cb.half()
    x = torch.randn(1, 192)
    x[0, :64] = 0.0  # block 0: all zeros
    x[0, 64:128] = 0.0
    x[0, 64:128:4] = torch.rand(16) + 0.5  # block 1: only each vector's first input
    for isa in int_isas():
        p = q8.pack_weight(*w, 192, 4, 8, isa=None if isa == q8.host_isa() else isa, vnni=True)
        raw = p.cbt[:1024].view(256, 4)
        cbq = raw.view(torch.int8).long() if isa == "neon" else raw.long() - q8.CB_BIAS
        d = torch.round(x[0, 64:128].view(16, 4) * 127 / x[0, 64:128].abs().max()).long() @ cbq.T
        assert 0 < int((d // 2).abs().max()) < 128  # the shifted path
        want = vnni_model(p, x, w, 192, 4, 8)
        torch.testing.assert_close(q8.gemv(p, x[0], n_threads=1), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def snr_db(y, ref):
    return 10 * math.log10(ref.pow(2).mean().item() / (y - ref).pow(2).mean().item())


def default_bound(x, w, inf, v, bits):
    """The error bound of the batch-1 kernel the "llvm" entry picks for this weight on this host."""
    for mod in (lk.lut_kernel(name) for name in lk.default_lut()):
        if mod.host_ok() and mod.pack_weight(*w, inf, v, bits) is not None:
            return lut_bound(x, w, inf, v, mod.QMAX)
    return 2e-6 * max(1.0, cg.codebook_gemm_reference(x, *w, inf, v, bits).abs().max().item())


def test_op_selects_llvm_and_matches_reference():
    w = make_weight(*SHAPES["outliers_perm"])
    x = torch.randn(3, 70)
    assert table.select("codebook_gemm", "cpu", "eager").name == "llvm"
    with table.force("llvm-f32"):
        y = torch.ops.edgetk.codebook_gemm(x, *w, 70, 4, 8)
    with table.force("reference"):
        ref = torch.ops.edgetk.codebook_gemm(x, *w, 70, 4, 8)
    check(y, ref)
    with table.force("llvm-f32"):
        check(torch.ops.edgetk.codebook_gemm(x[:1], *w, 70, 4, 8), ref[:1])
    err = (torch.ops.edgetk.codebook_gemm(x[:1], *w, 70, 4, 8) - ref[:1]).abs().max().item()
    assert err <= default_bound(x[:1], w, 70, 4, 8)


def test_large_gemv_two_threads_and_vector_widths():
    """A 4096-wide row set split over pthreads; and the AVX2/NEON-width (R=8, R=4) code paths on this host."""
    w = make_weight(512, 1024, 4, 256, 8, 1, 1, 0, False, False)
    x = torch.randn(1, 1024)
    ref = cg.codebook_gemm_reference(x, *w, 1024, 4, 8)
    check(lk.codebook_gemm_llvm(x, *w, 1024, 4, 8, n_threads=2, exact=True), ref)
    for bits in (256, 128):
        spec = lk.make_spec(4, 256, 1, 512, False, vector_bits=bits)
        p = lk.pack_weight(*w, 1024, 4, 8)
        p = lk.Packed(spec, lk.repack_codes(w[0], 8, p.n_vec, spec), p.cbt, p.perm, p.ow, p.scale, p.bias,
                      p.out_f, p.in_f, p.n_out, p.n_vec, p.groups, math.ceil(512 / spec.R))
        check(lk.gemv(p, x[0], 2)[None], ref)
        check(lk.gemm(p, x.expand(5, -1).contiguous(), 2), ref.expand(5, -1))


@pytest.mark.parametrize("permute", [False, True])
def test_split_k_gemv_ranges_inside_blocks(permute):
    """The float32 gemv split over code columns (`gemvk`, the default on 2+ threads for K * vec_len >= 128):
    ranges cut at any column, inside JB blocks too ("large": 512 columns, JB 32, on 3, 5 and 7 threads), output
    groups, outliers with the permutation, 12-bit codes (the gather), 1 to 7 threads; with the AVX-512 permute
    lookup and with the gather. Equal to the reference up to summation order."""
    if permute and not lc.llvm.get_host_cpu_features().get("avx512f"):
        pytest.skip("the permute lookup needs AVX-512")
    for shape in ("large", "groups", "groups_odd_rows", "outliers_perm", "odd", "wide", "bits12", "residual",
                  "r16_odd_block"):
        cfg = SHAPES.get(shape) or EXTRA[shape]
        out, inf, v, K, bits, *_ = cfg
        w = make_weight(*cfg)
        p = lk.pack_weight(*w, inf, v, bits)
        fn = lk._PAR_T(lc.jit(lk.build_module(p.spec, permute=permute), ["gemvk_work_par"])["gemvk_work_par"])
        x = torch.randn(inf)
        ref = cg.codebook_gemm_reference(x[None], *w, inf, v, bits)[0]
        for nt in (1, 2, 3, 5, 7):
            check(lk.launch(p, fn, x, lk.gemvk_stride, nt), ref)
        assert p.spec.JB < p.n_vec or shape != "large"
    p = lk.pack_weight(*make_weight(*SHAPES["square"]), 64, 4, 8)
    x = torch.randn(64)
    assert torch.equal(lk.gemv(p, x, 2), lk.gemv(p, x, 2, split_k=True))  # the default on 2 threads
    check(lk.gemv(p, x, 2, split_k=False), lk.gemv(p, x, 1))
    w = make_weight(*EXTRA["r16"])  # 16-entry tables (a column's LUT is cheap): the rows keep it
    p, x = lk.pack_weight(*w, 576, 4, 4), torch.randn(576)
    assert torch.equal(lk.gemv(p, x, 2), lk.gemv(p, x, 2, split_k=False))
    check(lk.gemv(p, x, 3, split_k=True)[None], cg.codebook_gemm_reference(x[None], *w, 576, 4, 4))


def test_q8_repacked_layout_matches_docstring():
    """Inside each R-byte vector, byte p holds row p // 2 + (R/2) * (p % 2) of the tile; codebooks padded to Kp."""
    out, inf, v = 130, 100, 4
    w = make_weight(out, inf, v, 200, 8, 2, 1, 0, False, False)
    for isa in ("avx512vbmi", "neon"):
        p = q8.pack_weight(*w, inf, v, 8, isa=isa)
        R, JB, n_vec, n_rb = p.spec.R, p.spec.JB, p.n_vec, p.n_rb
        order = q8._x86_order(256) if isa == "avx512vbmi" else torch.arange(256)  # codeword of each LUT slot
        assert p.spec.K == 256 and p.cbt.shape == (2, 1, v, 256) and sorted(order.tolist()) == list(range(256))
        assert torch.equal(p.cbt[..., order < 200], w[1].float().permute(0, 1, 3, 2)[..., order[order < 200]])
        assert not p.cbt[..., order >= 200].any()
        idx = cg.unpack_codes(w[0], 8, n_vec)
        flat = p.codes_r.flatten()
        for st, r, j in [(0, 0, 0), (1, 129, 24), (0, 17, 13), (1, R // 2 + 3, n_vec - 1)]:
            jblk, jj, rb, i = j // JB, j % JB, r // R, r % R
            jl = min(JB, n_vec - jblk * JB)
            byte = 2 * i if i < R // 2 else 2 * (i - R // 2) + 1
            off = st * n_rb * R * n_vec + jblk * JB * n_rb * R + rb * jl * R + jj * R + byte
            assert int(flat[off]) == int(idx[st, r, j]), (isa, st, r, j)


def test_q8_nibble_layout_matches_docstring():
    """K <= 16: columns 2p (low nibble) and 2p+1 (high) of a tile share an R-byte vector, rows interleaved as in the
    byte layout; an odd block ends with a vector whose high nibbles are 0; Kp is 16 on AVX2 / NEON, 64 on VBMI."""
    out, inf, v = 70, 4 * 37, 4
    w = make_weight(out, inf, v, 16, 4, 2, 1, 0, False, False)
    for isa, kp in (("avx2", 16), ("neon", 16), ("avx512vbmi", 64)):
        p = q8.pack_weight(*w, inf, v, 4, isa=isa)
        R, JB, n_vec, n_rb = p.spec.R, p.spec.JB, p.n_vec, p.n_rb
        assert p.spec.nibbles and p.spec.K == kp and JB % 2 == 0 and n_vec % JB % 2 == 1  # the last block is odd
        half = lambda n: (n + 1) // 2  # noqa: E731
        assert p.codes_r.numel() == 2 * n_rb * R * half(n_vec)
        idx = cg.unpack_codes(w[0], 4, n_vec)
        flat = p.codes_r.flatten()
        for st, r, j in [(0, 0, 0), (1, 69, 36), (0, 17, 13), (1, R // 2 + 3, n_vec - 2), (0, 5, JB + 1)]:
            jblk, jj, rb, i = j // JB, j % JB, r // R, r % R
            jl = min(JB, n_vec - jblk * JB)
            byte = 2 * i if i < R // 2 else 2 * (i - R // 2) + 1
            off = st * n_rb * R * half(n_vec) + jblk * JB // 2 * n_rb * R + rb * half(jl) * R + jj // 2 * R + byte
            assert (int(flat[off]) >> (4 * (jj % 2))) & 15 == int(idx[st, r, j]), (isa, st, r, j)
            if j == n_vec - 1 or jj == jl - 1 and jl % 2:
                assert int(flat[off]) >> 4 == 0


def test_repacked_layout_matches_docstring():
    out, inf, v = 40, 100, 4
    w = make_weight(out, inf, v, 256, 8, 2, 1, 0, False, False)
    p = lk.pack_weight(*w, inf, v, 8)
    s, R, JB, n_vec, n_rb = p.spec, p.spec.R, p.spec.JB, p.n_vec, p.n_rb
    idx = cg.unpack_codes(w[0], 8, n_vec)
    flat = p.codes_r.flatten()
    for st, r, j in [(0, 0, 0), (1, 39, 24), (0, 17, 13), (1, 5, n_vec - 1)]:
        jblk, jj, rb, i = j // JB, j % JB, r // R, r % R
        jl = min(JB, n_vec - jblk * JB)
        off = st * n_rb * R * n_vec + jblk * JB * n_rb * R + rb * jl * R + jj * R + i
        assert int(flat[off]) == int(idx[st, r, j]), (st, r, j, s)


def test_in_place_weight_update_invalidates_the_repack():
    w = list(make_weight(*SHAPES["square"]))
    x = torch.randn(1, 64)
    for exact in (True, False):
        lk.codebook_gemm_llvm(x, *w, 64, 4, 8, exact=exact)
    w[0].add_(1)  # in-place: new codes, same tensor
    ref = cg.codebook_gemm_reference(x, *w, 64, 4, 8)
    check(lk.codebook_gemm_llvm(x, *w, 64, 4, 8, exact=True), ref)
    err = (lk.codebook_gemm_llvm(x, *w, 64, 4, 8) - ref).abs().max().item()
    assert err <= default_bound(x, w, 64, 4, 8)


def test_unhandled_formats_fall_back_to_the_reference():
    w = make_weight(*SHAPES["square"])
    x = torch.randn(2, 64, dtype=torch.float64)
    y = lk.codebook_gemm_llvm(x, *w, 64, 4, 8)
    assert y.dtype == torch.float64
    assert torch.equal(y, cg.codebook_gemm_reference(x, *w, 64, 4, 8))


def test_codes_beyond_the_codebook_never_reach_the_kernel():
    codes, cb, *rest = make_weight(*SHAPES["square"])
    cb = cb[:, :, :200]  # codes go up to 255: the kernel would read past its LUT
    assert lk.pack_weight(codes, cb, *rest, 64, 4, 8) is None
    with pytest.raises(IndexError):  # the reference reports it
        lk.codebook_gemm_llvm(torch.randn(1, 64), codes, cb, *rest, 64, 4, 8)


@pytest.mark.skipif(not lc.gomp_available(), reason="PyTorch's OpenMP runtime (libgomp) is not in this process")
def test_ranges_run_on_the_openmp_team_even_a_smaller_one():
    """Host kernels split their ranges over libgomp's team; a team smaller than the ranges asked for (here
    OMP_THREAD_LIMIT=1 against 3 ranges) still runs every range, each with its own scratch slot."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, sys; sys.path.insert(0, %r)\n"
        "from test_kernels_llvm_codebook import SHAPES, make_weight\n"
        "from edgetk.kernels import codebook_gemm as cg, llvm_codebook as lk\n"
        "w = make_weight(512, 256, 4, 256, 8, 1, 1, 0, True, False); x = torch.randn(3, 256)\n"
        "ref = cg.codebook_gemm_reference(x, *w, 256, 4, 8)\n"
        "errs = [(lk.codebook_gemm_llvm(x[:r], *w, 256, 4, 8, n_threads=3, exact=True) - ref[:r]).abs().max().item()"
        " for r in (1, 3)]\n"
        "print(max(errs) / ref.abs().max().item())\n" % os.path.dirname(__file__))
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) <= 2e-6
    asm = lc.emit_assembly(lk.build_module(lk.make_spec(4, 256, 1, 64, False)))
    assert "GOMP_parallel" in asm and "pthread_create" not in asm


def test_avx512_gemv_picks_lut_entries_with_permutes():
    """On AVX-512 (16 rows a tile, K <= 256) the float32 gemv picks each column's LUT entries with vpermi2ps and a
    blend tree on the code bits instead of vpgatherdps (compiled for an AVX-512 CPU on any host; the tests above
    run it against the reference where the host has AVX-512); with more codewords it keeps the gather."""
    for K, tables in ((256, 8), (64, 2), (200, 7), (16, 1)):
        spec = lk.make_spec(4, K, 1, 64, False, vector_bits=512)
        asm = lc.emit_assembly(lk.build_module(spec, permute=True), cpu="icelake-server")
        gemv = asm[asm.index("gemv_work:"):asm.index(".Lfunc_end", asm.index("gemv_work:"))]
        assert "vgatherdps" not in gemv
        if tables == 1:  # 16 entries: one vpermps (LLVM may spell it vpermd)
            assert "vpermps" in gemv or "vpermd" in gemv
        else:  # the blend tree: masked (merging) permutes or blends on the code bits
            assert gemv.count("vpermi2ps") + gemv.count("vpermt2ps") >= tables and gemv.count("{%k") >= tables - 1
    asm = lc.emit_assembly(lk.build_module(lk.make_spec(4, 256, 1, 64, False, vector_bits=512), permute=False),
                           cpu="icelake-server")
    assert "vgatherdps" in asm[asm.index("gemv_work:"):]
    spec = lk.make_spec(2, 512, 1, 64, False, vector_bits=512)  # 9-bit codes: the gather
    asm = lc.emit_assembly(lk.build_module(spec, permute=True), cpu="icelake-server")
    assert "vgatherdps" in asm[asm.index("gemv_work:"):]


BF16_SHAPES = ["square", "tall", "wide", "odd", "outliers_perm", "groups", "bits5", "large"]


@pytest.mark.skipif(not lk.dequant_module().host_ok(), reason="the bf16 prefill needs oneDNN bf16 (AVX-512 BF16/AMX)")
@pytest.mark.parametrize("shape", BF16_SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_bf16_prefill_close_to_the_reference(shape, threads):
    """Opt-in prefill (EDGETK_PREFILL=bf16): codes -> bf16 weight -> oneDNN matmul; bf16 rounding of x and the
    codewords only (measured ~50 dB SNR; >= 40 dB asserted), for every format it takes, 1 and 3 threads."""
    cfg = SHAPES.get(shape) or EXTRA[shape]
    out, inf, v, K, bits, *_ = cfg
    w = make_weight(*cfg)
    x = torch.randn(2, 7, inf)
    ref = cg.codebook_gemm_reference(x, *w, inf, v, bits)
    y = lk.codebook_gemm_llvm(x, *w, inf, v, bits, n_threads=threads, prefill="bf16")
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert snr_db(y, ref) >= 40
    dq = lk.dequant_module()
    p = dq.pack_weight(*w, inf, v, bits)
    assert p is not None  # the format went through the dequantizing kernel, not the LUT fallback
    wd = dq.dequantize(p, threads).float()  # the kernel's weight is the codewords rounded to bf16, row by row
    codes = cg.unpack_codes(w[0][0], bits, p.base.n_vec)
    group = torch.arange(out)[:, None] // (out // w[1].shape[1])
    assert torch.equal(wd.view(out, p.base.n_vec, v), w[1][0].bfloat16().float()[group, codes])


@pytest.mark.parametrize("shape", BF16_SHAPES)
@pytest.mark.parametrize("threads", [1, 3])
def test_dense_prefill_matches_the_reference(shape, threads):
    """EDGETK_PREFILL=dense (and what "auto" picks for layers with few rows): codes -> float32 weight tile -> fp32
    matmul; the tile holds the codewords exactly, so the result is the reference's up to summation order."""
    cfg = SHAPES.get(shape) or EXTRA[shape]
    out, inf, v, K, bits, *_ = cfg
    w = make_weight(*cfg)
    x = torch.randn(2, 7, inf)
    ref = cg.codebook_gemm_reference(x, *w, inf, v, bits)
    check(lk.codebook_gemm_llvm(x, *w, inf, v, bits, n_threads=threads, prefill="dense"), ref)
    dq = lk.dequant_module()
    p = dq.pack_weight(*w, inf, v, bits, dtype=torch.float32)
    assert p is not None  # the format went through the dequantizing kernel, not the LUT fallback
    codes = cg.unpack_codes(w[0][0], bits, p.base.n_vec)
    group = torch.arange(out)[:, None] // (out // w[1].shape[1])
    wd = dq.dequantize(p, threads)
    assert wd.dtype == torch.float32 and torch.equal(wd.view(out, p.base.n_vec, v), w[1][0].float()[group, codes])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantizing_prefill_in_row_tiles(monkeypatch, dtype):
    """A weight larger than TILE_BYTES is dequantized and multiplied one tile of rows at a time (the last tile
    partial, output groups crossing tiles): the same result as one tile, and never more than a tile dense."""
    if dtype == torch.bfloat16 and not lk.dequant_module().host_ok():
        pytest.skip("the bf16 path needs oneDNN bf16 (AVX-512 BF16/AMX)")
    dq = lk.dequant_module()
    cfg = (200, 96, 4, 256, 8, 1, 5, 3, True, True)  # 200 rows, 5 groups of 40, outliers, perm, scale, bias
    w = make_weight(*cfg)
    x = torch.randn(9, 96)
    p = dq.pack_weight(*w, 96, 4, 8, dtype=dtype)
    whole = dq.gemm(p, x, 2)
    assert dq.tile_rows(p) == 200
    row_bytes = p.base.n_vec * 4 * p.cb.element_size()
    monkeypatch.setattr(dq, "TILE_BYTES", 70 * row_bytes)  # -> tiles of 64 rows: 64, 64, 64, 8
    assert dq.tile_rows(p) == 64
    tiled = dq.gemm(p, x, 2)
    ref = cg.codebook_gemm_reference(x, *w, 96, 4, 8)
    if dtype == torch.float32:
        check(tiled, ref)
        check(whole, ref)
    else:
        assert snr_db(tiled, ref) >= 40
        torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-2 * ref.abs().max().item())
    with pytest.raises(ValueError, match="dtype"):
        dq.pack_weight(*w, 96, 4, 8, dtype=torch.float16)


def test_prefill_mode_auto_picks_by_shape_and_matmul_precision(monkeypatch):
    """EDGETK_PREFILL unset -> "auto" (above the few-input kernel's max_rows inputs): the panel GEMM for layers with
    few rows at 64 tokens (the dense float32 path at 256), the LUT GEMM for tall ones (all ~1e-6 from the reference);
    bf16 only where the caller
    allowed it with torch.set_float32_matmul_precision("medium") (and the host has bf16); explicit modes win; residual codebooks
    stay on the LUT GEMM; unknown names raise ConfigError."""
    monkeypatch.delenv("EDGETK_PREFILL", raising=False)
    assert lk.prefill_mode() == "auto"
    small, tall = (64, 64, 4, 256, 8, 1, 1, 0, False, False), (4096, 256, 4, 256, 8, 1, 1, 0, False, False)
    for cfg, want in ((small, "panel"), (tall, "lut")):
        w, x = make_weight(*cfg), torch.randn(64, cfg[1])
        p = lk.pack_weight(*w, cfg[1], 4, 8)
        assert lk.prefill_choice(p, 64, n_threads=1) == want
        assert lk.prefill_choice(p, 256, n_threads=1) == ("dense" if cfg is small else "lut")
        assert lk.prefill_choice(p, 64, "lut") == "lut" and lk.prefill_choice(p, 64, "dense") == "dense"
        ref = cg.codebook_gemm_reference(x, *w, cfg[1], 4, 8)
        y = lk.codebook_gemm_llvm(x, *w, cfg[1], 4, 8)
        check(y, ref)
        assert torch.equal(y, lk.codebook_gemm_llvm(x, *w, cfg[1], 4, 8, prefill=want))
    w, x = make_weight(*small), torch.randn(5, 64)
    p = lk.pack_weight(*w, 64, 4, 8)
    native = lk.dequant_module().host_ok()
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert lk.prefill_choice(p, 64, n_threads=1) == ("bf16" if native else "panel")
        assert lk.prefill_choice(p, 5) == "few"  # a few inputs: the few-input kernel, faster than dequantizing
    finally:
        torch.set_float32_matmul_precision(prev)
    assert lk.prefill_choice(p, 5, "bf16") == ("bf16" if native else "dense")
    monkeypatch.setenv("EDGETK_PREFILL", "bf16")
    if native:
        y = lk.codebook_gemm_llvm(x, *w, 64, 4, 8)
        assert torch.equal(y, lk.codebook_gemm_llvm(x, *w, 64, 4, 8, prefill="bf16"))
        assert not torch.equal(y, lk.codebook_gemm_llvm(x, *w, 64, 4, 8, prefill="lut"))
    res = SHAPES["residual"]
    wr, xr = make_weight(*res), torch.randn(3, res[1])
    assert lk.dequant_module().pack_weight(*wr, res[1], res[2], res[4]) is None
    assert lk.prefill_choice(lk.pack_weight(*wr, res[1], res[2], res[4]), 64, "dense") == "lut"
    check(lk.codebook_gemm_llvm(xr, *wr, res[1], res[2], res[4]),
          cg.codebook_gemm_reference(xr, *wr, res[1], res[2], res[4]))
    monkeypatch.setenv("EDGETK_PREFILL", "int4")
    with pytest.raises(ConfigError, match="EDGETK_PREFILL"):
        lk.codebook_gemm_llvm(x, *w, 64, 4, 8)
