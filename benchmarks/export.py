"""Export benchmark: wall time, peak memory, artifact sizes and parity per format and model.

    python benchmarks/export.py                                   # all formats x {cnn, vq-mlp, minilm-l6, smollm2-135m}
    python benchmarks/export.py --formats onnx --models cnn,vq-mlp
    python benchmarks/export.py --models /tmp/vq/vq2          # a compressed artifact (edgetk compress -o DIR)

Each case runs in a fresh subprocess so its peak RSS is its own. Prints one JSON line per case, then a
table. `export_s` is the whole `edgetk.export` call (trace, support check, lowering, writing, parity run),
`export_cpu_s` its CPU time over all threads (less sensitive to a shared machine's load);
`lower_s` is the format's lowering alone (manifest "export_seconds"). For a compressed artifact,
`size_vs_accounting` = exported bytes / the bytes its bits-per-weight accounting gives (manifest `model_bytes`). `peak_rss_mb` is the child's
peak; `export_rss_mb` = peak minus the RSS after the model was loaded (what exporting added).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

MODELS = ("cnn", "vq-mlp", "minilm-l6", "smollm2-135m")
FORMATS = ("onnx", "executorch", "tvm")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _model(name: str):
    """(model or LoadedModel, example inputs or None, dense fp32 bytes of its weights)."""
    import torch

    if name == "cnn":
        from torch import nn

        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64),
                          nn.ReLU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
        return m, (torch.randn(1, 3, 64, 64),), sum(p.numel() for p in m.parameters()) * 4
    if name == "vq-mlp":
        m = _vq_mlp(576, 1536)
        return m, (torch.randn(1, 576),), 2 * 576 * 1536 * 4
    from edgetk.models import load

    lm = load(name)
    params = _artifact_manifest(name).get("params")  # a compressed artifact: its fp32 original's size,
    if params:                                        # not the fp tensors left in it
        return lm, None, int(params) * 4
    return lm, None, sum(p.numel() for p in lm.model.parameters()) * 4


def _artifact_manifest(name: str) -> dict:
    """The manifest of a compressed artifact directory (edgetk compress -o DIR); {} for a zoo name."""
    manifest = os.path.join(name, "manifest.json")
    if not os.path.isfile(manifest):
        return {}
    with open(manifest) as f:
        return json.load(f)


def _accounting_bytes(name: str) -> int | None:
    """A compressed artifact: the bytes its bits-per-weight accounting gives."""
    return _artifact_manifest(name).get("model_bytes")


def _vq_mlp(d: int, hidden: int, bits: int = 2, vec_len: int = 4):
    """Two VQ layers through codebook_gemm: 4-dim vectors, 8-bit codes (256-entry codebook) = 2 bits per weight."""
    import torch
    from torch import nn

    from edgetk.kernels.codebook_gemm import pack_codes

    code_bits = bits * vec_len  # 8-bit codes over 4-dim vectors = 2 bits per weight

    class VQ(nn.Module):
        def __init__(self, out_f, in_f, seed):
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            n_vec = in_f // vec_len
            self.meta = (in_f, vec_len, code_bits)
            self.register_buffer("codes", pack_codes(torch.randint(0, 2 ** code_bits, (1, out_f, n_vec), generator=g),
                                                     code_bits))
            self.register_buffer("codebooks", (torch.randn(1, 1, 2 ** code_bits, vec_len, generator=g) / 8).half())
            self.register_buffer("scale", torch.ones(out_f))
            self.register_buffer("empty", torch.empty(0))
            self.register_buffer("perm", torch.empty(0, dtype=torch.long))

        def forward(self, x):
            return torch.ops.edgetk.codebook_gemm(x, self.codes, self.codebooks, self.perm, self.empty, self.scale,
                                                  self.empty, *self.meta)

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = VQ(hidden, d, 1), VQ(d, hidden, 2)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.up(x)))

    return MLP().eval()


def child(fmt: str, name: str, threads: int) -> dict:
    import torch

    import edgetk

    torch.set_num_threads(threads)
    model, inputs, dense_bytes = _model(name)
    base = _rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        art = edgetk.export(model, inputs, format=fmt, out=os.path.join(tmp, "a"), max_seq_len=64, golden_steps=32)
        export_s = time.perf_counter() - t0
        cpu_s = time.process_time() - c0
        m = art.manifest
        parity = m.get("parity", {})
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        acc = _accounting_bytes(name)
        return {"accounting_bytes": acc,
                "size_vs_accounting": round(art.total_bytes / acc, 4) if acc else None,
                "bench": "export", "format": fmt, "model": name, "threads": threads, "export_s": round(export_s, 2),
                "export_cpu_s": round(cpu_s, 2),
                "lower_s": m.get("export_seconds"), "peak_rss_mb": round(peak, 1),
                "export_rss_mb": round(peak - base, 1), "artifact_bytes": art.total_bytes,
                "dense_fp32_bytes": dense_bytes, "size_ratio_to_fp32": round(art.total_bytes / dense_bytes, 4),
                "parity_max_abs": parity.get("max_abs"), "parity_max_rel": parity.get("max_rel"),
                "golden_identical": (parity.get("golden") or {}).get("identical"),
                "golden_steps": (parity.get("golden") or {}).get("steps")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("FORMAT", "MODEL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.threads)))
        return
    rows = []
    for name in args.models.split(","):
        for fmt in args.formats.split(","):
            proc = subprocess.run([sys.executable, __file__, "--child", fmt, name, "--threads", str(args.threads)],
                                  capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
            if proc.returncode == 0 and lines:
                row = json.loads(lines[-1])
            else:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                row = {"bench": "export", "format": fmt, "model": name, "error": err[:300]}
            print(json.dumps(row), flush=True)
            rows.append(row)
    _table(rows)


def _table(rows: list[dict]) -> None:
    cols = ["model", "format", "export_s", "export_cpu_s", "lower_s", "peak_rss_mb", "export_rss_mb", "artifact_bytes",
            "size_ratio_to_fp32", "size_vs_accounting", "parity_max_abs", "golden_identical"]
    print("\n" + " | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        if "error" in r:
            print(f"{r['model']} | {r['format']} | error: {r['error']}")
            continue
        print(" | ".join(_fmt(r.get(c)) for c in cols))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)


if __name__ == "__main__":
    main()
