"""`edgetk bench ARTIFACT --device local|qemu|ssh://user@host:port|adb:SERIAL|rpc://tracker:port/key --runs N`."""
from __future__ import annotations

from typing import Optional

import typer

from .common import console, emit_json, kv_table, progress


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(artifact: str = typer.Argument(..., help="artifact directory"),
              device: str = typer.Option("local", "--device", "-d",
                                         help="local | qemu | ssh://user@host[:port][?key=..&python=..] | "
                                              "adb:SERIAL | rpc://tracker:port/key"),
              target: Optional[str] = typer.Option(None, "--target", "-t", help="device profile to check against"),
              runs: int = typer.Option(20, "--runs", "-n"), warmup: int = typer.Option(3, "--warmup"),
              seq_len: int = typer.Option(16, "--seq-len"),
              decode_tokens: int = typer.Option(0, "--decode-tokens", help="decoders: measure TTFT and tokens/s"),
              timeout: float = typer.Option(600.0, "--timeout", help="seconds for the whole run on the device"),
              retries: int = typer.Option(1, "--retries"),
              out: Optional[str] = typer.Option(None, "--out", "-o", help="also write the result JSON here"),
              json_: bool = typer.Option(False, "--json")) -> None:
        """Run the measurement harness on a device and report latency, memory and load time."""
        import json

        from edgetk.artifact import atomic_write_text
        from edgetk.devices.profile import load_profile
        from edgetk.devices.transports import BenchOptions, open_transport

        profile = load_profile(target) if target else None
        opts = BenchOptions(runs=runs, warmup=warmup, seq_len=seq_len, decode_tokens=decode_tokens,
                            timeout_s=timeout, retries=retries)
        with progress(json_):
            res = open_transport(device, profile).bench(artifact, opts)
        if out:
            atomic_write_text(out, json.dumps(res.to_dict(), sort_keys=True))
        if json_:
            emit_json(res.to_dict())
            return
        d = res.to_dict()
        shown = {k: d[k] for k in ("artifact", "format", "device", "arch", "timer", "runs", "p50_ms", "p90_ms",
                                   "p99_ms", "load_s", "peak_rss_mb", "model_bytes", "ttft_ms", "tokens_per_s")}
        console.print(kv_table("benchmark", shown))
