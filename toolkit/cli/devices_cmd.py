"""`edgetk devices list|show|detect`: device profiles (TOML files; adding a device is adding a file)."""
from __future__ import annotations

import typer

from .common import console, emit_json, kv_table, table


def _flat(p) -> dict:
    d = p.to_dict()
    gpu, npu = d.pop("gpu"), d.pop("npu")
    d["cpu_features"] = ", ".join(d["cpu_features"])
    d["toolchain"] = ", ".join(d["toolchain"]) or "-"
    if gpu:
        d.update({f"gpu.{k}": v for k, v in gpu.items()})
    if npu:
        d.update({f"npu.{k}": (", ".join(v) if isinstance(v, (list, tuple)) else v) for k, v in npu.items()})
    return d


def register(app: typer.Typer) -> None:
    devices = typer.Typer(help="Device profiles: list, show, detect this host.", no_args_is_help=True)
    app.add_typer(devices, name="devices")

    @devices.command("list")
    def list_(json_: bool = typer.Option(False, "--json")) -> None:
        """List the known device profiles (built-in and $EDGETK_PROFILES)."""
        from edgetk.devices.profile import list_profiles, load_profile

        rows = []
        for name in list_profiles():
            p = load_profile(name)
            if json_:
                emit_json(p.to_dict())
            rows.append([p.name, p.arch, p.compile, p.gpu.arch if p.gpu else "-",
                         f"{len(p.npu.ops)} ops" if p.npu else "-", p.description])
        if not json_:
            console.print(table("edgetk device profiles", ["name", "arch", "compile", "gpu", "npu", "description"], rows))

    @devices.command("show")
    def show(name: str = typer.Argument(..., help="profile name or .toml path"),
             json_: bool = typer.Option(False, "--json")) -> None:
        """Show one profile."""
        from edgetk.devices.profile import load_profile

        p = load_profile(name)
        if json_:
            emit_json(p.to_dict())
        else:
            console.print(kv_table(f"device {p.name}", _flat(p)))

    @devices.command("detect")
    def detect(json_: bool = typer.Option(False, "--json")) -> None:
        """Detect this host (CPU, features, threads, memory) as a profile."""
        from edgetk.devices.profile import detect as _detect

        p = _detect()
        if json_:
            emit_json(p.to_dict())
        else:
            console.print(kv_table("this host", _flat(p)))
