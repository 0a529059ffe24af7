"""ExecuTorch export: torch.export -> edgetk ops decomposed into core ATen -> to_edge_transform_and_lower
with the XNNPACK partitioner (portable kernels for what it does not take) -> .pte.

edgetk custom ops are decomposed into their plain-PyTorch reference before lowering (recorded in the
manifest as "decompose"): `codebook_gemm` becomes unpack-codes + LUT + gather-and-sum on the packed uint8
codes and the codebooks, which stay constants in the program; no dense weight is built at export time.
Decoders keep the KV cache as mutable buffers of the program (state lives in the loaded method).
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

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


def _delegation(edge: Any) -> dict[str, int]:
    """How many graph nodes XNNPACK took vs portable kernels."""
    gm = edge.exported_program().graph_module
    delegated = sum(1 for n in gm.graph.nodes if n.op == "call_function" and "executorch_call_delegate" in str(n.target))
    portable = sum(1 for n in gm.graph.nodes if n.op == "call_function" and "executorch_call_delegate" not in str(n.target)
                   and "getitem" not in str(n.target))
    return {"delegate_calls": delegated, "portable_nodes": portable}


EXPORTERS.register("executorch", ExecuTorchExporter())
