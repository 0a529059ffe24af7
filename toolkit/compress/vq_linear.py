"""`VQLinear`: a drop-in `nn.Linear` whose weight is stored as codebook indices (VPTQ / AQLM / JLCM).

Buffers follow the packed layout of `edgetk.kernels.codebook_gemm` (see its docstring):

* `codes`     uint8   [stages, out, row_bytes]   codes packed to `code_bits` bits, little-endian
* `codebooks` float16 [stages, groups, K, vec_len]
* `perm`      int16   [in] or empty              input-column order (first `n_outliers` are outliers);
                                                  stored as int16 on disk, widened to int64 for the op
* `outlier_w` float16 [out, n_outliers] or empty
* `scale`     float16 [out] or empty
* `bias`      float16 [out] or empty

`forward` calls `torch.ops.edgetk.codebook_gemm` (a LUT-GEMV at batch 1; no dense weight); plain eager CPU calls
skip the custom-op dispatch and run the kernel the op would pick (`codebook_gemm.call`); tracers see the op.
`dequantize()` builds the dense weight and exists for tests and quality analysis only.
`CodebookFormat.storage_bits()` counts exactly what these buffers hold (perm counted at 16 bits).
"""
from __future__ import annotations

import torch
from torch import nn

from edgetk.kernels import codebook_gemm as cg
from edgetk.kernels.codebook_gemm import CodebookFormat

from ..compressed import MODULE_TYPES, ModuleType

_EMPTY_F = torch.zeros(0, dtype=torch.float16)


class VQLinear(nn.Module):
    def __init__(self, fmt: CodebookFormat):
        super().__init__()
        self.fmt = fmt
        f = fmt
        self.in_features, self.out_features = f.in_features, f.out_features
        cb_dtype = getattr(torch, f.codebook_dtype)
        self.register_buffer("codes", torch.zeros(f.stages, f.out_features, f.row_bytes, dtype=torch.uint8))
        self.register_buffer("codebooks", torch.zeros(f.stages, f.groups, f.codebook_size, f.vec_len,
                                                      dtype=cb_dtype))
        self.register_buffer("perm", torch.arange(f.in_features, dtype=torch.int16) if f.n_outliers
                             else torch.zeros(0, dtype=torch.int16))
        # int64 copy of perm for the op (not saved: rebuilt from `perm` on load)
        self.register_buffer("perm_i64", self.perm.to(torch.int64), persistent=False)
        self.register_load_state_dict_post_hook(lambda mod, keys: mod._sync_perm())
        self.register_buffer("outlier_w", torch.zeros(f.out_features, f.n_outliers, dtype=torch.float16)
                             if f.n_outliers else _EMPTY_F.clone())
        self.register_buffer("scale", torch.ones(f.out_features, dtype=torch.float16) if f.has_scale
                             else _EMPTY_F.clone())
        self.register_buffer("bias", torch.zeros(f.out_features, dtype=torch.float16) if f.has_bias
                             else _EMPTY_F.clone())

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_parts(cls, fmt: CodebookFormat, codes: torch.Tensor, codebooks: torch.Tensor,
                   perm: torch.Tensor | None = None, outlier_w: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> "VQLinear":
        """codes: int [stages, out, n_vec] (unpacked); the rest as in the layout above (any float dtype)."""
        m = cls(fmt)
        with torch.no_grad():
            m.codes.copy_(cg.pack_codes(codes, fmt.code_bits))
            m.codebooks.copy_(codebooks.to(m.codebooks.dtype))
            if fmt.n_outliers:
                m.perm.copy_(perm.to(torch.int16))
                m.outlier_w.copy_(outlier_w.to(torch.float16))
            m._sync_perm()
            if fmt.has_scale:
                m.scale.copy_(scale.to(torch.float16))
            if fmt.has_bias:
                m.bias.copy_(bias.to(torch.float16))
        return m

    def _sync_perm(self) -> None:
        self.perm_i64 = self.perm.to(torch.int64)

    # -- inference -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the buffers straight from their dict: nn.Module.__getattr__ costs ~0.4 us an access, ~3 us of a 576x576
        # decode call for the seven (session 27)
        f, b = self.fmt, self._buffers
        return cg.call(x, b["codes"], b["codebooks"], b["perm_i64"], b["outlier_w"], b["scale"], b["bias"],
                       f.in_features, f.vec_len, f.code_bits)

    def dequantize(self) -> torch.Tensor:
        """Dense W [out, in] in float32 (tests / analysis only; the inference path never builds it)."""
        f = self.fmt
        return cg.dequantize(self.codes, self.codebooks, self.perm.to(torch.int64), self.outlier_w, self.scale,
                             f.in_features, f.vec_len, f.code_bits)

    def unpacked_codes(self) -> torch.Tensor:
        return cg.unpack_codes(self.codes, self.fmt.code_bits, self.fmt.n_vec)

    def storage_bits(self) -> int:
        return self.fmt.storage_bits()

    def buffer_bits(self) -> int:
        """Bits actually held by the buffers (equals storage_bits(); checked by the tests)."""
        return sum(b.numel() * b.element_size() * 8 for b in self.state_dict().values())

    def extra_repr(self) -> str:
        f = self.fmt
        return (f"in={f.in_features}, out={f.out_features}, v={f.vec_len}, K={f.codebook_size}, "
                f"stages={f.stages}, groups={f.groups}, outliers={f.n_outliers}, "
                f"bpw={f.bits_per_weight():.3f}")


def _to_spec(m: VQLinear) -> dict:
    return {"format": m.fmt.to_dict()}


def _from_spec(spec: dict) -> VQLinear:
    return VQLinear(CodebookFormat.from_dict(spec["format"]))


if "VQLinear" not in MODULE_TYPES:
    MODULE_TYPES.register("VQLinear", ModuleType(VQLinear, _to_spec, _from_spec))


def fp16_scale(s: torch.Tensor, outl: torch.Tensor) -> torch.Tensor:
    """Per-channel scales `s` as fp16 stores them (every stage that rounds scales to storage calls this). The
    outlier columns `outl` (undivided, [out, n_outliers]; empty when there are none or they are already divided)
    are stored divided by the scale, so a row's scale is kept large enough in magnitude for that quotient to fit
    fp16, and never rounds to 0 (which would store NaN or silence the row): a row whose quantized columns are all
    zero, e.g. only dead inputs, gets a scale of 0 from the closed-form fit."""
    floor = torch.full_like(s, torch.finfo(torch.float16).tiny)
    if outl.numel():
        floor = torch.maximum(floor, outl.abs().amax(1) / 32768)
    return torch.where(s.abs() < floor, torch.where(s < 0, -floor, floor), s).half().float()
