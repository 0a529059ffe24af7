"""`edgetk::blockwise_gemm`: y = x · Wᵀ + bias with W stored as scalar low-bit codes per block of input columns
(the RTN baseline's format, `edgetk.compress.rtn.RTNLinear`).

Storage, for a weight W [out_features, in_features] with blocks of `group` input columns:

* `codes`  uint8 [out_features, n_groups * group * bits / 8]: each row's codes as a little-endian bit
           stream (`pack_codes`), n_groups = ceil(in_features / group); the tail of the last block is
           padding. Row-major blocks of `group * bits / 8` bytes: exactly onnxruntime's
           `com.microsoft.MatMulNBits` B layout [N, n_blocks, blob_size] once reshaped, so the ONNX exporter
           emits that native node for bits 2 and 4 (see `native_onnx`).
* `scale`, `lo`  float16 [out_features, n_groups]: w = lo + scale * q (asymmetric min-max); MatMulNBits'
           float zero point is zp = -lo / scale, since it computes (q - zp) * scale.
* `bias`   float16 [out_features] or empty.

The reference de-quantizes the weight (this is a baseline format; the codebook formats have the LUT
kernels), unpacking with arithmetic rather than shifts so that RTNLinear's plain path (formats MatMulNBits
does not take) traces into ops every exporter has.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import table
from .codebook_gemm import unpack_codes_arith

OP = "blockwise_gemm"


def native_onnx(bits: int, group: int) -> bool:
    """True if onnxruntime's CPU MatMulNBits runs this format (bits 2/4, power-of-two blocks >= 16; its 8-bit
    kernel takes no float zero points)."""
    return bits in (2, 4) and group >= 16 and group & (group - 1) == 0


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, in_features: int, bits: int,
               group: int) -> torch.Tensor:
    out_f, n_groups = scale.shape
    q = unpack_codes_arith(codes, bits, n_groups * group).view(out_f, n_groups, group)
    w = lo.float()[..., None] + scale.float()[..., None] * q.float()
    return w.view(out_f, -1)[:, :in_features]


def blockwise_gemm_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                             bias: torch.Tensor, in_features: int, bits: int, group: int) -> torch.Tensor:
    w = dequantize(codes, scale, lo, in_features, bits, group).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias.numel() else None)


table.register(OP, "cpu", "eager", "reference", blockwise_gemm_reference, priority=0)


@torch.library.custom_op("edgetk::blockwise_gemm", mutates_args=())
def blockwise_gemm(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor,
                   bias: torch.Tensor, in_features: int, bits: int, group: int) -> torch.Tensor:
    impl = table.select(OP, "cpu", "eager").fn
    return impl(x, codes, scale, lo, bias, in_features, bits, group)


@blockwise_gemm.register_fake
def _(x, codes, scale, lo, bias, in_features, bits, group):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))
