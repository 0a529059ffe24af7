"""edgetk::kv_attention: packing contract, reference vs dense attention, quantization quality, op registration."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgetk.eval import snr_db
from edgetk.kernels import kv_attention as kva
from edgetk.kernels import table
from edgetk.kernels.codebook_gemm import pack_codes
from edgetk.runtimes.kv_cache import KVCacheConfig, QuantKVCache


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_pack_matches_codebook_bitstream_and_round_trips(bits):
    codes = torch.randint(0, 2 ** bits, (2, 3, 5, 64))
    packed = kva.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == kva.packed_bytes(64, bits)
    assert torch.equal(packed, pack_codes(codes, bits))
    assert torch.equal(kva.unpack(packed, bits, 64), codes)


def _dense(q, k, v, cos, sin, mask):
    n = k.shape[2]
    k = k * cos[:n] + kva.rotate_half(k) * sin[:n]
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask[:, :n])


def _rope(s, d):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    f = torch.outer(torch.arange(s).double(), inv)
    e = torch.cat([f, f], -1)
    return e.cos().float(), e.sin().float()


def _fill(cfg, k, v):
    b, h, s, d = k.shape
    cache = QuantKVCache(cfg, b, h, s, d)
    cache.write(k, v, 0)
    return cache


def _attend(cache, q, cos, sin, mask):
    return torch.ops.edgetk.kv_attention(q, cache.k_codes, cache.k_meta, cache.v_codes, cache.v_meta, cache.levels,
                                         cache.kv_fp, cache.out_idx, cache.out_val, cache.lr_u, cache.lr_v, cos, sin,
                                         mask, cache.n_q, cache.n_fp, cache.kg, cache.vg, cache.kbits, cache.vbits)


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    s, d = 96, 32
    k = torch.randn(1, 2, s, d, generator=g) * torch.linspace(0.2, 3, d)  # channel-dependent ranges
    v = torch.randn(1, 2, s, d, generator=g)
    q = torch.randn(1, 4, 3, d, generator=g)
    cos, sin = _rope(s, d)
    mask = torch.ones(3, s, dtype=torch.bool)
    mask[0, -2:] = False
    return q, k, v, cos, sin, mask


def test_fp_region_only_equals_dense_attention(qkv):
    q, k, v, cos, sin, mask = qkv
    cache = _fill(KVCacheConfig(bits=4, key_group=16, value_group=16, fp_window=200), k, v)
    assert cache.n_q == 0 and cache.n_fp == k.shape[2]
    ref = _dense(q, k.half().float(), v.half().float(), cos, sin, mask)
    torch.testing.assert_close(_attend(cache, q, cos, sin, mask), ref, atol=1e-5, rtol=1e-5)


def test_quantized_attention_quality_orders_by_bits(qkv):
    q, k, v, cos, sin, mask = qkv
    ref = _dense(q, k, v, cos, sin, mask)
    snr = {}
    for name, cfg in {"4": KVCacheConfig(bits=4, key_group=16, value_group=16, fp_window=0, sink_tokens=0),
                      "2": KVCacheConfig(bits=2, key_group=16, value_group=16, fp_window=0, sink_tokens=0),
                      "2+gear+out": KVCacheConfig(bits=2, key_group=16, value_group=16, fp_window=0, sink_tokens=0,
                                                  gear_rank=4, outlier_frac=0.02)}.items():
        cache = _fill(cfg, k, v)
        assert cache.n_q >= 64  # most slots really are quantized
        snr[name] = snr_db(ref, _attend(cache, q, cos, sin, mask))
    assert snr["4"] > 20, snr
    assert snr["4"] > snr["2"] + 6, snr
    assert snr["2+gear+out"] > snr["2"] + 1, snr


def test_dequantized_keys_match_codes_and_outliers_replace(qkv):
    _, k, v, *_ = qkv
    cfg = KVCacheConfig(bits=4, key_group=16, value_group=16, fp_window=0, sink_tokens=1)
    cache = _fill(cfg, k, v)
    kd = kva.dequantize_keys(cache.k_codes, cache.k_meta, cache.levels, cache.out_idx, cache.out_val, cache.lr_u,
                             cache.lr_v, cache.n_q, cache.kg, cache.kbits)
    # the attention sink (slot 0) is stored exactly (fp16) through the sparse entries
    torch.testing.assert_close(kd[:, :, 0], k[:, :, 0].half().float())
    step = 2 * cache.k_meta[:, :, 1:2, 0].float() / 15  # uniform 4-bit step of block 1
    err = (kd[:, :, 16:32] - k[:, :, 16:32]).abs()
    assert bool((err <= step / 2 + 1e-3).all())
    # unused sparse entries (-1, room left for outliers) must not disturb flat index 0 (the sink's first channel)
    pad = torch.full((*cache.out_idx.shape[:3], 5), -1, dtype=torch.int32)
    idx, val = torch.cat([cache.out_idx, pad], -1), torch.cat([cache.out_val, pad.half()], -1)
    kd = kva.dequantize_keys(cache.k_codes, cache.k_meta, cache.levels, idx, val, cache.lr_u, cache.lr_v, cache.n_q,
                             cache.kg, cache.kbits)
    torch.testing.assert_close(kd[:, :, 0], k[:, :, 0].half().float())


def test_op_is_in_kernel_table_and_has_fake_impl(qkv):
    assert table.select("kv_attention", "cpu", "eager").name in {e.name for e in table.entries("kv_attention")}
    assert "reference" in {e.name for e in table.entries("kv_attention")}
    q, k, v, cos, sin, mask = qkv
    cache = _fill(KVCacheConfig(bits=3, key_group=16, value_group=16, fp_window=8), k, v)
    args = (q, cache.k_codes, cache.k_meta, cache.v_codes, cache.v_meta, cache.levels, cache.kv_fp, cache.out_idx,
            cache.out_val, cache.lr_u, cache.lr_v, cos, sin, mask, cache.n_q, cache.n_fp, cache.kg, cache.vg, 3, 3)
    torch.library.opcheck(torch.ops.edgetk.kv_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def _causal(p0, t, s):
    pos = torch.arange(p0, p0 + t)[:, None]
    return torch.arange(s)[None, :] <= pos


def test_prefill_chunk_longer_than_fp_region_is_attended_exactly_then_quantized(qkv):
    """A write that overflows the fp region: its queries see earlier tokens as stored and their own chunk in
    fp16; afterwards the cache holds exactly what `write` would have stored."""
    q, k, v, cos, sin, _ = qkv
    cfg = KVCacheConfig(bits=4, key_group=16, value_group=16, fp_window=8)  # fp region: 24 slots
    b, h, s, d = k.shape
    cache, ref_cache = QuantKVCache(cfg, b, h, s, d), QuantKVCache(cfg, b, h, s, d)
    q1 = torch.randn(1, 4, 32, d, generator=torch.Generator().manual_seed(1))
    # chunk 1 (slots 0..31): nothing is quantized before it, so it is plain causal attention in fp16
    y = cache.attend(q1, k[:, :, :32], v[:, :, :32], torch.arange(32), cos, sin, _causal(0, 32, s))
    torch.testing.assert_close(y, _dense(q1, k[:, :, :32].half().float(), v[:, :, :32].half().float(), cos, sin,
                                         _causal(0, 32, s)), atol=1e-5, rtol=1e-5)
    ref_cache.write(k[:, :, :32], v[:, :, :32], 0)
    assert (cache.n_q, cache.n_fp) == (ref_cache.n_q, ref_cache.n_fp) == (16, 16)
    for name in ("k_codes", "k_meta", "v_codes", "v_meta", "kv_fp"):
        assert torch.equal(getattr(cache, name), getattr(ref_cache, name)), name
    # chunk 2 (slots 32..63): quantized block [0, 16) as stored, the rest exact
    n_q = cache.n_q
    y2 = cache.attend(q1, k[:, :, 32:64], v[:, :, 32:64], torch.arange(32, 64), cos, sin, _causal(32, 32, s))
    e = torch.empty(0)
    kd = kva.dequantize_keys(ref_cache.k_codes, ref_cache.k_meta, ref_cache.levels, ref_cache.out_idx,
                             ref_cache.out_val, e, e, n_q, cfg.key_group, 4)
    vd = kva.dequantize_values(ref_cache.v_codes, ref_cache.v_meta, ref_cache.levels, ref_cache.out_idx,
                               ref_cache.out_val, e, e, n_q, cfg.key_group, 16, 4)
    kk = torch.cat([kd, k[:, :, n_q:64].half().float()], 2)
    vv = torch.cat([vd, v[:, :, n_q:64].half().float()], 2)
    torch.testing.assert_close(y2, _dense(q1, kk, vv, cos, sin, _causal(32, 32, s)), atol=1e-5, rtol=1e-5)
    assert cache.n_q == 48 and cache.n_fp == 16


def test_unequal_key_value_widths_and_value_rotation(qkv):
    q, k, v, cos, sin, mask = qkv
    base = dict(key_group=16, value_group=16, fp_window=0, sink_tokens=0)
    # value rotation alone is exact algebra: with everything in the fp region it is plain attention
    rot = _fill(KVCacheConfig(bits=4, value_rotation=True, **{**base, "fp_window": 200}), k, v)
    assert rot.n_q == 0
    y = rot.attend(q, k, v, torch.arange(k.shape[2]), cos, sin, mask)
    torch.testing.assert_close(y, _dense(q, k, v, cos, sin, mask), atol=2e-3, rtol=2e-3)
    # keys 5 bits, values 3: codes are packed at their own widths, the key error bound is 32 levels'
    mixed = _fill(KVCacheConfig(bits=4, key_bits=5, value_bits=3, **base), k, v)
    assert mixed.k_codes.shape[-1] == kva.packed_bytes(k.shape[-1], 5)
    assert mixed.v_codes.shape[-1] == kva.packed_bytes(k.shape[-1], 3)
    four = _fill(KVCacheConfig(bits=4, **base), k, v)
    # 5 + 3 bits cost what 4 + 4 do; only the levels table grows (32 key levels)
    assert mixed.nbytes - mixed.levels.nbytes == four.nbytes - four.levels.nbytes
    kd = kva.dequantize_keys(mixed.k_codes, mixed.k_meta, mixed.levels, mixed.out_idx, mixed.out_val, mixed.lr_u,
                             mixed.lr_v, mixed.n_q, mixed.kg, 5)
    step = 2 * mixed.k_meta[:, :, 1:2, 0].float() / 31
    assert bool(((kd[:, :, 16:32] - k[:, :, 16:32]).abs() <= step / 2 + 1e-3).all())
    ref = _dense(q, k, v, cos, sin, mask)
    snr = {name: snr_db(ref, _attend(c, q, cos, sin, mask)) for name, c in (("k5v3", mixed), ("k4v4", four))}
    k2v6 = _fill(KVCacheConfig(bits=4, key_bits=2, value_bits=6, **base), k, v)
    snr["k2v6"] = snr_db(ref, _attend(k2v6, q, cos, sin, mask))
    assert snr["k5v3"] > 15 and snr["k4v4"] > 15 and snr["k2v6"] < snr["k4v4"] - 3, snr
    with pytest.raises(Exception, match="key_bits"):
        KVCacheConfig(key_bits=9)
    with pytest.raises(Exception, match="power-of-two"):
        QuantKVCache(KVCacheConfig(value_rotation=True), 1, 2, 32, 24)


@pytest.mark.parametrize("cfg", [KVCacheConfig(bits=4, key_group=16, value_group=16, fp_window=8),
                                 KVCacheConfig(bits=4, key_bits=5, value_bits=3, key_group=8, fp_window=4,
                                               sink_tokens=2, outlier_frac=0.01)])
def test_decode_writes_straight_to_the_fp_region_same_as_the_general_path(qkv, cfg, monkeypatch):
    """A decode step's write goes straight into the fp region when nothing is quantized first (`_append`); a
    cache fed token by token (prompt, single tokens, a 3-token draft, a rewrite after rejected drafts, flushes)
    then holds exactly what the general stage-and-store path leaves, and attends alike."""
    q, k, v, cos, sin, _ = qkv
    b, h, s, d = k.shape
    fast, slow = QuantKVCache(cfg, b, h, s, d), QuantKVCache(cfg, b, h, s, d)
    monkeypatch.setattr(slow, "_append", lambda *a: False)
    taken = []
    real = fast._append
    monkeypatch.setattr(fast, "_append", lambda *a: taken.append(real(*a)) or taken[-1])
    steps = [(0, 5)] + [(p, 1) for p in range(5, 40)] + [(40, 3), (41, 1)] + [(p, 1) for p in range(42, 70)]
    for p0, t in steps:
        qq = q[:, :, :1].expand(b, q.shape[1], t, d).contiguous()
        mask = _causal(p0, t, s)
        y = fast.attend(qq, k[:, :, p0:p0 + t], v[:, :, p0:p0 + t], torch.arange(p0, p0 + t), cos, sin, mask)
        y_ref = slow.attend(qq, k[:, :, p0:p0 + t], v[:, :, p0:p0 + t], torch.arange(p0, p0 + t), cos, sin, mask)
        assert torch.equal(y, y_ref)
        assert (fast.n_q, fast.n_fp) == (slow.n_q, slow.n_fp)
        for name in ("k_codes", "k_meta", "v_codes", "v_meta", "out_idx", "out_val"):
            assert torch.equal(getattr(fast, name), getattr(slow, name)), name
        assert torch.equal(fast.kv_fp[:, :, :, :fast.n_fp], slow.kv_fp[:, :, :, :slow.n_fp])
    assert sum(taken) > len(steps) // 2 and not all(taken)  # most steps appended, the flushes took the long way


def test_sparse_rows_checked_again_after_every_write():
    """The fused kernel's check that sparse rows are sorted is remembered per tensor only until the tensor
    is written: an in-place write that unsorts a row sends the next call to the reference."""
    from edgetk.kernels import kv_attention_fast as kf

    idx = torch.tensor([[[[3, 9, -1]]], [[[1, 2, 5]]]], dtype=torch.int32)
    assert kf._sparse_sorted(idx) and kf._sparse_sorted(idx)
    idx[1, 0, 0, 2] = 0  # 1, 2, 0: unsorted
    assert not kf._sparse_sorted(idx)
    idx[1, 0, 0].fill_(-1)
    assert kf._sparse_sorted(idx)
    with torch.inference_mode():  # no version counter: checked every time
        inf = idx.clone()
        assert kf._sparse_sorted(inf)
        inf[0, 0, 0, 0] = 10
        assert not kf._sparse_sorted(inf)


@pytest.mark.parametrize("cfg", [
    KVCacheConfig(bits=4, key_group=16, value_group=16, fp_window=8),
    KVCacheConfig(bits=4, key_bits=5, value_bits=3, key_group=8, fp_window=4, sink_tokens=10, outlier_frac=0.01),
    KVCacheConfig(bits=2, key_group=8, value_group=16, fp_window=4, outlier_frac=0.02, gear_rank=2),
    KVCacheConfig(bits=3, key_group=16, value_group=8, fp_window=0, value_rotation=True, sink_tokens=1)])
def test_long_prefill_flushes_its_blocks_at_once_as_one_by_one(qkv, cfg):
    """A write longer than the fp region quantizes all its overflowing blocks in one `_flush` (per-block key
    statistics, outliers in slot order, sinks' block alone, GEAR per block): the cache holds exactly what
    flushing them one block at a time stores."""
    _, k, v, _, _, _ = qkv
    b, h, s, d = k.shape
    batched, single = QuantKVCache(cfg, b, h, s, d), QuantKVCache(cfg, b, h, s, d)
    batched.write(k, v, 0)
    pending = single._stage(k, v, 0)
    while pending.shape[3] > single.capacity:
        pending = single._flush_front(pending)
    single.kv_fp[:, :, :, : pending.shape[3]] = pending
    single.n_fp = pending.shape[3]
    assert batched.n_q == single.n_q > 4 * cfg.key_group and batched.n_fp == single.n_fp
    for name in ("k_codes", "k_meta", "v_codes", "v_meta", "out_idx", "out_val", "lr_u", "lr_v", "kv_fp"):
        x, y = getattr(batched, name), getattr(single, name)
        assert torch.equal(x, y) or (name in ("lr_u", "lr_v")  # (batched SVDs: the same to fp16 rounding)
                                     and torch.allclose(x.float(), y.float(), atol=2e-3)), name
