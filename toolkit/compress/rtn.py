"""Scalar round-to-nearest (RTN) group-wise weight quantization: the baseline every VQ report shows beside it.

Each output row is split into groups of `group` input columns; a group stores `bits`-bit codes and an
fp16 (scale, minimum) pair (asymmetric min-max): w ≈ lo + scale * q, q in [0, 2**bits). Storage per weight:
bits + 32 / group (2-bit g64: 2.5 bpw, g32: 3.0 bpw). `RTNLinear` keeps the packed codes (layout:
kernels/blockwise_gemm.py). For bits 2/4 with power-of-two groups its forward is the custom op
`edgetk::blockwise_gemm`, which the ONNX exporter writes as onnxruntime's native `com.microsoft.MatMulNBits`
(ExecuTorch and TVM take its core-ATen decomposition); other formats de-quantize in plain PyTorch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgetk.kernels import blockwise_gemm as bwg
from edgetk.kernels.codebook_gemm import pack_codes

from ..compressed import MODULE_TYPES, ModuleType
from ..config import Config, check, config
from ..progress import track
from . import CompressionReport, LayerReport, register_method, register_preset
from .calib import check_finite, param_count, set_module, weight_totals


@config("rtn", version=1)
@dataclass(frozen=True)
class RTNConfig(Config):
    bits: int = 2
    group: int = 64
    skip: tuple = ("lm_head",)  # module-name suffixes kept in full precision
    needs_calibration = False

    def validate(self) -> None:
        check(self.bits in (2, 3, 4, 8), "bits", self.bits, "one of 2, 3, 4, 8")
        check(self.group >= 4, "group", self.group, ">= 4")


class RTNLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group: int, has_bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.n_groups = math.ceil(in_features / group)
        row_bytes = math.ceil(self.n_groups * group * bits / 8)
        self.register_buffer("codes", torch.zeros(out_features, row_bytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(out_features, self.n_groups, dtype=torch.float16))
        self.register_buffer("lo", torch.zeros(out_features, self.n_groups, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features if has_bias else 0, dtype=torch.float16))

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None, bits: int, group: int) -> "RTNLinear":
        out_f, in_f = w.shape
        m = cls(in_f, out_f, bits, group, bias is not None)
        pad = m.n_groups * group - in_f
        wg = F.pad(w.float(), (0, pad), value=0.0).view(out_f, m.n_groups, group)
        if pad:  # the padded tail of the last group must not widen its range
            last = w[:, (m.n_groups - 1) * group:].float()
            wg[:, -1, group - pad:] = last.mean(1, keepdim=True)
        lo, hi = wg.amin(-1), wg.amax(-1)
        levels = 2 ** bits - 1
        scale = ((hi - lo) / levels).clamp_min(1e-8).half()
        lo_h = lo.half()
        q = torch.round((wg - lo_h.float()[..., None]) / scale.float()[..., None]).clamp(0, levels)
        with torch.no_grad():
            m.codes.copy_(pack_codes(q.view(out_f, -1).long(), bits))
            m.scale.copy_(scale)
            m.lo.copy_(lo_h)
            if bias is not None:
                m.bias.copy_(bias.half())
        return m

    def dequantize(self) -> torch.Tensor:
        return bwg.dequantize(self.codes, self.scale, self.lo, self.in_features, self.bits, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bwg.native_onnx(self.bits, self.group):
            return torch.ops.edgetk.blockwise_gemm(x, self.codes, self.scale, self.lo, self.bias, self.in_features,
                                                   self.bits, self.group)
        return bwg.blockwise_gemm_reference(x, self.codes, self.scale, self.lo, self.bias, self.in_features,
                                            self.bits, self.group)

    def storage_bits(self) -> int:
        return sum(b.numel() * b.element_size() * 8 for b in self.buffers())


MODULE_TYPES.register("RTNLinear", ModuleType(
    RTNLinear,
    lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits, "group": m.group,
               "bias": bool(m.bias.numel())},
    lambda s: RTNLinear(s["in_features"], s["out_features"], s["bits"], s["group"], s["bias"])))


def _targets(model: nn.Module, skip: tuple) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules()
            if type(m) is nn.Linear and not any(n == s or n.endswith("." + s) for s in skip)]


@register_method(RTNConfig)
def apply_rtn(loaded, cfg: RTNConfig, calib=None) -> CompressionReport:
    model = loaded.model
    n_params = param_count(model)
    report = CompressionReport("rtn", cfg.to_dict())
    targets = _targets(model, cfg.skip)
    for name, lin in targets:
        check_finite(name, lin.weight)
    q_bits = q_weights = 0
    for name, lin in track(targets, f"rtn{cfg.bits}-g{cfg.group}"):
        t0 = time.perf_counter()
        q = RTNLinear.quantize(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(),
                               cfg.bits, cfg.group)
        err = ((q.dequantize() - lin.weight.float()).norm() / lin.weight.float().norm().clamp_min(1e-12)).item()
        set_module(model, name, q)
        bits, n = q.storage_bits(), lin.weight.numel()
        q_bits, q_weights = q_bits + bits, q_weights + n
        pad = q.n_groups * cfg.group - lin.in_features
        report.layers.append(LayerReport(name, "rtn", tuple(lin.weight.shape), rel_error=err,
                                         bits_per_weight=bits / n, seconds=time.perf_counter() - t0,
                                         note=f"padded {pad} columns in last group" if pad else "weight error"))
    report.totals = weight_totals(model, n_params, q_bits, q_weights)
    return report


register_preset("rtn2-g32", RTNConfig(bits=2, group=32),
                description="baseline: scalar RTN 2-bit, groups of 32 (fp16 scale+min: 3.0 bpw)")
register_preset("rtn2-g64", RTNConfig(bits=2, group=64),
                description="baseline: scalar RTN 2-bit, groups of 64 (fp16 scale+min: 2.5 bpw)")
register_preset("rtn3-g64", RTNConfig(bits=3, group=64),
                description="baseline: scalar RTN 3-bit, groups of 64 (3.5 bpw)")
