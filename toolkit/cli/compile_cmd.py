"""`edgetk compile ARTIFACT --target PROFILE -o OUT`: build for a device (TVM aarch64 / CUDA, NPU graph)."""
from __future__ import annotations

from typing import Optional

import typer

from .common import console, emit_json, kv_table, progress


def register(app: typer.Typer) -> None:
    @app.command("compile")
    def compile_(artifact: str = typer.Argument(..., help="artifact directory (or zoo model name for TVM targets)"),
                 target: str = typer.Option(..., "--target", "-t", help="device profile (edgetk devices list)"),
                 out: Optional[str] = typer.Option(None, "--out", "-o", help="output artifact directory"),
                 json_: bool = typer.Option(False, "--json")) -> None:
        """Compile an artifact for a target profile; toolchains are checked first."""
        from edgetk.devices.compile import compile_artifact

        with progress(json_):
            art = compile_artifact(artifact, target, out)
        data = {"artifact": str(art.root), "target": target, "format": art.manifest.get("format"),
                "kind": art.kind, "bytes": art.total_bytes, "files": sorted(art.manifest.get("files", {}))}
        if "placement" in art.manifest:
            data["placement"] = art.manifest["placement"]["summary"]
        if json_:
            emit_json(data)
        else:
            shown = {k: v for k, v in data.items() if k not in ("files", "placement")}
            shown["files"] = ", ".join(data["files"])
            if "placement" in data:
                s = data["placement"]
                shown["NPU placement"] = (f"{s['compute_on_npu']}/{s['compute_nodes']} compute nodes on the NPU; "
                                          f"CPU fallback: {s['cpu_fallback_ops']} (see placement.md)")
            console.print(kv_table(f"compiled for {target}", shown))
