"""The llvmlite fused-dequantization kv_attention kernel against kv_attention_reference."""
from __future__ import annotations

import math

import pytest
import torch

from edgetk.kernels import kv_attention as kva
from edgetk.kernels import kv_attention_fast as kf
from edgetk.kernels import table
from tests.conftest import OpsSeen


def make_case(B=1, H=3, Hq=9, T=1, S=80, D=64, bits=4, n_q=48, n_fp=20, kg=16, vg=32, nbk=None, seed=0,
              uniform=False, vbits=None, n_sparse=0):
    g = torch.Generator().manual_seed(seed)
    vbits = vbits or bits
    L, P, PV = 1 << max(bits, vbits), D * bits // 8, D * vbits // 8
    NBk = nbk or math.ceil(S / kg)
    q = torch.randn(B, Hq, T, D, generator=g)
    kc = torch.randint(0, 256, (B, H, S, P), generator=g, dtype=torch.uint8)
    vc = torch.randint(0, 256, (B, H, S, PV), generator=g, dtype=torch.uint8)
    km = (torch.rand(B, H, NBk, 2, D, generator=g) + 0.1).half()
    vm = (torch.rand(B, H, S, 2, D // vg, generator=g) + 0.1).half()
    lev = (torch.linspace(-1, 1, L).repeat(2, 1) if uniform
           else torch.sort(torch.rand(2, L, generator=g) * 2 - 1).values)
    fp = torch.randn(2, B, H, S, D, generator=g).half()
    ang = torch.arange(S)[:, None].float() / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.cat([ang, ang], 1)
    n = n_q + n_fp
    mask = torch.ones(T, S, dtype=torch.bool)
    mask[:, :n] = torch.tril(torch.ones(T, n, dtype=torch.bool), diagonal=n - T)
    e = torch.empty(0).half()
    oi, ov = torch.empty(0, dtype=torch.int32), e
    if n_sparse:  # per (k|v, b, h): the sink row (slot 0) + random sorted entries (some past n_q), -1 padding
        oi = torch.full((2, B, H, D + n_sparse + 3), -1, dtype=torch.int32)
        for r in oi.view(-1, oi.shape[-1]):
            pick = torch.randperm((n_q + 2) * D - D, generator=g)[:n_sparse] + D
            r[: D + n_sparse] = torch.cat([torch.arange(D), pick.sort().values]).int()
        ov = (torch.randn(oi.shape, generator=g) * 4).half()
    return (q, kc, km, vc, vm, lev, fp, oi, ov, e, e, ang.cos(), ang.sin(), mask, n_q, n_fp, kg, vg, bits, vbits)


CASES = {
    "kv4_gqa": {},
    "kv2_nuq": dict(bits=2),
    "kv4_uniform_calibrated": dict(nbk=1, uniform=True, n_fp=0),
    "prefill_batch2": dict(B=2, T=5),
    "fp_region_only": dict(n_q=0),
    "kv8_mha_odd": dict(D=32, vg=8, H=2, Hq=2, bits=8, n_q=33, n_fp=3, kg=7),
    # unequal widths (keys 5, values 3: codes straddle bytes; 32 key levels, values use 8 of the row)
    "k5v3_nuq": dict(bits=5, vbits=3, n_q=60, n_fp=10),
    "k3v5_prefill": dict(bits=3, vbits=5, T=4, vg=16),
    "k6v2_mha": dict(D=32, vg=8, H=2, Hq=2, bits=6, vbits=2, n_q=40, n_fp=5, kg=8),
    # dense-and-sparse: sinks + outliers replace dequantized elements (the kv4 / kv2 presets store them)
    "k5v3_sparse": dict(bits=5, vbits=3, n_sparse=40),
    "kv2_sparse_batch2_prefill": dict(bits=2, B=2, T=3, n_sparse=100, nbk=1),
    # a long causal prefill: early queries see none of the later blocks (skipped: no dot products, no values)
    "causal_prefill_40": dict(T=40, n_q=16, n_fp=40, bits=5, vbits=3, n_sparse=30),
    # small heads: a code row under 8 bytes (no 8-code windows), blocks of 4 and 2 slots (D 12, 6)
    "d16_kv2_row_4_bytes": dict(D=16, vg=8, H=2, Hq=4, bits=2, n_q=37, n_fp=6, kg=5),
    "d12_kv4_blocks_of_4": dict(D=12, vg=4, H=1, Hq=3, bits=4, n_q=21, n_fp=2, kg=4),
    "d6_k4v8_blocks_of_2": dict(D=6, vg=6, H=1, Hq=2, bits=4, vbits=8, T=2, n_q=9, n_fp=4, kg=3),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("threads", [1, 3])
def test_kv_attention_llvm_matches_reference(case, threads):
    args = make_case(**CASES[case])
    ref = kva.kv_attention_reference(*args)
    y = kf.kv_attention_llvm(*args, n_threads=threads)
    assert y.shape == ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("case", ["kv4_gqa", "k5v3_sparse", "kv2_nuq"])
def test_levels_gather_path_matches_reference(case, monkeypatch):
    """The level lookup without the AVX2 vpermps path (a masked gather, as on aarch64 / pre-AVX2 hosts)."""
    monkeypatch.setattr(kf, "_permps_ok", lambda D, bits: False)
    monkeypatch.setattr(kf, "_permvar_ok", lambda D, bits: False)
    args = make_case(**CASES[case])
    torch.testing.assert_close(kf.kv_attention_llvm(*args, n_threads=2), kva.kv_attention_reference(*args),
                               rtol=1e-5, atol=2e-6)


def test_block_slots():
    """Slots per block: the host's float lanes, halved until they divide the head dimension (2 at least)."""
    assert kf.block_slots(64, 256) == 8 and kf.block_slots(64, 512) == 16 and kf.block_slots(64, 128) == 4
    assert kf.block_slots(24, 512) == 8 and kf.block_slots(12, 256) == 4 and kf.block_slots(6, 256) == 2


@pytest.mark.parametrize("V", [2, 4, 16])
@pytest.mark.parametrize("case", ["kv4_gqa", "k5v3_sparse", "prefill_batch2", "kv2_sparse_batch2_prefill"])
def test_other_block_widths_match_reference(case, V, monkeypatch):
    """Blocks of V slots and their V dot products summed together (`_K.sums`: element then 128-bit chunk levels)
    at the widths other hosts take (NEON / SSE 4, AVX-512 16) or small heads force (2), run here."""
    spec = kf._spec

    def forced(D, kb, vb, vg):
        s = spec(D, kb, vb, vg)
        return kf.KVSpec(s.D, s.kbits, s.vbits, s.value_group, s.permvar, s.permps, V)

    monkeypatch.setattr(kf, "_spec", forced)
    args = make_case(**CASES[case])
    torch.testing.assert_close(kf.kv_attention_llvm(*args, n_threads=2), kva.kv_attention_reference(*args),
                               rtol=1e-5, atol=2e-6)


def test_padded_levels_kept_until_written():
    """Levels rows shorter than the kernel's stride are padded once per tensor version, not every call."""
    lev = torch.linspace(-1, 1, 4).repeat(2, 1)
    a = kf._padded_levels(lev, 16)
    assert a.shape == (2, 16) and torch.equal(a[:, :4], lev) and not a[:, 4:].any()
    assert kf._padded_levels(lev, 16) is a
    lev[0, 0] = -0.5
    b = kf._padded_levels(lev, 16)
    assert b is not a and b[0, 0] == -0.5
    full = torch.zeros(2, 16)
    assert kf._padded_levels(full, 16) is full


def test_op_selects_llvm_and_falls_back_for_unsorted_sparse_entries():
    args = list(make_case())
    assert table.select("kv_attention", "cpu", "eager").name == "llvm"
    with table.force("reference"):
        ref = torch.ops.edgetk.kv_attention(*args)
    torch.testing.assert_close(torch.ops.edgetk.kv_attention(*args), ref, rtol=1e-5, atol=2e-6)
    # sorted sparse entries are fused; unsorted ones (or a used entry after an unused one) go to the reference
    args[7] = torch.tensor([[[[5, 9, -1]] * 3], [[[7, 9, 11]] * 3]], dtype=torch.int32)
    args[8] = torch.full((2, 1, 3, 3), 3.0).half()
    assert kf.supported(args[0], args[1], args[4], args[5], args[7], args[9], args[13], 4, 4, 32)
    torch.testing.assert_close(kf.kv_attention_llvm(*args), kva.kv_attention_reference(*args), rtol=1e-5,
                               atol=2e-6)
    for bad in ([9, 5, -1], [5, -1, 9]):
        args[7] = torch.tensor([[[bad] * 3], [[[7, 9, 11]] * 3]], dtype=torch.int32)
        assert not kf.supported(args[0], args[1], args[4], args[5], args[7], args[9], args[13], 4, 4, 32)
        assert torch.equal(kf.kv_attention_llvm(*args), kva.kv_attention_reference(*args))


def test_decoder_with_quantized_cache_same_logits_with_either_kernel(tiny_llama):
    """The runtime's QuantKVCache (prefill + decode steps, block flushes) through the fast kernel vs the reference."""
    import copy

    from edgetk.runtimes import kv_cache

    cfg = kv_cache.KVCacheConfig(bits=4, key_group=16, fp_window=16)
    tokens = torch.randint(0, 256, (1, 56), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("reference", "llvm"):
        model = copy.deepcopy(tiny_llama)
        model.setup_cache(1, 128, cache_factory=kv_cache.cache_factory(cfg))
        with torch.no_grad(), table.force(name):
            steps = [model(tokens[:, :24], torch.arange(24))[:, -1]]
            steps += [model(tokens[:, i:i + 1], torch.tensor([i]))[:, -1] for i in range(24, 56)]
        logits[name] = torch.cat(steps)
    torch.testing.assert_close(logits["llvm"], logits["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["kv4_gqa", "k5v3_sparse", "kv2_sparse_batch2_prefill", "kv8_mha_odd",
                                  "fp_region_only", "k3v5_prefill"])
@pytest.mark.parametrize("threads", [2, 3])
def test_context_chunks_match_reference(case, threads, monkeypatch):
    """Heads that do not spread evenly over the threads are split along the context; the chunks' partials
    (max, sum, unnormalised output) combine to the reference, sparse entries and the fp region included."""
    monkeypatch.setattr(kf, "MIN_CHUNK", 8)
    args = make_case(**CASES[case])
    B, H, n = args[1].shape[0], args[1].shape[1], args[14] + args[15]
    assert kf.chunks(B * H, threads, n) > 1 or (B * H) % threads == 0
    torch.testing.assert_close(kf.kv_attention_llvm(*args, n_threads=threads), kva.kv_attention_reference(*args),
                               rtol=1e-5, atol=2e-6)


def test_chunk_count():
    """1 chunk when the heads spread evenly or one thread runs; else enough that every thread gets the same
    share, each chunk keeping MIN_CHUNK slots."""
    assert kf.chunks(3, 1, 4096) == 1 and kf.chunks(4, 2, 4096) == 1 and kf.chunks(6, 3, 4096) == 1
    assert kf.chunks(3, 2, 2048) == 2 and kf.chunks(2, 3, 2048) == 3 and kf.chunks(3, 4, 2048) == 4
    assert kf.chunks(3, 2, kf.MIN_CHUNK) == 1  # a short context stays whole


def test_memoised_checks_still_send_other_inputs_to_the_reference(monkeypatch):
    """The shape checks are memoised per call signature; a call that differs in what the kernel cannot take
    (a GEAR low-rank term, float64 queries, unsorted sparse rows) with the same shapes still goes to the reference."""
    args = list(make_case(**CASES["k5v3_sparse"]))
    ref = kva.kv_attention_reference(*args)
    torch.testing.assert_close(kf.kv_attention_llvm(*args), ref, rtol=1e-5, atol=2e-6)  # memoised: taken
    calls = []
    real = kf.kv_attention_reference
    monkeypatch.setattr(kf, "kv_attention_reference", lambda *a: calls.append(1) or real(*a))
    kf.kv_attention_llvm(*args)
    assert not calls
    B, H, S, D = args[1].shape[0], args[1].shape[1], args[1].shape[2], args[0].shape[-1]
    lr = list(args)
    lr[9], lr[10] = torch.zeros(2, B, H, S, 2).half(), torch.zeros(2, B, H, S // 16 + 1, 2, D).half()
    q64 = list(args)
    q64[0] = args[0].double()
    unsorted = list(args)
    unsorted[7] = args[7].flip(-1).contiguous()
    for other in (lr, q64, unsorted):
        calls.clear()
        kf.kv_attention_llvm(*other)
        assert calls == [1]


def test_eager_call_skips_the_dispatcher_but_tracers_see_the_op():
    """`kv_attention.call` (what the runtime's cache uses) runs the selected kernel directly in plain eager mode,
    with the op's result; under a dispatch mode (as export sees it) it goes through `torch.ops.edgetk.kv_attention`."""
    args = make_case(**CASES["kv4_gqa"])
    op = torch.ops.edgetk.kv_attention.default
    assert torch.equal(kva.call(*args), op(*args))

    with OpsSeen() as seen:
        kva.call(*args)
    assert op in seen.ops
