"""What every exporter shares: the export config, tolerances, targets, operator support as data,
the custom-operator table, tracing, and the parity check against eager PyTorch.

A format plugs in by subclassing `Exporter` (see `edgetk.exporters.onnx`) and registering it in
`edgetk.exporters.EXPORTERS`. The flow (`edgetk.exporters.export`) is the same for every format:

    plan   = build_plan(loaded, example_inputs, cfg, exporter)   # wrapper (decoders: one-token step) + inputs
    ep     = exporter.prepare(trace(plan), plan)          # torch.export; untraceable -> UnsupportedOpError
    check_support(ep, exporter, target)                   # every node checked BEFORE anything is written
    files  = exporter.lower(ep, plan, root, target, cfg)  # writes model files into the artifact's temp dir
    parity = exporter's Session vs eager on the same inputs (decoders: greedy golden run), ParityError beyond tol

Custom operators: `CUSTOM_OPS` says, per op, which formats can carry it and how ("function" = a node in
the edgetk domain plus a body in standard ops, "decompose" = replaced before lowering by `decomposition`, a
functional core-ATen form of the kernels/ reference, "kernel" = a native kernel of the format). Adding an op is
one `register_custom_op(CustomOp(...))` plus one lowering entry in each format module that claims "function"
or "kernel" (e.g. `edgetk.exporters.onnx.LOWERINGS`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from edgetk.config import Config, check, config
from edgetk.errors import ConfigError, ParityError, UnsupportedOpError
from edgetk.kernels.blockwise_gemm import blockwise_gemm_reference
from edgetk.kernels.codebook_gemm import epilogue, unpack_codes_arith

log = logging.getLogger(__name__)

FORMATS = ("onnx", "executorch", "tvm")


# -- config and tolerances --------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Export vs eager: an output passes when max|a - b| <= atol + rtol * max|b|."""

    atol: float
    rtol: float

    def limit(self, ref: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.max(np.abs(ref))) if ref.size else self.atol


# fp32 graph vs fp32 eager: only reassociation differences are allowed
DEFAULT_TOLERANCE = {"onnx": Tolerance(1e-4, 1e-4), "executorch": Tolerance(1e-4, 1e-4),
                     "tvm": Tolerance(1e-4, 1e-4)}


@config("export", version=1)
@dataclass(frozen=True)
class ExportConfig(Config):
    format: str = "onnx"
    atol: float | None = None          # None = DEFAULT_TOLERANCE[format]
    rtol: float | None = None
    max_seq_len: int = 64              # decoders: static KV-cache length of the exported step
    golden_steps: int = 32             # decoders: greedy tokens that must equal eager's
    encoder_seq_len: int = 16          # encoders: example input length when none is given
    opset: int = 18                    # onnx
    optimize: bool = True              # onnx: run the onnxscript optimizer (custom nodes survive it)
    parity: bool = True                # run the parity check (always on from the CLI)

    def validate(self) -> None:
        check(self.format in FORMATS, "format", self.format, f"one of {', '.join(FORMATS)}")
        check(self.max_seq_len >= 2, "max_seq_len", self.max_seq_len, ">= 2")
        check(0 <= self.golden_steps < self.max_seq_len, "golden_steps", self.golden_steps,
              f"in [0, max_seq_len={self.max_seq_len})")
        check(self.encoder_seq_len >= 1, "encoder_seq_len", self.encoder_seq_len, ">= 1")
        check(self.atol is None or self.atol >= 0, "atol", self.atol, ">= 0")
        check(self.rtol is None or self.rtol >= 0, "rtol", self.rtol, ">= 0")
        check(13 <= self.opset <= 23, "opset", self.opset, "in [13, 23]")

    @property
    def tolerance(self) -> Tolerance:
        d = DEFAULT_TOLERANCE[self.format]
        return Tolerance(d.atol if self.atol is None else self.atol, d.rtol if self.rtol is None else self.rtol)


# -- targets -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TargetInfo:
    """What the exporters need from a device profile. `ops` = the target's op set as ATen names
    ("aten.convolution"); None = whatever the format runs. `static_shapes`: no dynamic dims (NPUs)."""

    name: str = "host"
    static_shapes: bool = False
    ops: frozenset[str] | None = None
    profile: Any = None  # the device profile object it came from, for format modules that want more

    def to_dict(self) -> dict:
        return {"name": self.name, "static_shapes": self.static_shapes,
                "ops": sorted(self.ops) if self.ops is not None else None}


def resolve_target(target: Any) -> TargetInfo:
    """None (host), a TargetInfo, a dict with TargetInfo's fields, a device-profile name or a DeviceProfile.

    From a device profile: its name, and static shapes if it has an NPU that needs them. A profile's NPU op
    set (ONNX names) is not a hard limit here: nodes outside it fall back to the CPU at compile time
    (`edgetk compile` writes the placement report). A dict/TargetInfo `ops` set (ATen names) is a hard limit."""
    if target is None:
        return TargetInfo()
    if isinstance(target, TargetInfo):
        return target
    if isinstance(target, dict):
        ops = target.get("ops")
        return TargetInfo(name=str(target.get("name", "target")), static_shapes=bool(target.get("static_shapes")),
                          ops=frozenset(_op_key(o) for o in ops) if ops is not None else None, profile=target)
    if isinstance(target, str):
        from edgetk.devices import load_profile  # raises ConfigError naming the known profiles

        target = load_profile(target)
    npu = getattr(target, "npu", None)
    return TargetInfo(name=str(getattr(target, "name", "target")),
                      static_shapes=bool(getattr(npu, "static_shapes", False)), profile=target)


# -- custom operators -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CustomOp:
    """A kernels/ operator and how each format carries it ("function", "decompose", "kernel").
    `decomposition`: a functional (no in-place) core-ATen form of the kernels/ reference, used by "decompose"."""

    qualname: str                              # "edgetk::codebook_gemm"
    decomposition: Callable[..., torch.Tensor]
    formats: dict[str, str] = field(default_factory=dict)

    @property
    def overload(self) -> torch._ops.OpOverload:
        ns, name = self.qualname.split("::")
        return getattr(getattr(torch.ops, ns), name).default


def codebook_gemm_decomposed(x, codes, codebooks, perm, outlier_w, scale, bias, in_features: int, vec_len: int,
                             code_bits: int) -> torch.Tensor:
    """edgetk::codebook_gemm in functional core ATen: the same LUT-GEMV as the kernels/ reference (per input
    vector the dot products with every codeword, then a gather-and-sum over each row's unpacked codes),
    without its in-place row chunks. The packed codes are unpacked at run time; no dense W is built."""
    from edgetk.kernels.codebook_gemm import _split_input

    stages, out_f, _ = codes.shape
    groups, k = codebooks.shape[1], codebooks.shape[2]
    n_out = outlier_w.shape[1] if outlier_w.dim() == 2 else 0
    in_q = in_features - n_out
    n_vec = -(-in_q // vec_len)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    b = x2.shape[0]
    x_out, xv = _split_input(x2, perm, n_out, in_q, n_vec, vec_len)  # xv [B, n_vec, V]
    lut = torch.einsum("bjv,sgkv->sgbjk", xv, codebooks.to(x.dtype)).reshape(stages, groups, b, n_vec * k)
    idx = unpack_codes_arith(codes, code_bits, n_vec) + torch.arange(n_vec) * k  # [S, O, n_vec] into n_vec*K
    flat = idx.reshape(stages, groups, 1, -1).expand(stages, groups, b, -1)
    y = torch.gather(lut, 3, flat).reshape(stages, groups, b, out_f // groups, n_vec).sum((0, 4))
    y = y.permute(1, 0, 2).reshape(b, out_f)
    return epilogue(y, x_out, outlier_w, scale, bias).reshape(*lead, out_f)



CUSTOM_OPS: dict[str, CustomOp] = {
    "edgetk::codebook_gemm": CustomOp("edgetk::codebook_gemm", codebook_gemm_decomposed,
                                      {"onnx": "function", "executorch": "decompose"}),
    # onnx: onnxruntime's native com.microsoft.MatMulNBits (exporters/onnx.py); the reference is functional ATen
    "edgetk::blockwise_gemm": CustomOp("edgetk::blockwise_gemm", blockwise_gemm_reference,
                                       {"onnx": "kernel", "executorch": "decompose", "tvm": "decompose"}),
}


def register_custom_op(op: CustomOp) -> None:
    """One line per new op (e.g. from kernels/kv_attention.py): `register_custom_op(CustomOp(...))`."""
    old = CUSTOM_OPS.get(op.qualname)
    if old is not None and old is not op:
        op = dataclasses.replace(op, formats={**old.formats, **op.formats})
    CUSTOM_OPS[op.qualname] = op


def op_name(target: Any) -> str:
    """'aten.convolution.default' -> 'aten::convolution'; custom ops keep their qualified name."""
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name  # e.g. "aten::convolution", "edgetk::codebook_gemm"
    return getattr(target, "__name__", str(target))


def _op_key(name: str) -> str:
    """Normalise an op name from a profile ('aten.convolution', 'aten::convolution.default')."""
    name = name.replace("::", ".")
    parts = name.split(".")
    return "::".join(parts[:2]) if len(parts) >= 2 else name


# -- the exporter interface --------------------------------------------------------------------------
@dataclass
class ExportPlan:
    """What gets traced: the module (a wrapper for decoders), its example inputs and names."""

    module: torch.nn.Module
    args: tuple
    input_names: list[str]
    output_names: list[str]
    kind: str = "module"                  # "module" | "encoder" | "decoder"
    dynamic_shapes: Any = None
    decoder: dict[str, Any] | None = None  # decoders: mode, max_seq_len, cache shape, prompt
    source: Any = None                    # the LoadedModel


class Exporter(ABC):
    """One graph format. Subclasses set the class attributes and implement `lower`."""

    format: str = "?"
    cache_mode: str = "explicit"   # decoders: "explicit" (caches as graph inputs/outputs) or "mutable"
    dynamic_shapes: str = "any"    # "any" | "bounded" (every dynamic dim needs a max) | "none"
    extra: str = ""                # pip extra that installs the backend
    tied_head_as_left_operand: bool = False  # decoders: tied lm_head as (E · hᵀ)ᵀ (see exporters/decoder.py)

    @abstractmethod
    def require(self) -> None:
        """Import the backend or raise MissingDependencyError naming the extra."""

    @abstractmethod
    def lower(self, ep: torch.export.ExportedProgram, plan: ExportPlan, root: Path, target: TargetInfo,
              cfg: ExportConfig) -> dict[str, Any]:
        """Write the model file(s) under `root`; return manifest fields (at least "file")."""

    def unsupported_reason(self, op: torch._ops.OpOverload) -> str | None:
        """None if the format runs this ATen (non-custom) op; otherwise why not. Default: all run."""
        return None

    def prepare(self, ep: torch.export.ExportedProgram, plan: ExportPlan) -> torch.export.ExportedProgram:
        """Format-specific rewrites before the support check (e.g. decompositions). Default: none."""
        return ep


# graph bookkeeping that every exporter drops (shape/dtype assertions)
IGNORED_OPS = frozenset({"aten::_assert_tensor_metadata", "aten::_assert_scalar", "aten::_assert_async",
                         "aten::sym_constrain_range_for_size", "aten::sym_constrain_range",
                         "aten::_functional_assert_async", "aten::_functional_sym_constrain_range"})


@functools.lru_cache(maxsize=1)
def _default_decomps() -> frozenset:
    return frozenset(torch.export.default_decompositions().keys())


def decomposes(op: torch._ops.OpOverload) -> bool:
    """True if torch.export's decompositions rewrite `op` into other ATen ops on the way to the backend."""
    return op in _default_decomps() or op.has_kernel_for_dispatch_key(torch._C.DispatchKey.CompositeImplicitAutograd)


def check_support(ep: torch.export.ExportedProgram, exporter: Exporter, target: TargetInfo) -> None:
    """Walk every call node; the first one the format or the target cannot run raises UnsupportedOpError.
    A target op set is checked on the core-ATen form of the graph (the names device profiles list)."""
    _check_nodes(ep, exporter, TargetInfo(name=target.name))
    if target.ops is not None:
        keep = {c.overload for q, c in CUSTOM_OPS.items() if _registered(q)}
        table = {k: v for k, v in torch.export.default_decompositions().items() if k not in keep}
        _check_nodes(ep.run_decompositions(table), exporter, target)


def _registered(qualname: str) -> bool:
    ns, name = qualname.split("::")
    return hasattr(getattr(torch.ops, ns), name)


def _check_nodes(ep: torch.export.ExportedProgram, exporter: Exporter, target: TargetInfo) -> None:
    for node in ep.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = op_name(node.target)
        if name in IGNORED_OPS:
            continue
        reason = None
        if name in CUSTOM_OPS or not name.startswith(("aten::", "prims::")):
            how = CUSTOM_OPS[name].formats.get(exporter.format) if name in CUSTOM_OPS else None
            if how is None:
                reason = f"{exporter.format} has no lowering for custom op {name}"
        else:
            reason = exporter.unsupported_reason(node.target)
        if reason is None and target.ops is not None and name not in target.ops and name not in CUSTOM_OPS:
            reason = f"target {target.name} lists no {name} in its op set"
        if reason is not None:
            raise UnsupportedOpError(
                f"node {node.name!r} ({name}) cannot be exported to {exporter.format} for target "
                f"{target.name}: {reason}",
                hint=_options_hint(name, exporter.format, target))


def _options_hint(name: str, fmt: str, target: TargetInfo) -> str:
    others = [f for f, how in (CUSTOM_OPS[name].formats.items() if name in CUSTOM_OPS else []) if f != fmt]
    opts = [f"fall back: run this op on the CPU (export without --target {target.name})" if target.ops
            is not None else f"fall back: export to another format{' (' + ', '.join(others) + ')' if others else ''}",
            f"decompose: rewrite {name} into ops the target has (or register a lowering in "
            f"edgetk.exporters.{fmt})",
            "drop the target: choose a device profile that supports it"]
    return "; ".join(opts)


def check_dynamic_shapes(plan: ExportPlan, exporter: Exporter, target: TargetInfo) -> None:
    """Dynamic dims the format or target cannot take are refused before tracing."""
    dims = list(_dims(plan.dynamic_shapes))
    if not dims:
        return
    if target.static_shapes or exporter.dynamic_shapes == "none":
        who = f"target {target.name}" if target.static_shapes else f"format {exporter.format}"
        raise UnsupportedOpError(f"{who} needs static shapes, but dynamic dims were requested: "
                                 f"{', '.join(d.__name__ for d in dims)}",
                                 hint="export with fixed example shapes (no dynamic_shapes), or drop the target")
    if exporter.dynamic_shapes == "bounded":
        for d in dims:
            hi = getattr(d, "max", None)
            if hi is None or hi >= 2 ** 31 - 2:
                raise UnsupportedOpError(
                    f"{exporter.format} memory-plans every tensor ahead of time: dynamic dim {d.__name__!r} "
                    "has no upper bound", hint=f"give it one: torch.export.Dim({d.__name__!r}, max=N)")


def _dims(spec: Any):
    if isinstance(spec, torch.export.Dim) or type(spec).__name__ in ("Dim", "_Dim", "_DerivedDim"):
        yield spec
    elif isinstance(spec, dict):
        for v in spec.values():
            yield from _dims(v)
    elif isinstance(spec, (list, tuple)):
        for v in spec:
            yield from _dims(v)


# -- tracing -----------------------------------------------------------------------------------------
def trace(plan: ExportPlan) -> torch.export.ExportedProgram:
    """torch.export with the reason for a failure named (data-dependent control flow and the like)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # DecoderStep hands cache tensors to StepKVCache attributes on purpose (they are graph inputs)
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            return torch.export.export(plan.module, plan.args, dynamic_shapes=plan.dynamic_shapes, strict=False)
    except Exception as exc:  # torch raises many unrelated types here; all mean "cannot trace"
        if isinstance(exc, (UnsupportedOpError, ConfigError)):
            raise
        kind = ("data-dependent control flow (a Python branch or loop on tensor values)"
                if _data_dependent(exc) else type(exc).__name__)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedOpError(
            f"torch.export cannot trace {type(plan.module).__name__}: {kind}: {first[:300]}",
            hint="make the branch static, or use torch.cond / torch.where for value-dependent branches; "
                 "rerun with --debug for torch's full explanation") from exc


def _data_dependent(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("data-dependent", "data dependent", "GuardOnDataDependent",
                                   "Could not guard on", "UserError", "control flow"))


# -- parity ------------------------------------------------------------------------------------------
def to_numpy_list(out: Any) -> list[np.ndarray]:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return [o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outs]


def compare(names: Sequence[str], got: Sequence[np.ndarray], ref: Sequence[np.ndarray],
            tol: Tolerance, what: str) -> dict[str, Any]:
    """Per-output max abs / rel error; raises ParityError naming the first output beyond tolerance."""
    if len(got) != len(ref):
        raise ParityError(f"{what}: the artifact returned {len(got)} outputs, eager {len(ref)}",
                          hint="the exported graph's outputs do not match the model's")
    per: dict[str, Any] = {}
    for name, a, b in zip(names, got, ref):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise ParityError(f"{what}: output {name!r} has shape {a.shape}, eager {b.shape}",
                              hint="the exported graph changed a shape; check dynamic dims")
        if a.dtype.kind in "iub":
            mismatches = int(np.sum(a != b))
            per[name] = {"max_abs": float(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64)))) if a.size
                         else 0.0, "max_rel": 0.0, "mismatches": mismatches, "limit": 0.0}
            bad = mismatches > 0
        else:
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            err = float(np.max(np.abs(a64 - b64))) if a.size else 0.0
            scale = float(np.max(np.abs(b64))) if b.size else 0.0
            limit = tol.limit(b64)
            per[name] = {"max_abs": err, "max_rel": err / scale if scale > 0 else err, "limit": limit}
            bad = not np.isfinite(err) or err > limit or (np.isfinite(b64).all() and not np.isfinite(a64).all())
        if bad:
            raise ParityError(f"{what}: output {name!r} diverges from eager: max abs error "
                              f"{per[name]['max_abs']:.3g} > limit {per[name]['limit']:.3g} "
                              f"(atol {tol.atol:g}, rtol {tol.rtol:g})",
                              hint="export with --debug to inspect; if the drift is expected (e.g. fp16 "
                                   "target), raise the tolerance explicitly (atol/rtol)")
    return per


def parity_check(session: Any, eager: Callable[..., Any], inputs: Sequence[torch.Tensor], names: Sequence[str],
                 tol: Tolerance) -> dict[str, Any]:
    """Run the artifact's Session and eager PyTorch on the same inputs; record errors per output."""
    with torch.no_grad():
        ref = to_numpy_list(eager(*inputs))
    got = session.run([x.detach().cpu().numpy() for x in inputs])
    per = compare(names, got, ref, tol, "parity")
    return {"inputs": [list(x.shape) for x in inputs], "atol": tol.atol, "rtol": tol.rtol, "outputs": per,
            "max_abs": max((v["max_abs"] for v in per.values()), default=0.0),
            "max_rel": max((v["max_rel"] for v in per.values()), default=0.0)}
