"""edgetk.exporters: any nn.Module (CNNs included), zoo encoders and decoders -> ONNX, ExecuTorch, TVM artifacts.

    art = edgetk.export(model, (x,), format="onnx", out="out/cnn-onnx")
    Session(art).run([x.numpy()])

Every export traces with torch.export, checks every node against the format's (and the target's)
operator support before writing anything, writes the artifact atomically, and runs a parity check
in the format's real runtime (recorded in the manifest under "parity"; `ParityError` beyond tolerance).
Decoders are exported as a one-token step with the KV cache carried across steps (see `decoder.py`)
and checked by a greedy golden run against eager.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from edgetk.artifact import Artifact, ArtifactWriter
from edgetk.errors import ConfigError
from edgetk.progress import task
from edgetk.registry import Registry

from .common import (CUSTOM_OPS, ExportConfig, Exporter, ExportPlan, TargetInfo, check_dynamic_shapes,
                     check_support, parity_check, resolve_target, trace)

EXPORTERS: Registry[Exporter] = Registry("export format")
# format -> module that registers its exporter when imported (lazily: heavy backends load only when used)
FORMAT_MODULES = {"onnx": "edgetk.exporters.onnx", "executorch": "edgetk.exporters.executorch",
                  "tvm": "edgetk.exporters.tvm"}


def get_exporter(fmt: str) -> Exporter:
    if fmt not in EXPORTERS and fmt in FORMAT_MODULES:
        importlib.import_module(FORMAT_MODULES[fmt])
    return EXPORTERS.get(fmt)


def export(model_or_loaded: Any, example_inputs: Sequence[torch.Tensor] | None = None, format: str = "onnx",
           target: Any = None, out: str | os.PathLike | None = None, *, dynamic_shapes: Any = None,
           input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
           config: ExportConfig | None = None, **opts: Any) -> Artifact:
    """Export to `format` under `out`; `opts` are ExportConfig fields (atol, rtol, max_seq_len, ...)."""
    from edgetk.models import load

    cfg = config or _make_config(format, opts)
    if out is None:
        raise ConfigError("export needs an output directory", hint="pass out=... (CLI: -o OUT)")
    exporter = get_exporter(cfg.format)
    exporter.require()
    tgt = resolve_target(target)
    loaded = load(model_or_loaded)
    plan = build_plan(loaded, example_inputs, cfg, exporter, dynamic_shapes, input_names, output_names)
    with _decoder_cache(plan, loaded), task(f"export {loaded.name} -> {cfg.format}", total=2) as progress:
        check_dynamic_shapes(plan, exporter, tgt)
        traced = trace(plan)
        custom = _custom_ops(traced, exporter.format)  # before a format decomposes them away
        ep = exporter.prepare(traced, plan)
        check_support(ep, exporter, tgt)
        progress.advance()
        art = _write(ep, plan, exporter, tgt, cfg, Path(out), custom)
        progress.advance()
        return art


def _make_config(fmt: str, opts: dict[str, Any]) -> ExportConfig:
    known = {f for f in ExportConfig.__dataclass_fields__}
    bad = sorted(set(opts) - known)
    if bad:
        raise ConfigError(f"unknown export option(s) {', '.join(bad)}", hint=f"known: {', '.join(sorted(known))}")
    return ExportConfig(format=fmt, **opts)


def build_plan(loaded: Any, example_inputs: Sequence[torch.Tensor] | None, cfg: ExportConfig, exporter: Exporter,
               dynamic_shapes: Any = None, input_names: Sequence[str] | None = None,
               output_names: Sequence[str] | None = None) -> ExportPlan:
    from .decoder import decoder_plan

    if example_inputs is None and loaded.kind == "decoder":
        return decoder_plan(loaded, cfg, exporter.cache_mode, exporter.tied_head_as_left_operand)
    if example_inputs is None and loaded.kind == "encoder":
        example_inputs = _encoder_inputs(loaded, cfg.encoder_seq_len)
    if example_inputs is None:
        raise ConfigError(f"{loaded.name} is a plain module: export needs example_inputs",
                          hint="pass a tuple of example tensors, e.g. export(model, (torch.randn(1, 3, 32, 32),))")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise ConfigError("example_inputs must be tensors", hint="pass a tuple of torch.Tensor")
    names = list(input_names) if input_names else _param_names(loaded.model, len(args))
    with torch.no_grad():
        n_out = len(_as_tuple(loaded.model(*args)))
    outs = list(output_names) if output_names else (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    return ExportPlan(loaded.model.eval(), args, names, outs, kind=loaded.kind, dynamic_shapes=dynamic_shapes,
                      source=loaded)


def _encoder_inputs(loaded: Any, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    tok = loaded.tokenizer
    if tok is None:
        ids = torch.arange(1, seq_len + 1).remainder(100)[None]
        return ids, torch.ones_like(ids)
    batch = tok.batch(["Edge devices run compressed models."], max_length=seq_len, pad_to=seq_len)
    return batch["input_ids"], batch["attention_mask"]


def _param_names(model: torch.nn.Module, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"input_{i}" for i in range(len(names), n)]


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


@contextlib.contextmanager
def _decoder_cache(plan: ExportPlan, loaded: Any):
    if plan.decoder is None:
        yield
        return
    from .decoder import cache_factory, cache_installed

    with cache_installed(loaded.model, plan.decoder["max_seq_len"], cache_factory(plan.decoder["mode"])):
        yield


def _io(plan: ExportPlan, ep: torch.export.ExportedProgram) -> tuple[dict, dict]:
    inputs = {"names": plan.input_names, "shapes": [list(a.shape) for a in plan.args],
              "dtypes": [str(a.dtype).removeprefix("torch.") for a in plan.args]}
    vals = [getattr(n, "meta", {}).get("val") for n in _output_nodes(ep)]
    outputs = {"names": plan.output_names,
               "shapes": [[int(d) if isinstance(d, int) else str(d) for d in v.shape] if v is not None else None
                          for v in vals],
               "dtypes": [str(v.dtype).removeprefix("torch.") if v is not None else None for v in vals]}
    return inputs, outputs


def _output_nodes(ep: torch.export.ExportedProgram) -> list:
    out = next(n for n in ep.graph.nodes if n.op == "output")
    nodes = list(out.args[0])
    n_mut = sum(1 for s in ep.graph_signature.output_specs if s.kind.name != "USER_OUTPUT")
    return nodes[n_mut:]


def _custom_ops(ep: torch.export.ExportedProgram, fmt: str) -> dict[str, dict]:
    from .common import op_name

    found: dict[str, dict] = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            name = op_name(node.target)
            if name in CUSTOM_OPS:
                entry = found.setdefault(name, {"count": 0, "lowering": CUSTOM_OPS[name].formats.get(fmt)})
                entry["count"] += 1
    return found


def _write(ep, plan: ExportPlan, exporter: Exporter, tgt: TargetInfo, cfg: ExportConfig, out: Path,
           custom: dict[str, dict]) -> Artifact:
    loaded = plan.source
    inputs, outputs = _io(plan, ep)
    manifest = dict(format=exporter.format, inputs=inputs, outputs=outputs, source_model=loaded.name,
                    source=loaded.source, source_sha256=loaded.source_sha256, model_kind=plan.kind,
                    compression={"configs": list(loaded.compression), "custom_ops": custom},
                    target=tgt.to_dict(), export_config=cfg.to_dict())
    if plan.decoder is not None:
        manifest["decoder"] = dict(plan.decoder, inputs=plan.input_names, outputs=plan.output_names)
    with ArtifactWriter(out, kind=exporter.format, **manifest) as w:
        t0 = time.perf_counter()
        info = exporter.lower(ep, plan, w.root, tgt, cfg)
        w.manifest.update(info)
        w.manifest["export_seconds"] = round(time.perf_counter() - t0, 3)
        if cfg.parity:
            w.manifest["parity"] = _parity(plan, exporter, cfg, w)
    return Artifact.load(out)


def _temp_artifact(w: ArtifactWriter) -> Artifact:
    files = {p.relative_to(w.root).as_posix(): {"bytes": p.stat().st_size}
             for p in w.root.rglob("*") if p.is_file()}
    return Artifact(w.root, {**w.manifest, "kind": w.kind, "files": files})


def _parity(plan: ExportPlan, exporter: Exporter, cfg: ExportConfig, w: ArtifactWriter) -> dict[str, Any]:
    from edgetk.kernels import table as kernel_table
    from edgetk.runtimes import Session

    # The eager side is the operator's definition: fast kernels (e.g. the int16-LUT "llvm" GEMV, ~1e-4 relative
    # drift by design) are compared against the reference in their own tests, not folded into export parity.
    with kernel_table.force("reference"):
        return _parity_against_reference(plan, cfg, Session(_temp_artifact(w)))


def _parity_against_reference(plan: ExportPlan, cfg: ExportConfig, sess: Any) -> dict[str, Any]:
    from .decoder import ExplicitStepper, MutableStepper, eager_stepper, golden, prompt_tokens

    tol = cfg.tolerance
    if plan.decoder is None:
        return parity_check(sess, plan.module, plan.args, plan.output_names, tol)
    meta = plan.decoder
    prompt = prompt_tokens(plan.source, meta["vocab_size"])
    if len(prompt) + cfg.golden_steps > meta["max_seq_len"]:
        raise ConfigError(f"config field 'golden_steps' = {cfg.golden_steps} plus the {len(prompt)}-token prompt "
                          f"exceeds max_seq_len={meta['max_seq_len']}", hint="raise max_seq_len")
    rt = (ExplicitStepper(sess.run, meta["cache_shape"]) if meta["mode"] == "explicit"
          else MutableStepper(sess.run))
    result = golden(rt, eager_stepper(plan), prompt, cfg.golden_steps, tol)
    return {"golden": result, "atol": tol.atol, "rtol": tol.rtol,
            "max_abs": result["logits_max_abs"], "max_rel": result["logits_max_rel"]}


__all__ = ["EXPORTERS", "FORMAT_MODULES", "ExportConfig", "Exporter", "export", "get_exporter"]
