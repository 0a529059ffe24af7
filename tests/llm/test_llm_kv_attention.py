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


@pytest.mark.parametrize("bits", [2, 3, 4])
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
                                         mask, cache.n_q, cache.n_fp, cache.kg, cache.vg, cache.bits)


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
                             cache.lr_v, cache.n_q, cache.kg, cache.bits)
    # the attention sink (slot 0) is stored exactly (fp16) through the sparse entries
    torch.testing.assert_close(kd[:, :, 0], k[:, :, 0].half().float())
    step = 2 * cache.k_meta[:, :, 1:2, 0].float() / 15  # uniform 4-bit step of block 1
    err = (kd[:, :, 16:32] - k[:, :, 16:32]).abs()
    assert bool((err <= step / 2 + 1e-3).all())


def test_op_is_in_kernel_table_and_has_fake_impl(qkv):
    assert table.select("kv_attention", "cpu", "eager").name in {e.name for e in table.entries("kv_attention")}
    assert "reference" in {e.name for e in table.entries("kv_attention")}
    q, k, v, cos, sin, mask = qkv
    cache = _fill(KVCacheConfig(bits=3, key_group=16, value_group=16, fp_window=8), k, v)
    args = (q, cache.k_codes, cache.k_meta, cache.v_codes, cache.v_meta, cache.levels, cache.kv_fp, cache.out_idx,
            cache.out_val, cache.lr_u, cache.lr_v, cos, sin, mask, cache.n_q, cache.n_fp, cache.kg, cache.vg, 3)
    torch.library.opcheck(torch.ops.edgetk.kv_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))
