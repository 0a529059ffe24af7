"""`edgetk::codebook_gemm`: y = x · Wᵀ with W stored as codebook indices (VPTQ / AQLM / JLCM).

Storage (`CodebookFormat` + tensors), for a weight W [out_features, in_features]:

* `perm`       int64 [in_features] or empty: input-column order. x is read as xp = x[..., perm].
               The first `n_outliers` permuted columns are outlier columns kept dense (fp16/fp32) in
               `outlier_w` [out_features, n_outliers]; the rest (in_q = in_features - n_outliers
               columns) are vector-quantized. Empty perm = identity and no outliers.
* `codes`      uint8 [stages, out_features, row_bytes]: for each residual stage and output row, the
               n_vec = ceil(in_q / vec_len) codes of that row as a little-endian bit stream of
               `code_bits` bits each (code j occupies bits [j*code_bits, (j+1)*code_bits)). For
               code_bits 8 this is one byte per code; for 16, two bytes (little-endian).
               The last vector of a row is zero-padded when in_q is not a multiple of vec_len.
* `codebooks`  float [stages, groups, K, vec_len], K <= 2**code_bits. Output row r uses group
               r // (out_features // groups) (groups of output channels share a codebook).
* `scale`      float [out_features] or empty: per-output-channel scale applied to the VQ + outlier sum.
* `bias`       float [out_features] or empty.

  y = scale ⊙ (xp[:, :n_out] · outlier_wᵀ + Σ_stages Σ_j codebook[s, g(r), code[s, r, j]] · xp_vec_j) + bias

The reference below never builds the dense W: it is a lookup-table GEMV (per input vector j and
group, the dot products of x_j with every codeword; then for each row a gather-and-sum over its
codes). Rows are processed in chunks so memory stays bounded for large batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from edgetk.config import Config, check, config

from . import table

OP = "codebook_gemm"


@config("codebook_format", version=1)
@dataclass(frozen=True)
class CodebookFormat(Config):
    out_features: int
    in_features: int
    vec_len: int = 4
    code_bits: int = 8
    codebook_size: int = 256
    stages: int = 1
    groups: int = 1
    n_outliers: int = 0
    has_scale: bool = False
    has_bias: bool = False
    codebook_dtype: str = "float16"

    def validate(self) -> None:
        check(self.out_features > 0, "out_features", self.out_features, "> 0")
        check(self.in_features > self.n_outliers >= 0, "n_outliers", self.n_outliers,
              f"in [0, in_features={self.in_features})")
        check(1 <= self.vec_len <= 32, "vec_len", self.vec_len, "in [1, 32]")
        check(1 <= self.code_bits <= 16, "code_bits", self.code_bits, "in [1, 16]")
        check(2 <= self.codebook_size <= 2 ** self.code_bits, "codebook_size", self.codebook_size,
              f"in [2, 2**code_bits={2 ** self.code_bits}]")
        check(self.stages >= 1, "stages", self.stages, ">= 1")
        check(self.groups >= 1 and self.out_features % self.groups == 0, "groups", self.groups,
              f"a divisor of out_features={self.out_features}")
        check(self.codebook_dtype in ("float16", "float32", "bfloat16"), "codebook_dtype", self.codebook_dtype,
              "float16, bfloat16 or float32")

    @property
    def in_q(self) -> int:
        return self.in_features - self.n_outliers

    @property
    def n_vec(self) -> int:
        return math.ceil(self.in_q / self.vec_len)

    @property
    def row_bytes(self) -> int:
        return math.ceil(self.n_vec * self.code_bits / 8)

    def storage_bits(self) -> int:
        """Every bit stored for this layer: codes, codebooks, outliers, perm, scale, bias."""
        cb_bits = torch.finfo(getattr(torch, self.codebook_dtype)).bits
        bits = self.stages * self.out_features * self.row_bytes * 8
        bits += self.stages * self.groups * self.codebook_size * self.vec_len * cb_bits
        bits += self.out_features * self.n_outliers * 16
        bits += (self.in_features * 16) if self.n_outliers else 0  # perm fits int16 for in < 32768
        bits += (self.out_features * 16) if self.has_scale else 0
        bits += (self.out_features * 16) if self.has_bias else 0
        return bits

    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.out_features * self.in_features)


# -- bit packing ------------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, code_bits: int) -> torch.Tensor:
    """int codes [..., n] (values < 2**code_bits) -> uint8 [..., ceil(n*code_bits/8)] little-endian bits."""
    if code_bits == 8:
        return codes.to(torch.uint8).contiguous()
    if code_bits == 16:
        c = codes.to(torch.int32)
        return torch.stack([(c & 0xFF), (c >> 8) & 0xFF], -1).flatten(-2).to(torch.uint8).contiguous()
    n = codes.shape[-1]
    shifts = torch.arange(code_bits, dtype=torch.int64)
    bits = ((codes.to(torch.int64)[..., None] >> shifts) & 1).flatten(-2)  # [..., n*code_bits]
    pad = (-bits.shape[-1]) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = 1 << torch.arange(8, dtype=torch.int64)
    out = (bits.view(*bits.shape[:-1], -1, 8) * weights).sum(-1)
    assert out.shape[-1] == math.ceil(n * code_bits / 8)
    return out.to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, code_bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes -> int64 [..., n]."""
    if code_bits == 8:
        return packed[..., :n].to(torch.int64)
    if code_bits == 16:
        p = packed.to(torch.int64).view(*packed.shape[:-1], -1, 2)
        return (p[..., 0] | (p[..., 1] << 8))[..., :n]
    bits = ((packed.to(torch.int64)[..., None] >> torch.arange(8, dtype=torch.int64)) & 1).flatten(-2)
    bits = bits[..., : n * code_bits].view(*packed.shape[:-1], n, code_bits)
    return (bits << torch.arange(code_bits, dtype=torch.int64)).sum(-1)


def unpack_codes_arith(packed: torch.Tensor, code_bits: int, n: int) -> torch.Tensor:
    """unpack_codes with floor-division instead of shifts (shifts are not core ATen), traceable by every exporter:
    int32 positions (TVM's importer types Python-int constants as int32 and rejects int64 x int32) and float
    powers of two (TVM has no integer power); exact, the values stay below 2**16."""
    if code_bits == 8:
        return packed[..., :n].to(torch.int64)
    bit = torch.arange(n * code_bits, dtype=torch.int32)
    byte = packed.to(torch.float32)[..., (bit // 8).to(torch.int64)]
    bits = torch.floor(byte / torch.pow(2.0, (bit % 8).to(torch.float32))).remainder(2.0)
    weights = torch.pow(2.0, torch.arange(code_bits, dtype=torch.int32).to(torch.float32))
    return (bits.reshape(*packed.shape[:-1], n, code_bits) * weights).sum(-1).to(torch.int64)


# -- reference ------------------------------------------------------------------------------------
def _split_input(x: torch.Tensor, perm: torch.Tensor, n_out: int, in_q: int, n_vec: int, vec_len: int):
    xp = x.index_select(-1, perm) if perm.numel() else x
    x_out, x_q = xp[..., :n_out], xp[..., n_out:]
    pad = n_vec * vec_len - in_q
    if pad:
        x_q = torch.nn.functional.pad(x_q, (0, pad))
    return x_out, x_q.reshape(*x_q.shape[:-1], n_vec, vec_len)


def codebook_gemm_reference(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor,
                            outlier_w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, in_features: int,
                            vec_len: int, code_bits: int) -> torch.Tensor:
    stages, out_f, _ = codes.shape
    groups = codebooks.shape[1]
    n_out = outlier_w.shape[1] if outlier_w.numel() else 0
    in_q = in_features - n_out
    n_vec = math.ceil(in_q / vec_len)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    b = x2.shape[0]
    x_out, xv = _split_input(x2, perm, n_out, in_q, n_vec, vec_len)  # xv [B, n_vec, v]
    rows_per_group = out_f // groups
    y = x2.new_zeros(b, out_f)
    # bound the LUT (B x n_vec x K floats per group/stage) and the gathered block to ~64 MB
    row_chunk = max(1, min(rows_per_group, (16 << 20) // max(1, b * n_vec)))
    j_idx = torch.arange(n_vec)
    for s in range(stages):
        idx = unpack_codes(codes[s], code_bits, n_vec)  # [out, n_vec]
        for g in range(groups):
            lut = torch.einsum("bjv,kv->bjk", xv, codebooks[s, g].to(x.dtype))  # [B, n_vec, K]
            lut_t = lut.permute(1, 2, 0)  # [n_vec, K, B]
            for r0 in range(g * rows_per_group, (g + 1) * rows_per_group, row_chunk):
                r1 = min(r0 + row_chunk, (g + 1) * rows_per_group)
                picked = lut_t[j_idx[None, :], idx[r0:r1]]  # [rows, n_vec, B]
                y[:, r0:r1] += picked.sum(1).T
    return epilogue(y, x_out, outlier_w, scale, bias).reshape(*lead, out_f)


def epilogue(y: torch.Tensor, x_out: torch.Tensor, outlier_w: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor) -> torch.Tensor:
    """The dense tail every implementation shares: + outlier columns, x per-row scale, + bias (in y's dtype)."""
    if outlier_w.numel():
        y = y + x_out @ outlier_w.to(y.dtype).T
    if scale.numel():
        y = y * scale.to(y.dtype)
    if bias.numel():
        y = y + bias.to(y.dtype)
    return y


def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor, outlier_w: torch.Tensor,
               scale: torch.Tensor, in_features: int, vec_len: int, code_bits: int) -> torch.Tensor:
    """The dense W [out, in] (tests and quality analysis only; never on the inference path)."""
    stages, out_f, _ = codes.shape
    groups = codebooks.shape[1]
    n_out = outlier_w.shape[1] if outlier_w.numel() else 0
    in_q = in_features - n_out
    n_vec = math.ceil(in_q / vec_len)
    g_of_row = torch.arange(out_f) // (out_f // groups)
    wq = torch.zeros(out_f, n_vec, vec_len, dtype=torch.float32)
    for s in range(stages):
        idx = unpack_codes(codes[s], code_bits, n_vec)
        wq += codebooks[s].float()[g_of_row[:, None], idx]
    wp = torch.cat([outlier_w.float().reshape(out_f, n_out), wq.reshape(out_f, -1)[:, :in_q]], 1)
    w = torch.empty_like(wp)
    if perm.numel():
        w[:, perm] = wp
    else:
        w = wp
    if scale.numel():
        w = w * scale.float()[:, None]
    return w


table.register(OP, "cpu", "eager", "reference", codebook_gemm_reference, priority=0)


@torch.library.custom_op("edgetk::codebook_gemm", mutates_args=())
def codebook_gemm(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor,
                  outlier_w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, in_features: int,
                  vec_len: int, code_bits: int) -> torch.Tensor:
    return _selected(x, codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits)


def _selected(*args) -> torch.Tensor:
    """The op's CPU body: the kernel the table selects (the op itself, and `call` outside tracers)."""
    return table.select(OP, "cpu", "eager").fn(*args)


@codebook_gemm.register_fake
def _(x, codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits):
    return x.new_empty((*x.shape[:-1], codes.shape[1]))


def _plain_eager(x: torch.Tensor) -> bool:
    """True for a real CPU tensor outside every tracer (export, compile, jit, dispatch modes) and autograd."""
    return (type(x) is torch.Tensor and x.is_cpu and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None and not torch._C._functorch.is_functorch_wrapped_tensor(x))


def call(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, perm: torch.Tensor, outlier_w: torch.Tensor,
         scale: torch.Tensor, bias: torch.Tensor, in_features: int, vec_len: int, code_bits: int) -> torch.Tensor:
    """`torch.ops.edgetk.codebook_gemm`, except that a plain eager CPU call runs the kernel the op would pick directly:
    the custom-op dispatch costs ~25-45 us a call here, more than a 576x576 GEMV. Tracers always see the op."""
    args = (x, codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits)
    if _plain_eager(x):
        return _selected(*args)
    return torch.ops.edgetk.codebook_gemm(*args)


try:  # the llvmlite CPU kernel registers itself (priority 10); without llvmlite the reference serves
    from . import llvm_codebook as _llvm_codebook  # noqa: F401,E402
except ImportError:
    pass
