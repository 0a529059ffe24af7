"""`edgetk export MODEL_OR_ARTIFACT --format onnx|executorch|tvm [--target PROFILE] -o OUT [--json]`."""
from __future__ import annotations

from typing import Any

import typer

from .common import console, emit_json, kv_table, progress


def summary(art: Any) -> dict[str, Any]:
    """What the CLI and benchmarks show for an exported artifact: sizes and parity."""
    m = art.manifest
    parity = m.get("parity", {})
    golden = parity.get("golden")
    out = {"artifact": str(art.root), "format": m.get("format"), "source_model": m.get("source_model"),
           "target": (m.get("target") or {}).get("name"), "total_bytes": art.total_bytes,
           "files": {k: v["bytes"] for k, v in m["files"].items()}, "export_seconds": m.get("export_seconds"),
           "parity_max_abs": parity.get("max_abs"), "parity_max_rel": parity.get("max_rel"),
           "atol": parity.get("atol"), "rtol": parity.get("rtol"),
           "custom_ops": (m.get("compression") or {}).get("custom_ops", {})}
    if golden:
        out["golden_steps"] = golden["steps"]
        out["golden_identical"] = golden["identical"]
    return out


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_(model: str = typer.Argument(..., help="zoo name, HF directory, .gguf file or compressed artifact"),
                format: str = typer.Option("onnx", "--format", "-f", help="onnx, executorch or tvm"),
                target: str = typer.Option(None, "--target", help="device profile name (see `edgetk devices`)"),
                out: str = typer.Option(..., "--out", "-o", help="output artifact directory"),
                max_seq_len: int = typer.Option(64, "--max-seq-len", min=2, help="decoders: KV-cache length"),
                golden_steps: int = typer.Option(32, "--golden-steps", min=0,
                                                 help="decoders: greedy tokens checked against eager"),
                atol: float = typer.Option(None, "--atol", help="parity: absolute tolerance"),
                rtol: float = typer.Option(None, "--rtol", help="parity: relative tolerance"),
                allow_pickle: bool = typer.Option(False, "--allow-pickle"),
                json_: bool = typer.Option(False, "--json", help="print one JSON line")) -> None:
        """Export a model to ONNX, ExecuTorch or TVM; runs it in that runtime and checks parity with eager."""
        from edgetk.exporters import ExportConfig, export

        from ..models import load

        cfg = ExportConfig(format=format, max_seq_len=max_seq_len, golden_steps=golden_steps, atol=atol, rtol=rtol)
        with progress(json_):
            lm = load(model, allow_pickle=allow_pickle)
            art = export(lm, None, target=target, out=out, config=cfg)
        result = summary(art)
        if json_:
            emit_json(result)
        else:
            show = {k: v for k, v in result.items() if k not in ("files", "custom_ops")}
            show.update({f"file {k}": v for k, v in result["files"].items()})
            show.update({f"op {k}": f"{v['count']}x, {v['lowering']}" for k, v in result["custom_ops"].items()})
            console.print(kv_table(f"export {lm.name} -> {format}", show))
