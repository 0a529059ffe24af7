"""NPU placement reports for the zoo models: export to ONNX, fix static shapes, quantize (QDQ int8, calibrated
on the calibration text), list every node as NPU or CPU fallback for the snapdragon-8gen3 profile.

    nice -n 10 python benchmarks/devices_npu.py [--models minilm-l6 smollm2-135m] [--keep DIR]

Prints one JSON line per model (placement summary, sizes, seconds) and the top CPU-fallback ops.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def run(model: str, root: Path, target: str) -> dict:
    import edgetk
    from edgetk.devices.compile import compile_artifact
    from edgetk.models import load

    t0 = time.perf_counter()
    onnx_art = edgetk.export(load(model), None, format="onnx", out=root / f"{model}-onnx")
    t1 = time.perf_counter()
    npu = compile_artifact(onnx_art, target, root / f"{model}-{target}")
    t2 = time.perf_counter()
    s = npu.manifest["placement"]["summary"]
    return {"model": model, "target": target, "nodes": s["nodes"], "compute_nodes": s["compute_nodes"],
            "compute_on_npu": s["compute_on_npu"], "npu_fraction": round(s["npu_fraction"], 4),
            "cpu_fallback_ops": s["cpu_fallback_ops"], "activation_dtype": s["activation_dtype"],
            "input_shapes": s["input_shapes"], "onnx_mb": round(onnx_art.total_bytes / 1e6, 2),
            "npu_mb": round(npu.total_bytes / 1e6, 2), "export_s": round(t1 - t0, 1), "npu_s": round(t2 - t1, 1),
            "placement_md": str(npu.root / "placement.md")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    ap.add_argument("--target", default="snapdragon-8gen3")
    ap.add_argument("--keep", help="keep the artifacts in this directory")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        root = Path(a.keep or d)
        rows = [run(m, root, a.target) for m in a.models]
        for r in rows:
            print(json.dumps(r))
        print(f"\n{'model':14} {'nodes':>6} {'compute':>8} {'on NPU':>7} {'NPU %':>6}  top CPU fallback")
        for r in rows:
            top = ", ".join(f"{k}×{v}" for k, v in list(r["cpu_fallback_ops"].items())[:4])
            print(f"{r['model']:14} {r['nodes']:6} {r['compute_nodes']:8} {r['compute_on_npu']:7} "
                  f"{100 * r['npu_fraction']:6.1f}  {top}")


if __name__ == "__main__":
    main()
