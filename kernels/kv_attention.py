"""`edgetk::kv_attention`: attention of new queries over a 2-4 bit KV cache (KVQuant, GEAR).

Packed cache layout (THE contract; fast kernels implement exactly this). Per decoder layer:
B = batch, H = KV heads, Hq = query heads (GQA: query head h reads KV head h // (Hq // H)),
T = new queries, S = cache slots (max_seq_len), D = head_dim, b = code width of keys (`key_bits`) or of
values (`value_bits`), 2..8 each, L = 2**max(key_bits, value_bits).

Slots [0, n_q) are quantized; slots [n_q, n_q + n_fp) are the fp region (recent tokens, fp16);
slots >= n_q + n_fp are never read. Slot p holds the token at position p (RoPE angle of row p).

* `q`        float32 [B, Hq, T, D]: queries, RoPE already applied.
* `k_codes`  uint8 [B, H, S, P], P = ceil(D*key_bits/8): the D key codes of slot p as ONE little-endian bit
             stream (code of channel d at bits [d*b, (d+1)*b) of the row; byte i holds bits 8i..8i+7,
             least significant bit first) = `edgetk.kernels.codebook_gemm.pack_codes(codes, b)`.
             For b=4: byte i = code(2i) | code(2i+1) << 4. For b=2: byte i = c(4i) | c(4i+1)<<2 | ...
             For b=3 codes straddle bytes (D=64 -> 24 bytes per row).
* `k_meta`   float16 [B, H, NBk, 2, D]: keys are quantized PER CHANNEL over blocks of `key_group`
             slots, BEFORE RoPE. [..., j, 0, d] = scale (half range), [..., j, 1, d] = zero (midpoint)
             of block j. Block of slot p: j = min(p // key_group, NBk - 1) (NBk = 1 means one set of
             per-channel statistics, e.g. calibrated offline, shared by every slot).
* `v_codes`  uint8 [B, H, S, Pv], Pv = ceil(D*value_bits/8): value codes, same packing as keys.
* `v_meta`   float16 [B, H, S, 2, D // value_group]: values are quantized PER TOKEN in groups of
             `value_group` channels; [..., p, 0, g] = scale, [..., p, 1, g] = zero of slot p, group g.
* `levels`   float32 [2, L]: level of each code in normalised space [-1, 1]; row 0 keys (first 2**key_bits
             entries used), row 1 values (first 2**value_bits used); the rest of a row is padding.
             Uniform quantization = torch.linspace(-1, 1, L); non-uniform levels are fit on calibration
             data (KVQuant's nuq). Dequantized:  k̂[p, d] = levels[0, code] * scale + zero   (same for v̂).
* `kv_fp`    float16 [2, B, H, C, D]: the fp region, C >= n_fp; [0, ..., i, :] = pre-RoPE key of slot
             n_q + i, [1, ..., i, :] = its value.
* `out_idx`  int32 [2, B, H, N] and `out_val` float16 [2, B, H, N]: dense-and-sparse outliers of the
             quantized region: flat index p * D + d (p < n_q) whose exact value out_val REPLACES the
             dequantized one (keys pre-RoPE); index -1 = unused entry. numel 0 = no outliers.
             `QuantKVCache` keeps each row sorted (used entries increasing, unused last); the fused
             kernel relies on that and hands unsorted rows to the reference.
* `lr_u`     float16 [2, B, H, S, r] and `lr_v` float16 [2, B, H, NBl, r, D] (GEAR low-rank error term,
             per block of `key_group` slots): k̂[p] += lr_u[0, ..., p, :] @ lr_v[0, ..., p // key_group];
             v̂ likewise with index 1. Added before outliers replace. numel 0 = no low-rank term.
* `cos`,`sin` float32 [>= S, D]: RoPE tables; the dequantized key of slot p is rotated with row p:
             k = k̂ * cos[p] + rotate_half(k̂) * sin[p], rotate_half(x) = cat(-x[D/2:], x[:D/2]).
* `mask`     bool [T, S] (True = attend): slot visibility for each query (causal or tree mask).
             Only columns < n_q + n_fp are read.

  out[b, h, t] = softmax_p( q[b,h,t] · k[b, h//rep, p] / sqrt(D)  masked ) · v̂[b, h//rep, p]

Returns float32 [B, Hq, T, D]. The fp region is attended in full precision (upcast from fp16).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import table
from .codebook_gemm import _plain_eager, pack_codes, unpack_codes

OP = "kv_attention"


def packed_bytes(head_dim: int, bits: int) -> int:
    return math.ceil(head_dim * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes [..., D] -> uint8 [..., ceil(D*bits/8)] (the layout above)."""
    if bits in (2, 4):
        per = 8 // bits
        c = codes.to(torch.int32).view(*codes.shape[:-1], -1, per)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (c << shifts).sum(-1).to(torch.uint8)
    return pack_codes(codes, bits)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [..., P] -> int64 codes [..., n]."""
    if bits in (2, 4, 8):
        per = 8 // bits
        shifts = (torch.arange(per, dtype=torch.uint8) * bits)
        c = (packed[..., None] >> shifts) & ((1 << bits) - 1)
        return c.flatten(-2)[..., :n].long()
    return unpack_codes(packed, bits, n)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def dequantize_keys(k_codes, k_meta, levels, out_idx, out_val, lr_u, lr_v, n_q: int, key_group: int,
                    key_bits: int) -> torch.Tensor:
    """Pre-RoPE keys of slots [0, n_q) as float32 [B, H, n_q, D]."""
    d = k_meta.shape[-1]
    codes = unpack(k_codes[:, :, :n_q], key_bits, d)
    nbk = k_meta.shape[2]
    blk = torch.clamp(torch.arange(n_q) // key_group, max=nbk - 1)
    meta = k_meta.float()[:, :, blk]  # [B, H, n_q, 2, D]
    k = levels[0][codes] * meta[..., 0, :] + meta[..., 1, :]
    return _corrections(k, 0, out_idx, out_val, lr_u, lr_v, n_q, key_group)


def dequantize_values(v_codes, v_meta, levels, out_idx, out_val, lr_u, lr_v, n_q: int, key_group: int,
                      value_group: int, value_bits: int) -> torch.Tensor:
    b, h, _, _, ng = v_meta.shape
    d = ng * value_group
    codes = unpack(v_codes[:, :, :n_q], value_bits, d).view(b, h, n_q, ng, value_group)
    meta = v_meta.float()[:, :, :n_q]  # [B, H, n_q, 2, G]
    v = levels[1][codes] * meta[..., 0, :, None] + meta[..., 1, :, None]
    return _corrections(v.view(b, h, n_q, d), 1, out_idx, out_val, lr_u, lr_v, n_q, key_group)


def _corrections(x, which: int, out_idx, out_val, lr_u, lr_v, n_q: int, key_group: int) -> torch.Tensor:
    if lr_u.numel() and n_q:
        blk = torch.arange(n_q) // key_group
        u = lr_u[which][:, :, :n_q].float()  # [B, H, n_q, r]
        vv = lr_v[which].float()[:, :, blk]  # [B, H, n_q, r, D]
        x = x + torch.einsum("bhpr,bhprd->bhpd", u, vv)
    if out_idx.numel() and n_q:
        b, h, _, d = x.shape
        idx = out_idx[which].long()  # [B, H, N]
        ok = (idx >= 0) & (idx < n_q * d)
        flat = x.reshape(b, h, n_q * d).clone()
        bi, hi, ni = ok.nonzero(as_tuple=True)  # only used entries write (an unused one must not touch index 0)
        flat[bi, hi, idx[bi, hi, ni]] = out_val[which][bi, hi, ni].float()
        x = flat.view(b, h, n_q, d)
    return x


def kv_attention_reference(q, k_codes, k_meta, v_codes, v_meta, levels, kv_fp, out_idx, out_val, lr_u, lr_v,
                           cos, sin, mask, n_q: int, n_fp: int, key_group: int, value_group: int,
                           key_bits: int, value_bits: int) -> torch.Tensor:
    k = dequantize_keys(k_codes, k_meta, levels, out_idx, out_val, lr_u, lr_v, n_q, key_group, key_bits)
    v = dequantize_values(v_codes, v_meta, levels, out_idx, out_val, lr_u, lr_v, n_q, key_group,
                          value_group, value_bits)
    k = torch.cat([k, kv_fp[0][:, :, :n_fp].float()], 2)
    v = torch.cat([v, kv_fp[1][:, :, :n_fp].float()], 2)
    n = n_q + n_fp
    k = k * cos[:n] + rotate_half(k) * sin[:n]
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask[:, :n])


table.register(OP, "cpu", "eager", "reference", kv_attention_reference, priority=0)


@torch.library.custom_op("edgetk::kv_attention", mutates_args=())
def kv_attention(q: torch.Tensor, k_codes: torch.Tensor, k_meta: torch.Tensor, v_codes: torch.Tensor,
                 v_meta: torch.Tensor, levels: torch.Tensor, kv_fp: torch.Tensor, out_idx: torch.Tensor,
                 out_val: torch.Tensor, lr_u: torch.Tensor, lr_v: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, mask: torch.Tensor, n_q: int, n_fp: int, key_group: int, value_group: int,
                 key_bits: int, value_bits: int) -> torch.Tensor:
    return _selected(q, k_codes, k_meta, v_codes, v_meta, levels, kv_fp, out_idx, out_val, lr_u, lr_v, cos, sin,
                     mask, n_q, n_fp, key_group, value_group, key_bits, value_bits)


def _selected(*args) -> torch.Tensor:
    """The op's CPU body: the kernel the table selects (the op itself, and `call` outside tracers)."""
    return table.select(OP, "cpu", "eager").fn(*args)


def call(q: torch.Tensor, *args) -> torch.Tensor:
    """`torch.ops.edgetk.kv_attention(q, *args)`, except that a plain eager CPU call runs the kernel the op would
    pick directly: the custom-op dispatch costs ~50 us a call on a 2-core AVX2 host, about what the fused kernel
    takes for a 256-token context, on every layer of every decoded token. Tracers always see the op."""
    if _plain_eager(q):
        return _selected(q, *args)
    return torch.ops.edgetk.kv_attention(q, *args)


@kv_attention.register_fake
def _(q, k_codes, k_meta, v_codes, v_meta, levels, kv_fp, out_idx, out_val, lr_u, lr_v, cos, sin, mask, n_q,
      n_fp, key_group, value_group, key_bits, value_bits):
    return q.new_empty(q.shape, dtype=torch.float32)


try:  # the llvmlite CPU kernel registers itself (priority 10); without llvmlite the reference serves
    from . import kv_attention_fast as _kv_attention_fast  # noqa: F401,E402
except ImportError:
    pass
