"""NPU-ready graphs: static shapes, static int8 QDQ quantization, and a per-node placement report.

    art = compile_npu(onnx_artifact, load_profile("snapdragon-8gen3"), out="out/npu")
    art.manifest["placement"]["summary"]     # {"nodes": 412, "npu": 389, "cpu": 23, ...}

1. Static shapes: every dynamic input dimension is fixed (batch 1, sequence = `seq_len`, or the artifact's
   declared example shapes) and shape inference must then give every tensor a static shape.
2. Quantization: `onnxruntime.quantization.quantize_static` in QDQ format, int8 weights, int8 (or int16)
   activations, calibrated on real data: token windows of the calibration text for token inputs when the
   artifact carries a tokenizer, otherwise seeded random samples of the declared shapes.
3. Placement: each node of the quantized graph is listed as NPU or CPU with the reason, from the profile's
   NPU op set and dtypes (the style of a profiling job's per-layer compute-unit listing).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from edgetk.errors import ConfigError, UnsupportedOpError, require

log = logging.getLogger(__name__)
QDQ = {"QuantizeLinear", "DequantizeLinear"}
_ONNX_INT = {3: "int8", 2: "uint8", 5: "int16", 4: "uint16"}
_NP = {1: np.float32, 7: np.int64, 6: np.int32, 9: np.bool_, 10: np.float16}


@dataclass(frozen=True)
class Placement:
    index: int
    name: str
    op: str
    unit: str          # "NPU" | "CPU"
    reason: str
    shape: str         # first output's shape

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------- static shapes
def make_static(model, shapes: dict[str, list[int]]):
    """Fix every graph input's dims to `shapes[name]`, infer shapes, and demand that all are static."""
    onnx = require("onnx", "onnx")
    inits = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        if vi.name not in shapes:
            raise ConfigError(f"no static shape for input {vi.name!r}", hint="declare it in manifest['inputs']['shapes']")
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != len(shapes[vi.name]):
            raise ConfigError(f"input {vi.name!r} has rank {len(dims)}, static shape {shapes[vi.name]} has another",
                              hint="fix the declared input shapes")
        for d, v in zip(dims, shapes[vi.name]):
            d.ClearField("dim_param")
            d.dim_value = int(v)
    for vi in list(model.graph.value_info) + list(model.graph.output):
        for d in vi.type.tensor_type.shape.dim:  # stale symbolic dims would survive inference
            if d.HasField("dim_param"):
                d.ClearField("dim_param")
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    return model


def dynamic_tensors(model) -> list[str]:
    out = []
    for vi in list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape") or any(d.dim_value <= 0 for d in t.shape.dim):
            out.append(vi.name)
    return out


def static_input_shapes(art, model, seq_len: int) -> dict[str, list[int]]:
    spec = art.manifest.get("inputs") or {}
    if spec.get("shapes") and spec.get("names"):
        return {n: list(s) for n, s in zip(spec["names"], spec["shapes"])}
    inits = {i.name for i in model.graph.initializer}
    return {vi.name: [d.dim_value if d.dim_value > 0 else (1 if i == 0 else seq_len)
                      for i, d in enumerate(vi.type.tensor_type.shape.dim)]
            for vi in model.graph.input if vi.name not in inits}


# ------------------------------------------------------------------------------------------- calibration
def calibration_samples(model, shapes: dict[str, list[int]], n: int, tokenizer=None, seed: int = 0
                        ) -> list[dict[str, np.ndarray]]:
    """n feeds for calibration: real text windows for int64 token inputs when a tokenizer is given."""
    rng = np.random.default_rng(seed)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.input}
    windows = None
    if tokenizer is not None:
        from edgetk.data import calib_text

        ids = np.asarray(tokenizer.encode(calib_text()[: 200_000]), dtype=np.int64)
        windows = ids
    feeds = []
    for k in range(n):
        feed = {}
        for name, shape in shapes.items():
            dt = _NP.get(types.get(name, 1), np.float32)
            size = int(np.prod(shape))
            if np.issubdtype(dt, np.integer) and "mask" in name:
                feed[name] = np.ones(shape, dtype=dt)
            elif np.issubdtype(dt, np.integer) and ("pos" in name or "position" in name):
                feed[name] = np.broadcast_to(np.arange(shape[-1], dtype=dt), shape).copy() if shape else np.zeros(shape, dt)
            elif np.issubdtype(dt, np.integer):
                if windows is not None and len(windows) > size:
                    start = int(rng.integers(0, len(windows) - size))
                    feed[name] = windows[start:start + size].reshape(shape).astype(dt)
                else:
                    feed[name] = rng.integers(1, 100, size=shape).astype(dt)
            else:
                feed[name] = rng.standard_normal(shape).astype(dt)
        feeds.append(feed)
    return feeds


class _Reader:
    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - called by some calibrators
        pass


def quantize(model_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]], activation_dtype: str = "int8"):
    """Static QDQ quantization with onnxruntime: int8 weights, int8/int16 activations, MinMax calibration."""
    q = require("onnxruntime.quantization", "onnx")
    act = {"int8": q.QuantType.QInt8, "int16": q.QuantType.QInt16}
    if activation_dtype not in act:
        raise ConfigError(f"activation dtype {activation_dtype!r} is not supported", hint=f"use one of {sorted(act)}")
    reader = type("EdgetkCalibReader", (_Reader, q.CalibrationDataReader), {})(feeds)
    q.quantize_static(str(model_path), str(out_path), reader, quant_format=q.QuantFormat.QDQ,
                      activation_type=act[activation_dtype], weight_type=q.QuantType.QInt8, per_channel=False,
                      extra_options={"ActivationSymmetric": activation_dtype == "int16"})


# ------------------------------------------------------------------------------------------- placement
def _shape_of(model) -> dict[str, str]:
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = "x".join(str(d.dim_value) if d.dim_value > 0 else (d.dim_param or "?") for d in dims)
    return shapes


def placement(model, npu) -> list[Placement]:
    """Every node of a QDQ graph as NPU or CPU with the reason (profile NPU ops + dtypes + static shapes)."""
    onnx = require("onnx", "onnx")
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    shapes = _shape_of(model)
    producer = {o: n for n in model.graph.node for o in n.output}
    init_types = {i.name: i.data_type for i in model.graph.initializer}
    ops = set(npu.ops)
    zp_dtype = {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        if n.input[0] in init_types:  # a quantized weight or (int32) bias, not an activation
            zp_dtype[n.output[0]] = "const"
        else:
            zp = init_types.get(n.input[2]) if len(n.input) > 2 else 2
            zp_dtype[n.output[0]] = _ONNX_INT.get(zp, "?")
    rows: list[Placement] = []
    compute: dict[int, bool] = {}
    for i, n in enumerate(model.graph.node):
        if n.op_type in QDQ:
            continue
        reason, ok = _node_reason(n, ops, npu, shapes, producer, zp_dtype)
        compute[id(n)] = ok
        rows.append(Placement(i, n.name or f"node{i}", n.op_type, "NPU" if ok else "CPU", reason,
                              shapes.get(n.output[0], "?") if n.output else ""))
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    for i, n in enumerate(model.graph.node):
        if n.op_type not in QDQ:
            continue
        near = [producer.get(n.input[0])] + consumers.get(n.output[0], [])
        ok = any(m is not None and m.op_type not in QDQ and compute.get(id(m), False) for m in near)
        reason = ("quantization boundary, folded into the adjacent NPU op" if ok else
                  "quantization boundary of CPU-fallback nodes or graph input/output")
        rows.append(Placement(i, n.name or f"node{i}", n.op_type, "NPU" if ok else "CPU", reason,
                              shapes.get(n.output[0], "?")))
    return sorted(rows, key=lambda r: r.index)


def _node_reason(n, ops: set[str], npu, shapes: dict[str, str], producer: dict, zp_dtype: dict
                 ) -> tuple[str, bool]:
    if n.op_type not in ops:
        return f"op {n.op_type} is not in the {npu.name} op set", False
    outs = [shapes.get(o, "?") for o in n.output if o]
    if npu.static_shapes and any("?" in s or not all(p.isdigit() for p in s.split("x") if p) for s in outs):
        return f"dynamic output shape {outs[0]} (the NPU needs static shapes)", False
    act_inputs = [x for x in n.input if x and x in producer]
    if not act_inputs:
        return "constant-only node", True
    kinds = []
    for x in act_inputs:
        p = producer[x]
        if p.op_type == "DequantizeLinear":
            kinds.append(zp_dtype.get(x, "int8"))
        elif p.op_type in ("Shape", "Constant", "ConstantOfShape", "Range"):
            kinds.append("shape")
        else:
            kinds.append("float32")
    kinds = [k for k in kinds if k not in ("shape", "const")]
    if not kinds:
        return "constant-only node", True
    bad = [k for k in kinds if k not in npu.activation_dtypes]
    if bad:
        return f"activation input is {bad[0]}, not quantized to {'/'.join(npu.activation_dtypes)}", False
    return f"{'/'.join(sorted(set(kinds)))} QDQ on the NPU", True


def summarize(rows: Iterable[Placement]) -> dict[str, Any]:
    rows = list(rows)
    cpu = [r for r in rows if r.unit == "CPU"]
    fallback_ops: dict[str, int] = {}
    for r in cpu:
        if r.op not in QDQ:  # compute ops only; their quantization boundaries follow them
            fallback_ops[r.op] = fallback_ops.get(r.op, 0) + 1
    compute = [r for r in rows if r.op not in QDQ]
    return {"nodes": len(rows), "npu": len(rows) - len(cpu), "cpu": len(cpu),
            "compute_nodes": len(compute), "compute_on_npu": sum(r.unit == "NPU" for r in compute),
            "npu_fraction": (sum(r.unit == "NPU" for r in compute) / len(compute)) if compute else 0.0,
            "cpu_fallback_ops": dict(sorted(fallback_ops.items(), key=lambda kv: -kv[1]))}


def placement_markdown(rows: list[Placement], summary: dict[str, Any], title: str) -> str:
    lines = [f"# NPU placement: {title}", "",
             f"{summary['compute_on_npu']}/{summary['compute_nodes']} compute nodes on the NPU "
             f"({100 * summary['npu_fraction']:.1f}%); {summary['cpu']} nodes fall back to the CPU.", "",
             "| # | node | op | unit | shape | reason |", "|---|---|---|---|---|---|"]
    lines += [f"| {r.index} | {r.name} | {r.op} | {r.unit} | {r.shape} | {r.reason} |" for r in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- the pipeline
def compile_npu(art, profile, out, seq_len: int = 16, calib_samples: int = 8, activation_dtype: str | None = None):
    """ONNX artifact -> NPU-ready artifact (static, QDQ int8) with placement.json and placement.md."""
    import json
    import tempfile

    onnx = require("onnx", "onnx")
    from edgetk.artifact import Artifact, ArtifactWriter
    from edgetk.progress import task

    if profile.npu is None:
        raise ConfigError(f"target {profile.name!r} has no NPU", hint="pick a profile with an [npu] section")
    if art.manifest.get("format") != "onnx":
        raise UnsupportedOpError(f"the NPU path quantizes ONNX graphs; {art.root} is {art.manifest.get('format')!r}",
                                 hint="export with --format onnx first (edgetk export MODEL --format onnx)")
    act = activation_dtype or profile.npu.activation_dtypes[0]
    src = art.file(art.manifest.get("file", "model.onnx"))
    with task("npu: static shapes + calibration", 3) as t:
        model = onnx.load(str(src))
        shapes = static_input_shapes(art, model, seq_len)
        model = make_static(model, shapes)
        dyn = dynamic_tensors(model) if profile.npu.static_shapes else []
        t.advance()
        tok = None
        if "tokenizer.json" in art.manifest.get("files", {}):
            from edgetk.models.tokenizer import Tokenizer

            tok = Tokenizer.from_file(art.file("tokenizer.json"))
        feeds = calibration_samples(model, shapes, calib_samples, tok)
        with tempfile.TemporaryDirectory(prefix="edgetk-npu-") as d:
            static_path, q_path = Path(d) / "static.onnx", Path(d) / "model.onnx"
            onnx.save(model, str(static_path), save_as_external_data=model.ByteSize() > 1.8e9)
            quantize(static_path, q_path, feeds, act)
            t.advance()
            qmodel = onnx.load(str(q_path))
        rows = placement(qmodel, profile.npu)
        summary = {**summarize(rows), "dynamic_tensors_after_fixing": len(dyn), "activation_dtype": act,
                   "weight_dtype": "int8", "calibration_samples": calib_samples, "input_shapes": shapes}
        t.advance()
    names = list(shapes)
    with ArtifactWriter(out, kind="npu", format="onnx", file="model.onnx", model_kind=art.manifest.get("model_kind"),
                        target=profile.to_dict(), source_artifact=str(art.root),
                        inputs={"names": names, "shapes": [shapes[n] for n in names],
                                "dtypes": [np.dtype(_NP.get(_elem(model, n), np.float32)).name for n in names]},
                        quantization={"format": "QDQ", "weights": "int8", "activations": act,
                                      "calibration": "text windows" if tok else "seeded random samples"},
                        placement={"summary": summary, "file": "placement.json"}) as w:
        onnx.save(qmodel, str(w.path("model.onnx")))
        w.path("placement.json").write_text(json.dumps({"summary": summary, "nodes": [r.to_dict() for r in rows]},
                                                       indent=1))
        w.path("placement.md").write_text(placement_markdown(rows, summary, f"{art.root.name} on {profile.name}"))
    return Artifact.load(out)


def _elem(model, name: str) -> int:
    for vi in model.graph.input:
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    return 1
