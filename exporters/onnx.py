"""ONNX export: torch.onnx (dynamo) from the ExportedProgram, edgetk ops as edgetk-domain nodes with bodies.

Each edgetk custom op is translated (custom_translation_table) into standard ONNX ops around one node in
the `edgetk` domain, and the model carries a FunctionProto for that node written in standard ops, so stock
onnxruntime runs the file while a runtime with a native edgetk kernel can take the node as is.

`edgetk::codebook_gemm` -> Gather(perm) / Slice / MatMul(outliers) / Mul(scale) / Add(bias) around
`edgetk.CodebookGemm(xq, codes, codebooks; code_bits, n_vec)`, the LUT-GEMV core: per input vector the dot
products with every codeword, then a gather-and-sum over each row's unpacked codes. The packed uint8
codes and the codebooks stay initializers; no dense weight is ever in the file (the onnxscript optimizer
cannot fold through the unknown node, the body is attached after it ran).

`edgetk::blockwise_gemm` (the RTN format) -> onnxruntime's native `com.microsoft.MatMulNBits` (codes reshaped to
its [N, n_blocks, blob] layout, float zero point -lo/scale, both computed from the stored fp16 tensors in the
graph), + Add(bias): a native kernel, so no edgetk-domain node or body.

Adding an op = one entry in LOWERINGS (translation + schema, plus a function builder for edgetk-domain nodes).
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from edgetk.errors import UnsupportedOpError, require

from . import EXPORTERS
from .common import decomposes, ExportConfig, Exporter, ExportPlan, TargetInfo

log = logging.getLogger(__name__)
# torch.onnx rebuilds its op registry per export and warns about torchvision ops every time
logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
DOMAIN = "edgetk"
DOMAIN_VERSION = 1
IR_VERSION = 10  # onnx 1.23 writes 14; onnxruntime 1.31 reads at most 13


@dataclass(frozen=True)
class OnnxLowering:
    translate: Callable[..., Any]                 # custom_translation_table entry (onnxscript)
    schema: Callable[[], Any]                     # -> onnx.defs.OpSchema of the node (onnxscript needs one to emit it)
    function: Callable[[int], Any] | None = None  # opset -> onnx.FunctionProto (body in standard ops)


# -- edgetk::codebook_gemm ----------------------------------------------------------------------------
def _cbg_schema():
    from onnx.defs import OpSchema

    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    return OpSchema(
        "CodebookGemm", DOMAIN, DOMAIN_VERSION,
        doc="y[B, O] = LUT-GEMV of x[B, in_q] with packed codes[S, O, row_bytes] into codebooks[S, G, K, V]",
        inputs=[P("x", "T"), P("codes", "tensor(uint8)"), P("codebooks", "C")], outputs=[P("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""),
                          ("C", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[A("code_bits", OpSchema.AttrType.INT, "bits per code"),
                    A("n_vec", OpSchema.AttrType.INT, "codes per row")])


def _cbg_translate(x, codes, codebooks, perm, outlier_w, scale, bias, in_features, vec_len, code_bits):
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    et = Opset(DOMAIN, DOMAIN_VERSION)
    n_out = int(outlier_w.shape[1]) if len(outlier_w.shape) == 2 else 0
    in_q = in_features - n_out
    n_vec = -(-in_q // vec_len)
    lead = op.Shape(x, end=-1)
    x2 = op.Reshape(x, op.Constant(value_ints=[-1, in_features]))
    if int(perm.shape[0]) > 0:
        x2 = op.Gather(x2, perm, axis=1)
    xq = op.Slice(x2, op.Constant(value_ints=[n_out]), op.Constant(value_ints=[in_features]),
                  op.Constant(value_ints=[1])) if n_out else x2
    y = et.CodebookGemm(xq, codes, codebooks, code_bits=code_bits, n_vec=n_vec)
    if n_out:
        xo = op.Slice(x2, op.Constant(value_ints=[0]), op.Constant(value_ints=[n_out]), op.Constant(value_ints=[1]))
        y = op.Add(y, op.MatMul(xo, op.Transpose(op.CastLike(outlier_w, x), perm=[1, 0])))
    if int(scale.shape[0]) > 0:
        y = op.Mul(y, op.CastLike(scale, x))
    if int(bias.shape[0]) > 0:
        y = op.Add(y, op.CastLike(bias, x))
    out_f = op.Shape(codes, start=1, end=2)
    return op.Reshape(y, op.Concat(lead, out_f, axis=0))


def _cbg_function(opset: int):
    """FunctionProto edgetk.CodebookGemm in standard ops (opset >= 18: BitwiseAnd, ReduceSum axes input)."""
    import onnx
    from onnx import TensorProto, helper as h

    nodes: list = []

    def n(op, ins, outs, **attrs):
        nodes.append(h.make_node(op, ins, [outs] if isinstance(outs, str) else outs, **attrs))

    def c(name, vals, dtype=TensorProto.INT64, dims=None):
        n("Constant", [], name, value=h.make_tensor(name + "_t", dtype, [len(vals)] if dims is None else dims, vals))

    def ref(name, attr):
        node = h.make_node("Constant", [], [name])
        node.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name=attr, type=onnx.AttributeProto.INT))
        nodes.append(node)

    ref("bits", "code_bits"), ref("nvec", "n_vec")
    c("zero", [0]), c("one", [1]), c("neg1", [-1]), c("s0", [0], dims=[]), c("s1", [1], dims=[])
    c("s2", [2], dims=[]), c("s8", [8], dims=[]), c("u1", [1], TensorProto.UINT8, dims=[])
    n("Reshape", ["nvec", "one"], "nvec1")
    # shapes
    n("Shape", ["x"], "B", start=0, end=1), n("Shape", ["x"], "inq", start=1, end=2)
    n("Shape", ["codebooks"], "S", start=0, end=1), n("Shape", ["codebooks"], "G", start=1, end=2)
    n("Shape", ["codebooks"], "K", start=2, end=3), n("Shape", ["codebooks"], "V", start=3, end=4)
    # x -> [B, n_vec, V], zero-padded
    n("Mul", ["nvec1", "V"], "total"), n("Sub", ["total", "inq"], "padn")
    n("Concat", ["zero", "zero", "zero", "padn"], "pads", axis=0)
    n("Pad", ["x", "pads"], "xpad")
    n("Concat", ["B", "nvec1", "V"], "xv_shape", axis=0), n("Reshape", ["xpad", "xv_shape"], "xv")
    # LUT [S, G, B, n_vec, K] = xv . codebooks^T, flattened to [S, G, B, n_vec*K]
    n("CastLike", ["codebooks", "x"], "cbx"), n("Transpose", ["cbx"], "cbT", perm=[0, 1, 3, 2])
    c("ax2", [2]), n("Unsqueeze", ["cbT", "ax2"], "cb5"), n("MatMul", ["xv", "cb5"], "lut")
    c("flat4", [0, 0, 0, -1]), n("Reshape", ["lut", "flat4"], "lutf")
    # unpack codes [S, O, row_bytes] -> idx [S, O, n_vec] (little-endian bit stream)
    n("Mul", ["nvec", "bits"], "nbits"), n("Range", ["s0", "nbits", "s1"], "bit_i")
    n("Div", ["bit_i", "s8"], "byte_i"), n("Mod", ["bit_i", "s8"], "shift_i")
    n("Gather", ["codes", "byte_i"], "gb", axis=2)
    n("Cast", ["shift_i"], "shift_u8", to=TensorProto.UINT8)
    n("BitShift", ["gb", "shift_u8"], "gbs", direction="RIGHT"), n("BitwiseAnd", ["gbs", "u1"], "bit_u8")
    n("Cast", ["bit_u8"], "bit64", to=TensorProto.INT32)  # int32 indices: half the RAM if folded at load
    n("Reshape", ["bits", "one"], "bits1")
    n("Concat", ["zero", "zero", "nvec1", "bits1"], "bits_shape", axis=0)
    n("Reshape", ["bit64", "bits_shape"], "bits4")
    n("Range", ["s0", "bits", "s1"], "t"), n("Pow", ["s2", "t"], "w2_64"), n("Cast", ["w2_64"], "w2", to=TensorProto.INT32)
    n("Mul", ["bits4", "w2"], "bw"), n("ReduceSum", ["bw", "neg1"], "idx", keepdims=0)
    # flat index j*K + idx, grouped rows: [S, G, 1, (O/G)*n_vec] broadcast over B
    n("Range", ["s0", "nvec", "s1"], "j"), n("Mul", ["j", "K"], "jk64"), n("Cast", ["jk64"], "jk", to=TensorProto.INT32)
    n("Add", ["idx", "jk"], "flat")
    n("Concat", ["S", "G", "one", "neg1"], "f4_shape", axis=0), n("Reshape", ["flat", "f4_shape"], "flat4d")
    n("Concat", ["one", "one", "B", "one"], "exp_shape", axis=0), n("Expand", ["flat4d", "exp_shape"], "flatE")
    n("GatherElements", ["lutf", "flatE"], "picked", axis=3)
    n("Concat", ["zero", "zero", "zero", "neg1", "nvec1"], "p5_shape", axis=0)
    n("Reshape", ["picked", "p5_shape"], "p5")
    c("ax04", [0, 4]), n("ReduceSum", ["p5", "ax04"], "ysum", keepdims=0)  # [G, B, O/G]
    n("Transpose", ["ysum"], "yt", perm=[1, 0, 2])
    n("Concat", ["B", "neg1"], "y_shape", axis=0), n("Reshape", ["yt", "y_shape"], "y")
    return h.make_function(DOMAIN, "CodebookGemm", ["x", "codes", "codebooks"], ["y"], nodes,
                           [h.make_opsetid("", opset)], attributes=["code_bits", "n_vec"])


# -- edgetk::blockwise_gemm -> com.microsoft.MatMulNBits ----------------------------------------------
MS_DOMAIN = "com.microsoft"


def _mnb_schema():
    """The subset of onnxruntime's contrib MatMulNBits schema used here (onnxscript needs a schema to emit it)."""
    from onnx.defs import OpSchema

    P, A, I = OpSchema.FormalParameter, OpSchema.Attribute, OpSchema.AttrType.INT
    return OpSchema(
        "MatMulNBits", MS_DOMAIN, 1, doc="onnxruntime contrib op: A[..., K] x dequant(B)^T, B in N-bit blocks",
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3")], outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "")],
        attributes=[A("K", I, ""), A("N", I, ""), A("bits", I, ""), A("block_size", I, ""),
                    A("accuracy_level", I, "")])


def _bwg_translate(x, codes, scale, lo, bias, in_features, bits, group):
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    ms = Opset(MS_DOMAIN, 1)
    out_f, n_groups = int(scale.shape[0]), int(scale.shape[1])
    b = op.Reshape(codes, op.Constant(value_ints=[out_f, n_groups, group * bits // 8]))
    s = op.CastLike(scale, x)
    zp = op.Neg(op.Div(op.CastLike(lo, x), s))  # (q - zp) * s == lo + s * q
    y = ms.MatMulNBits(x, b, s, zp, K=in_features, N=out_f, bits=bits, block_size=group, accuracy_level=0)
    return op.Add(y, op.CastLike(bias, x)) if int(bias.shape[0]) > 0 else y


LOWERINGS: dict[str, OnnxLowering] = {
    "edgetk::codebook_gemm": OnnxLowering(_cbg_translate, _cbg_schema, _cbg_function),
    "edgetk::blockwise_gemm": OnnxLowering(_bwg_translate, _mnb_schema),
}


@lru_cache(maxsize=None)
def _register_schema(qualname: str) -> None:
    import onnx

    schema = LOWERINGS[qualname].schema()
    try:
        onnx.defs.get_schema(schema.name, DOMAIN_VERSION, schema.domain)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(schema)


@lru_cache(maxsize=1)
def _torchlib_registry():
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib()


class OnnxExporter(Exporter):
    format = "onnx"
    cache_mode = "explicit"
    dynamic_shapes = "any"
    extra = "onnx"

    def require(self) -> None:
        for mod in ("onnx", "onnxruntime", "onnxscript"):
            require(mod, self.extra)

    def unsupported_reason(self, op: torch._ops.OpOverload) -> str | None:
        try:
            if _torchlib_registry().is_registered(op) or decomposes(op):
                return None
        except Exception:  # private registry API changed: let torch.onnx decide
            log.debug("torchlib registry unavailable", exc_info=True)
            return None
        return f"torch.onnx has no translation or decomposition for {op}"

    def lower(self, ep: torch.export.ExportedProgram, plan: ExportPlan, root: Path, target: TargetInfo,
              cfg: ExportConfig) -> dict[str, Any]:
        import onnx

        used = [q for q in _custom_ops_in(ep) if q in LOWERINGS]
        for q in used:
            _register_schema(q)
        table = {_overload(q): LOWERINGS[q].translate for q in used}
        with contextlib.redirect_stdout(io.StringIO()) as captured:
            try:
                prog = torch.onnx.export(ep, (), dynamo=True, input_names=plan.input_names,
                                         output_names=plan.output_names, custom_translation_table=table,
                                         optimize=cfg.optimize, opset_version=cfg.opset, verbose=False,
                                         external_data=False)
            except Exception as exc:
                raise UnsupportedOpError(f"torch.onnx could not convert {type(plan.module).__name__}: "
                                         f"{str(exc).splitlines()[0][:300]}",
                                         hint="rerun with --debug; decompose the failing op or export "
                                              "to another format") from exc
        log.debug("torch.onnx: %s", captured.getvalue())
        model = prog.model_proto
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        functions = [q for q in used if LOWERINGS[q].function is not None]
        for q in functions:
            model.functions.append(LOWERINGS[q].function(opset))
        if functions and not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
        if any(n.domain == MS_DOMAIN for n in model.graph.node) and \
                not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        model.ir_version = min(model.ir_version, IR_VERSION)
        _strip_debug_info(model.graph)
        refolded = _refold_matmulnbits(model)
        if refolded:
            log.debug("MatMulNBits scales back to fp16 in the file: %d bytes saved", refolded)
        path = root / "model.onnx"
        onnx.save_model(model, str(path))
        native = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain == MS_DOMAIN})
        return {"file": "model.onnx", "onnx": {"opset": opset, "ir_version": model.ir_version,
                                               "functions": [f"{f.domain}.{f.name}" for f in model.functions],
                                               "native_ops": native}}


def _refold_matmulnbits(model) -> int:
    """Undo the optimizer's folding of MatMulNBits' fp16 scale/lo into fp32 scale/zero-point initializers (it folds
    tensors below 8192 elements, doubling their bytes): where the fp32 values provably come from fp16 ones, store
    the fp16 tensors and recompute in the graph, exactly as before folding (onnxruntime folds that at load).
    Returns the bytes saved."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    saved, new_nodes = 0, []
    for node in model.graph.node:
        if node.domain != MS_DOMAIN or node.op_type != "MatMulNBits" or len(node.input) < 4:
            continue
        s_name, z_name = node.input[2], node.input[3]
        if s_name not in inits or z_name not in inits or inits[s_name].data_type != TensorProto.FLOAT \
                or inits[z_name].data_type != TensorProto.FLOAT:
            continue
        s = numpy_helper.to_array(inits[s_name])
        zp = numpy_helper.to_array(inits[z_name])
        s16, lo16 = s.astype(np.float16), (-zp * s).astype(np.float16)
        if not (np.array_equal(s16.astype(np.float32), s)
                and np.array_equal(-(lo16.astype(np.float32) / s16.astype(np.float32)), zp)):
            continue
        base = node.name or s_name
        for name, arr in ((f"{base}_scale_f16", s16), (f"{base}_lo_f16", lo16)):
            model.graph.initializer.append(numpy_helper.from_array(arr, name))
        new_nodes += [helper.make_node("Cast", [f"{base}_scale_f16"], [f"{base}_scale"], to=TensorProto.FLOAT),
                      helper.make_node("Cast", [f"{base}_lo_f16"], [f"{base}_lo"], to=TensorProto.FLOAT),
                      helper.make_node("Div", [f"{base}_lo", f"{base}_scale"], [f"{base}_lo_div"]),
                      helper.make_node("Neg", [f"{base}_lo_div"], [f"{base}_zp"])]
        node.input[2], node.input[3] = f"{base}_scale", f"{base}_zp"
        saved += s.nbytes + zp.nbytes - s16.nbytes - lo16.nbytes
    if new_nodes:
        nodes = new_nodes + list(model.graph.node)  # the new nodes read initializers only: topological order kept
        used = {i for n in nodes for i in n.input}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return saved


def _strip_debug_info(graph) -> None:
    """Drop per-node Python stack traces / doc strings torch.onnx records (often larger than a small model)."""
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                _strip_debug_info(attr.g)


def _custom_ops_in(ep: torch.export.ExportedProgram) -> list[str]:
    from .common import op_name

    names = {op_name(n.target) for n in ep.graph.nodes
             if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)}
    return sorted(q for q in names if not q.startswith(("aten::", "prims::")))


def _overload(qualname: str) -> torch._ops.OpOverload:
    ns, name = qualname.split("::")
    return getattr(getattr(torch.ops, ns), name).default


EXPORTERS.register("onnx", OnnxExporter())
