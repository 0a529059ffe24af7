"""TVM export: Relax from the ExportedProgram, edgetk ops as TensorIR PrimFuncs, libraries per target.

    ep   -> run_decompositions() -> check_support (every op against the Relax importer's table)
         -> tvm.relax.frontend.torch.from_exported_program(ep, custom_convert_map=LOWERINGS)
         -> per build target: the Relax pipeline (legalize, fold, fuse; DLight GPU schedules on CUDA)
         -> tvm.compile -> export_library

`edgetk::codebook_gemm` becomes a `call_tir` to a PrimFunc written in TVMScript
(`edgetk.kernels.tir_codebook`), specialised to the layer's shapes and scheduled for the build's
target kind (llvm or CUDA). The packed codes and codebooks are the PrimFunc's inputs, bound as
constants: no dense weight exists at run time (checked after the pipeline; see `_constants_report`).

Build targets come from the device profile (data in `TRIPLES`): the host library always (it is what
`Session` runs and what the parity check measures); `aarch64-linux-gnu` profiles add an aarch64
library linked with `aarch64-linux-gnu-gcc` and checked under `qemu-aarch64` with the aarch64 TVM
runtime (`edgetk.devices.tvm_aarch64`); CUDA profiles add a CUDA library whose generated source is kept
in the artifact (`kernels.cu`) and, when `nvcc` is present, compiled to a cubin for the profile's arch.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from edgetk.errors import UnsupportedOpError, require

from . import EXPORTERS
from .common import (CUSTOM_OPS, ExportConfig, Exporter, ExportPlan, TargetInfo, _registered, compare,
                     register_custom_op, to_numpy_list)

log = logging.getLogger(__name__)

LIB = "model.so"
AARCH64_GOLDEN_STEPS = 4   # greedy steps checked under qemu (each step is one emulated process start)
LOWERING_NOTE = "TensorIR PrimFunc (TVMScript, edgetk.kernels.tir_codebook) scheduled per target; no dense weight"


# -- build targets as data ------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildTarget:
    name: str                      # artifact sub-directory ("" = the artifact root, i.e. the host library)
    kind: str                      # kernel schedule / TVM target kind: "llvm" or "cuda"
    target: dict[str, Any]
    host: dict[str, Any] | None = None
    cc: str | None = None          # cross compiler for export_library (None = TVM's default host compiler)
    run: str | None = None         # how parity runs it here: "vm" (host), "qemu" (aarch64), None (not here)

    @property
    def lib(self) -> str:
        return f"{self.name}/{LIB}" if self.name else LIB

    def tvm_target(self):
        tvm = require("tvm", "tvm")
        return tvm.target.Target(self.target, host=self.host) if self.host else tvm.target.Target(self.target)


HOST = BuildTarget("", "llvm", {"kind": "llvm"}, run="vm")
# profile triple -> CPU build (llvm target fields and the cross compiler); None = the host itself
TRIPLES: dict[str, dict[str, Any] | None] = {
    "x86_64-linux-gnu": None,
    "aarch64-linux-gnu": {"target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"},
                          "cc": "aarch64-linux-gnu-gcc", "run": "qemu"},
}
# profile cpu_features -> LLVM mattr
MATTR = {"neon": "+neon", "dotprod": "+dotprod", "fp16": "+fullfp16", "crc": "+crc", "aes": "+aes", "sve": "+sve",
         "i8mm": "+i8mm", "bf16": "+bf16"}


def build_targets(tgt: TargetInfo) -> list[BuildTarget]:
    """Host always; then the profile's CPU build (cross) and its CUDA build, if any."""
    prof = _profile(tgt)
    if prof is None:
        return [HOST]
    triple = getattr(prof, "triple", "x86_64-linux-gnu")
    if triple not in TRIPLES:
        raise UnsupportedOpError(
            f"target {tgt.name}: TVM libraries for {triple} cannot be built here",
            hint=f"TVM export builds for {', '.join(sorted(TRIPLES))}; for this device export to onnx or "
                 "executorch, or build TVM's runtime for it with its own SDK")
    out = [HOST]
    cpu = TRIPLES[triple]
    host_dict: dict[str, Any] = {"kind": "llvm"}
    if cpu is not None:
        t = dict(cpu["target"])
        if getattr(prof, "cpu", None):
            t["mcpu"] = prof.cpu
        mattr = [MATTR[f] for f in getattr(prof, "cpu_features", ()) if f in MATTR]
        if mattr:
            t["mattr"] = mattr
        out.append(BuildTarget(triple, "llvm", t, cc=cpu["cc"], run=cpu["run"]))
        host_dict = t
    gpu = getattr(prof, "gpu", None)
    if gpu is not None and getattr(gpu, "kind", None) == "cuda":
        out.append(BuildTarget(f"cuda-{gpu.arch}", "cuda", {"kind": "cuda", "arch": gpu.arch}, host=host_dict,
                               cc=cpu["cc"] if cpu else None))
    return out


def _profile(tgt: TargetInfo) -> Any:
    if tgt.profile is not None or tgt.name in ("host", ""):
        return tgt.profile
    from edgetk.devices.profile import load_profile

    return load_profile(tgt.name)


# -- edgetk::codebook_gemm -> call_tir(PrimFunc) ---------------------------------------------------------
def _dtype(node) -> str:
    from edgetk.kernels.tir_codebook import TORCH_TO_TVM_DTYPE

    return TORCH_TO_TVM_DTYPE[str(node.meta["val"].dtype)]


def _codebook_gemm_converter(kind: str) -> Callable:
    def convert(node, importer):
        from tvm import relax

        from edgetk.kernels import tir_codebook as tc

        x, codes, cbs, perm, ow, scale, bias, in_f, vec_len, code_bits = importer.retrieve_args(node)
        a = node.args
        meta = [n.meta["val"] for n in a[:7]]
        dtypes = {"x_dtype": _dtype(a[0]), "codebook_dtype": _dtype(a[2]), "outlier_dtype": _dtype(a[4]),
                  "scale_dtype": _dtype(a[5]), "bias_dtype": _dtype(a[6])}
        k = tc.shape_from_tensors(tuple(meta[0].shape), tuple(meta[1].shape), tuple(meta[2].shape),
                                  meta[3].numel(), tuple(meta[4].shape), meta[5].numel(), meta[6].numel(),
                                  int(in_f), int(vec_len), int(code_bits), dtypes)
        k = dataclasses.replace(k, algo=tc.choose_algo(k, kind))
        bb = importer.block_builder
        gv = bb.add_func(tc.scheduled_primfunc(k, kind, k.algo), f"codebook_gemm_{k.key()}")
        lead = [int(d) for d in meta[0].shape[:-1]]
        x2 = bb.emit(relax.op.reshape(x, (k.rows, k.in_features))) if len(lead) != 1 else x
        y = bb.emit(relax.call_tir(gv, [x2, codes, cbs, perm, ow, scale, bias],
                                   relax.TensorType((k.rows, k.out_features), "float32")))
        return bb.emit(relax.op.reshape(y, (*lead, k.out_features))) if len(lead) != 1 else y

    return convert


# custom op -> (target kind -> importer converter)
LOWERINGS: dict[str, Callable[[str], Callable]] = {"codebook_gemm.default": _codebook_gemm_converter}
for _q in ("edgetk::codebook_gemm",):
    register_custom_op(dataclasses.replace(CUSTOM_OPS[_q], formats={**CUSTOM_OPS[_q].formats, "tvm": "kernel"}))


def _index_copy(x: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """index_copy as scatter (the default decomposition, index_put with None indices, fails in Relax)."""
    shape = [1] * source.dim()
    shape[dim] = -1
    return torch.scatter(x, dim, index.view(shape).expand_as(source), source)


# ATen op -> a decomposition into ops TVM's importer converts (the KV-cache update of decoder steps)
DECOMPOSITIONS: dict[Any, Callable] = {torch.ops.aten.index_copy.default: _index_copy}


@lru_cache(maxsize=1)
def _importer_ops() -> frozenset[str]:
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(ExportedProgramImporter().create_convert_map())


def to_relax(ep: torch.export.ExportedProgram, kind: str):
    """The Relax IRModule of a decomposed ExportedProgram, edgetk ops lowered for target kind `kind`."""
    from tvm.relax.frontend.torch import from_exported_program

    custom = {name: make(kind) for name, make in LOWERINGS.items()}
    try:
        return from_exported_program(ep, custom_convert_map=custom, run_ep_decomposition=False)
    except (AssertionError, ValueError, TypeError, NotImplementedError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedOpError(f"TVM's Relax importer cannot convert the graph: {first[:300]}",
                                 hint="decompose the op in the model, or export to onnx/executorch") from exc


# -- compile ----------------------------------------------------------------------------------------
def relax_pipeline(bt: BuildTarget):
    """Legalize, fold constants, fuse; on CUDA also DLight schedules for every PrimFunc not yet scheduled."""
    from tvm import relax

    tgt = bt.tvm_target()
    if bt.kind == "cuda":
        return relax.backend.cuda.get_default_pipeline(tgt)
    return relax.backend.cpu_generic.get_default_pipeline(tgt)


def compile_target(mod, bt: BuildTarget, out_dir: Path) -> dict[str, Any]:
    """Run the pipeline, check constants, compile and export `bt`'s library under out_dir."""
    tvm = require("tvm", "tvm")
    t0 = time.perf_counter()
    tgt = bt.tvm_target()
    with tgt:
        lowered = relax_pipeline(bt)(mod)
    consts = _constants_report(lowered)
    ex = tvm.compile(lowered, target=tgt, relax_pipeline=None)
    path = out_dir / bt.lib
    path.parent.mkdir(parents=True, exist_ok=True)
    if bt.cc:
        ex.export_library(str(path), cc=bt.cc)
    else:
        ex.export_library(str(path))
    info: dict[str, Any] = {"file": bt.lib, "kind": bt.kind, "target": bt.target, "host": bt.host,
                            "cc": bt.cc, "constants": consts, "compile_seconds": round(time.perf_counter() - t0, 3)}
    if bt.kind == "cuda":
        info["cuda"] = _cuda_sources(ex, bt, path.parent)
    return info


def _constants_report(mod) -> dict[str, Any]:
    """Bytes and the largest float constant bound into the Relax program (what ships with the library)."""
    import tvm
    from tvm import relax

    sizes: list[tuple[int, list[int], str]] = []
    seen: set = set()  # a constant used twice (a tied embedding) is stored once; TVM objects hash by identity

    def visit(e):
        if isinstance(e, tvm.ir.expr.Constant) and hasattr(getattr(e, "value", None), "shape"):
            if e in seen:
                return
            seen.add(e)
            arr = e.value
            shape = [int(d) for d in arr.shape]
            sizes.append((int(np.prod(shape, dtype=np.int64)) * np.dtype(str(arr.dtype)).itemsize, shape,
                          str(arr.dtype)))

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    floats = sorted((s for s in sizes if s[2].startswith(("float", "bfloat"))), key=lambda s: -s[0])
    return {"count": len(sizes), "bytes": sum(s[0] for s in sizes),
            "largest_float": [{"bytes": b, "shape": sh, "dtype": dt} for b, sh, dt in floats[:8]]}


def _modules(mod) -> list:
    """A runtime module and everything it imports, depth first."""
    out = [mod]
    for m in mod.imports:
        out.extend(_modules(m))
    return out


def _cuda_sources(ex, bt: BuildTarget, out_dir: Path) -> dict[str, Any]:
    """Keep the generated CUDA C source; compile it with nvcc for the arch when nvcc is installed."""
    src = "".join(m.inspect_source("cuda") for m in _modules(ex.mod) if m.kind == "cuda")
    if not src:
        raise UnsupportedOpError(f"TVM produced no CUDA code for {bt.name}", hint="check the TVM build (CUDA codegen)")
    (out_dir / "kernels.cu").write_text(src)
    kernels = sorted(set(re.findall(r"__global__ void(?: __launch_bounds__\(\d+\))? (\w+)\(", src)))
    info: dict[str, Any] = {"source": f"{bt.name}/kernels.cu", "kernels": len(kernels), "arch": bt.target["arch"]}
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        info["nvcc"] = "not installed: source kept; NVRTC compiles it when the library is loaded on the GPU"
        return info
    cubin = out_dir / f"kernels.{bt.target['arch']}.cubin"
    proc = subprocess.run([nvcc, "-w", f"-arch={bt.target['arch']}", "-cubin", "-o", str(cubin),
                           str(out_dir / "kernels.cu")], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise UnsupportedOpError(f"nvcc could not compile the generated CUDA code for {bt.target['arch']}: "
                                 f"{proc.stderr.strip()[-400:]}", hint="file a bug with kernels.cu attached")
    info["nvcc"] = "ok"
    info["cubin"] = f"{bt.name}/{cubin.name}"
    return info


# -- the exporter -------------------------------------------------------------------------------------
class TvmExporter(Exporter):
    format = "tvm"
    cache_mode = "explicit"
    dynamic_shapes = "none"   # every PrimFunc (edgetk kernels included) is specialised to static shapes
    extra = "tvm"
    tied_head_as_left_operand = True  # else FoldConstant stores a transposed copy of a tied embedding

    def require(self) -> None:
        require("tvm", self.extra)
        require("tvm.relax.frontend.torch", self.extra)

    def prepare(self, ep: torch.export.ExportedProgram, plan: ExportPlan) -> torch.export.ExportedProgram:
        """Core-ATen decompositions (what TVM's importer runs; custom ops survive), plus DECOMPOSITIONS."""
        table = torch.export.default_decompositions()
        table.update(DECOMPOSITIONS)
        table.update({c.overload: c.decomposition for c in CUSTOM_OPS.values()
                      if c.formats.get(self.format) == "decompose" and _registered(c.qualname)})
        return ep.run_decompositions(table)

    def unsupported_reason(self, op: torch._ops.OpOverload) -> str | None:
        if op.__name__ in _importer_ops():
            return None
        return f"TVM's Relax importer (tvm {_tvm_version()}) has no conversion for {op}"

    def lower(self, ep: torch.export.ExportedProgram, plan: ExportPlan, root: Path, target: TargetInfo,
              cfg: ExportConfig) -> dict[str, Any]:
        targets = build_targets(target)
        _check_toolchains(target, targets)
        mods: dict[str, Any] = {}
        builds: dict[str, Any] = {}
        for bt in targets:
            if bt.kind not in mods:
                mods[bt.kind] = to_relax(ep, bt.kind)
            builds[bt.name or "host"] = compile_target(mods[bt.kind], bt, root)
        for bt in targets:
            if bt.run == "qemu":
                builds[bt.name]["parity"] = _cross_parity(root / bt.lib, plan, cfg)
        return {"file": LIB, "tvm": {"version": _tvm_version(), "builds": builds,
                                     "custom_op_lowering": {"edgetk::codebook_gemm": LOWERING_NOTE}}}


def _check_toolchains(target: TargetInfo, targets: list[BuildTarget]) -> None:
    from edgetk.devices.toolchains import check_tools

    needed = [bt.cc for bt in targets if bt.cc] + ["qemu-aarch64" for bt in targets if bt.run == "qemu"]
    if needed:
        check_tools(sorted(set(needed)))


def _cross_parity(lib: Path, plan: ExportPlan, cfg: ExportConfig) -> dict[str, Any]:
    """Run the cross-built library under qemu with the target's TVM runtime: the example inputs against eager,
    and for decoders a short greedy golden run with the KV cache carried across steps (one qemu run per step)."""
    from edgetk.devices.tvm_aarch64 import run_aarch64

    tol = cfg.tolerance
    with torch.no_grad():
        ref = to_numpy_list(plan.module(*plan.args))
    t0 = time.perf_counter()
    got = run_aarch64(lib, [a.detach().cpu().numpy() for a in plan.args])
    per = compare(plan.output_names, got, ref, tol, f"aarch64 (qemu) parity of {lib.parent.name}")
    out = {"runner": "qemu-aarch64 + TVM runtime (aarch64)", "atol": tol.atol, "rtol": tol.rtol, "outputs": per,
           "max_abs": max(v["max_abs"] for v in per.values()), "max_rel": max(v["max_rel"] for v in per.values())}
    meta = plan.decoder
    if meta is not None and meta["mode"] == "explicit" and cfg.golden_steps:
        from .decoder import ExplicitStepper, eager_stepper, golden, prompt_tokens

        prompt = prompt_tokens(plan.source, meta["vocab_size"])
        rt = ExplicitStepper(lambda arrays: run_aarch64(lib, arrays), meta["cache_shape"])
        out["golden"] = golden(rt, eager_stepper(plan), prompt, min(AARCH64_GOLDEN_STEPS, cfg.golden_steps), tol)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def _tvm_version() -> str:
    import tvm

    return tvm.__version__


EXPORTERS.register("tvm", TvmExporter())
