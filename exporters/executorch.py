"""ExecuTorch export: torch.export -> edgetk ops decomposed into core ATen -> to_edge_transform_and_lower
with the XNNPACK partitioner (portable kernels for what it does not take) -> .pte.

edgetk custom ops are decomposed into their plain-PyTorch reference before lowering (recorded in the
manifest as "decompose"): `codebook_gemm` becomes unpack-codes + LUT + gather-and-sum on the packed uint8
codes and the codebooks, which stay constants in the program; no dense weight is built at export time.
Decoders keep the KV cache as mutable buffers of the program (state lives in the loaded method).
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch

from edgetk.errors import UnsupportedOpError, require

from . import EXPORTERS
from .common import decomposes, CUSTOM_OPS, ExportConfig, Exporter, ExportPlan, TargetInfo, op_name

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def _et_decomps() -> frozenset:
    from executorch.exir.tracer import _default_decomposition_table

    return frozenset(_default_decomposition_table().keys())


@lru_cache(maxsize=1)
def _portable_kernels() -> frozenset:
    """Base names of the ATen ops the portable kernel library implements (its functions.yaml)."""
    import importlib.resources as res
    import re

    try:
        text = (res.files("executorch") / "kernels" / "portable" / "functions.yaml").read_text()
    except (FileNotFoundError, ModuleNotFoundError):  # pragma: no cover - packaging changed
        return frozenset()
    return frozenset(m.group(1).rstrip("_") for m in re.finditer(r"^- op: ([A-Za-z0-9_]+)", text, re.M))


# ops outside the core set that ExecuTorch's edge dialect accepts anyway (views / memory-format copies)
_EDGE_EXTRA = frozenset({"aten::_to_copy", "aten::alias", "aten::lift_fresh_copy", "aten::copy_",
                         "aten::index_copy_", "aten::index_put_"})


class ExecuTorchExporter(Exporter):
    format = "executorch"
    cache_mode = "mutable"
    dynamic_shapes = "bounded"   # memory is planned ahead of time: every dynamic dim needs an upper bound
    extra = "executorch"
    # x · Eᵀ would hand the tied embedding to XNNPACK, which keeps its own copy beside the program constant the
    # portable embedding lookup reads (+113 MB for smollm2-135m); (E · hᵀ)ᵀ leaves the head to the portable mm
    # on that same constant (stored once; ~13 ms more per token for smollm2's 49,152 x 576 head on one x86 core)
    tied_head_as_left_operand = True

    def require(self) -> None:
        require("executorch.exir", self.extra)
        require("executorch.backends.xnnpack.partition.xnnpack_partitioner", self.extra)

    def unsupported_reason(self, op: torch._ops.OpOverload) -> str | None:
        name = op_name(op)
        base = name.split("::")[1].rstrip("_")
        if (op in _et_decomps() or decomposes(op) or name in _EDGE_EXTRA or op.is_view
                or base in _portable_kernels() or base.removesuffix("_copy") in _portable_kernels()):
            return None
        return (f"{op} has no ExecuTorch portable kernel and no decomposition into ops that have one "
                "(executorch/kernels/portable/functions.yaml)")

    def prepare(self, ep: torch.export.ExportedProgram, plan: ExportPlan) -> torch.export.ExportedProgram:
        present = {op_name(n.target): n.target for n in ep.graph.nodes
                   if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
        table = {present[q]: c.decomposition for q, c in CUSTOM_OPS.items()
                 if q in present and c.formats.get(self.format) == "decompose"}
        return ep.run_decompositions(table) if table else ep

    def lower(self, ep: torch.export.ExportedProgram, plan: ExportPlan, root: Path, target: TargetInfo,
              cfg: ExportConfig) -> dict[str, Any]:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        partition = "gemm" if plan.kind == "decoder" else "all"
        try:
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner(configs=_xnnpack_configs(partition))])
            with signature_maps_memoized():
                program = edge.to_executorch()
        except Exception as exc:
            raise UnsupportedOpError(f"ExecuTorch could not lower {type(plan.module).__name__}: "
                                     f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}",
                                     hint="rerun with --debug; decompose the failing op or export to another "
                                          "format") from exc
        (root / "model.pte").write_bytes(program.buffer)
        return {"file": "model.pte", "executorch": {"custom_op_lowering": "decompose", "backends": ["XnnpackBackend"],
                                                    "xnnpack_ops": partition, **_delegation(edge)}}


def _xnnpack_configs(partition: str) -> list | None:
    """Which ops XNNPACK takes: "all" its configs, or "gemm" (linear/matmul: the bulk of a decoder's time;
    the many small elementwise partitions between them cost minutes of lowering and little run time)."""
    from executorch.backends.xnnpack.partition.config import gemm_configs as g

    table = {"all": None, "gemm": [g.LinearConfig, g.AddmmConfig, g.MMConfig]}
    return table[partition]


# -- ExecuTorch's to_executorch() is quadratic in the number of lifted buffers ------------------------------
# torch's ExportGraphSignature.inputs_to_buffers (and inputs_to_parameters, inputs_to_lifted_tensor_constants)
# is a property that rebuilds a dict from every input spec on each access, and ExecuTorch 1.5 reads it once
# per placeholder: SpecPropPass.update_placeholder_tensor_specs and the `_is_mutable_buffer` helpers of
# exir/memory_planning.py (Verifier.verify_graph_input_output, collect_specs_from_nodes,
# update_tensor_lifetime), and the emitter's _TopLevelEmitter._find_fqn_for_placeholder. A VQ decoder lifts
# 7 buffers per linear (~1,600 placeholders for smollm2-135m): to_executorch() took 208 s, 111 s of it in
# these dicts (102 s in all with the memo). While to_executorch() runs, the properties are memoized per signature.
# A memo is reused only while the signature holds the same input_specs list at the same length, the cached
# values are read-only mappings, and only input-side maps are memoized: the passes that to_executorch() runs
# rename *output* specs in place (insert_write_back_for_buffers_pass, the replace hook of
# unsafe_remove_auto_functionalized_pass) but replace or grow the input spec list rather than edit it.
_MEMOIZED_MAPS = ("inputs_to_parameters", "inputs_to_buffers", "inputs_to_lifted_tensor_constants")
_memo_lock = threading.Lock()
_memo_state: dict[str, Any] = {"depth": 0, "saved": {}}


def _memoized(name: str, prop: property, memo: dict) -> property:
    def get(sig: Any) -> Any:
        specs = sig.input_specs
        hit = memo.get((id(sig), name))
        if hit is not None and hit[1] is specs and hit[2] == len(specs):
            return hit[3]
        value = prop.fget(sig)
        memo[(id(sig), name)] = (sig, specs, len(specs), value)  # holds sig: its id is not reused meanwhile
        return value

    return property(get, doc=prop.__doc__)


@contextmanager
def signature_maps_memoized() -> Iterator[None]:
    """Memoize ExportGraphSignature's input-side dict properties for the duration of the block (see above);
    the original properties are restored on exit, also on error. Nested and concurrent blocks share one
    installation, removed when the last block exits."""
    from torch.export.graph_signature import ExportGraphSignature as Sig

    with _memo_lock:
        if _memo_state["depth"] == 0:
            memo: dict = {}
            saved = {n: Sig.__dict__[n] for n in _MEMOIZED_MAPS if isinstance(Sig.__dict__.get(n), property)}
            for n, prop in saved.items():
                setattr(Sig, n, _memoized(n, prop, memo))
            _memo_state["saved"] = saved
        _memo_state["depth"] += 1
    try:
        yield
    finally:
        with _memo_lock:
            _memo_state["depth"] -= 1
            if _memo_state["depth"] == 0:
                for n, prop in _memo_state["saved"].items():
                    setattr(Sig, n, prop)
                _memo_state["saved"] = {}


def _delegation(edge: Any) -> dict[str, int]:
    """How many graph nodes XNNPACK took vs portable kernels."""
    gm = edge.exported_program().graph_module
    delegated = sum(1 for n in gm.graph.nodes if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
    portable = sum(1 for n in gm.graph.nodes if n.op == "call_function" and "executorch_call_delegate" not in str(n.target)
                   and "getitem" not in str(n.target))
    return {"delegate_calls": delegated, "portable_nodes": portable}


EXPORTERS.register("executorch", ExecuTorchExporter())
