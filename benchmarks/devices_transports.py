"""Same artifact, three transports: local harness, SSH (loopback sshd) and TVM RPC (loopback tracker + server).

The medians must agree within noise; RPC measures with the device's own timer (`time_evaluator`, no
transfer), the harness with perf_counter around Session.run (includes numpy -> TVM argument conversion).
Prints one JSON line per case, then a table.

    nice -n 10 python benchmarks/devices_transports.py --runs 200 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


def build(out: Path, hidden: int) -> Path:
    import torch
    from torch import nn

    import edgetk

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, hidden)).eval()
    edgetk.export(m, (torch.randn(8, hidden),), format="tvm", out=out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)  # inherited by the harness, sshd sessions and RPC servers
    from edgetk.devices.profile import load_profile
    from edgetk.devices.transports import BenchOptions, open_transport
    from edgetk.devices.transports.loopback import LoopbackSshd
    from edgetk.devices.transports.rpc import LocalFleet

    opts = BenchOptions(runs=a.runs, warmup=20, timeout_s=600)
    prof = load_profile("host-x86")
    with tempfile.TemporaryDirectory() as d:
        art = build(Path(d) / "mlp-tvm", a.hidden)
        cases = {}
        cases["local"] = open_transport("local", prof).bench(art, opts)
        with LoopbackSshd(Path(d) / "sshd") as sshd:
            # sshd sessions do not inherit our environment: pass the thread count on the command line
            spec = sshd.spec(python=f"env TVM_NUM_THREADS={a.threads} {sys.executable}")
            cases["ssh"] = open_transport(spec, prof).bench(art, opts)
        with LocalFleet("host-x86", servers=1) as fleet:
            cases["rpc"] = open_transport(fleet.spec, prof).bench(art, opts)
    base = cases["local"].p50_ms
    rows = []
    for name, r in cases.items():
        row = {"case": f"mlp{a.hidden}x{4 * a.hidden} batch 8", "transport": name, "timer": r.timer, "runs": r.runs,
               "threads": a.threads, "p50_ms": round(r.p50_ms, 4), "p90_ms": round(r.p90_ms, 4),
               "ratio_to_local_p50": round(r.p50_ms / base, 3)}
        print(json.dumps(row))
        rows.append(row)
    print(f"\n{'transport':10} {'timer':16} {'p50 ms':>9} {'p90 ms':>9} {'/local':>7}")
    for r in rows:
        print(f"{r['transport']:10} {r['timer']:16} {r['p50_ms']:9.4f} {r['p90_ms']:9.4f} {r['ratio_to_local_p50']:7.3f}")


if __name__ == "__main__":
    main()
