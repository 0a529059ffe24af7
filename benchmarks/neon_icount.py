"""aarch64 instruction counts of the batch-1 codebook GEMV kernels under qemu, side by side (no ARM core here).

    python benchmarks/neon_icount.py [--shapes 576x576,192x576,1536x576,576x1536] [--threads 1]

Per shape (2 bits per weight: vec_len 4, 256 codewords, `k256`), the guest instructions one call executes
(`edgetk.kernels.aarch64_check.instructions_per_call`: qemu-aarch64 `-singlestep -d exec,nochain`, two calls minus
one) for the NEON kernels the same generators emit for a device: `f32` (the default float32 gemv,
`llvm_codebook`), `q8` (the int8 LUT, `EDGETK_LUT=q8`, its table built with float32 FMAs: any NEON core) and `q8_sdot`
(the same, its table built with `sdot`: ARMv8.2+ cores with the dot product, e.g. Cortex-A76/A78, Jetson Orin).
Instructions are a proxy, not a time: their costs differ and qemu does not model memory; time them on the device
(`edgetk bench` / `benchmarks/kernels.py` there). Needs gcc-aarch64-linux-gnu and qemu-user.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from edgetk.kernels import aarch64_check as ac
from edgetk.kernels import llvm_codebook as lk
from edgetk.kernels import llvm_codebook_q8 as q8

sys.path.insert(0, str(Path(__file__).parent))
from kernels import codebook_weights  # noqa: E402

KERNELS = ("f32", "q8", "q8_sdot")


def case(out: int, inf: int, threads: int, workdir: Path) -> dict:
    w = codebook_weights(out, inf, 1)[0]
    x = torch.randn(1, inf, generator=torch.Generator().manual_seed(0))
    packs = {"f32": lk.pack_weight(*w, inf, 4, 8, vector_bits=ac.NEON_BITS),
             "q8": q8.pack_weight(*w, inf, 4, 8, isa="neon", vnni=False),
             "q8_sdot": q8.pack_weight(*w, inf, 4, 8, isa="neon", vnni=True)}
    n = {}
    for name, p in packs.items():
        d = workdir / name
        kind = "f32" if name == "f32" else "q8"
        n[name] = ac.instructions_per_call(ac.build(p.spec, d, kernel=kind), p, x, threads, d, kind)
    return {"case": "neon_icount", "shape": f"{out}x{inf}", "threads": threads,
            **{f"{k}_instructions": v for k, v in n.items()},
            "q8_sdot_x_fewer_than_q8": n["q8"] / n["q8_sdot"], "q8_sdot_x_fewer_than_f32": n["f32"] / n["q8_sdot"],
            "q8_x_fewer_than_f32": n["f32"] / n["q8"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="576x576,192x576,1536x576,576x1536", help="OUTxIN, comma separated")
    ap.add_argument("--threads", type=int, default=1, help="kernel threads (instructions summed over them)")
    args = ap.parse_args(argv)
    if not ac.tools_available():
        print("needs gcc-aarch64-linux-gnu and qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)",
              file=sys.stderr)
        return 1
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for out, inf in shapes:
            results.append(case(out, inf, args.threads, Path(tmp) / f"{out}x{inf}"))
            print(json.dumps(results[-1]), flush=True)
    print()
    for r in results:
        print(f"neon {r['shape']:>9} t={r['threads']}  instructions a call: "
              + "  ".join(f"{k} {r[f'{k}_instructions']:,}" for k in KERNELS)
              + f"  | q8_sdot {r['q8_sdot_x_fewer_than_q8']:.2f}x fewer than q8, "
              f"{r['q8_sdot_x_fewer_than_f32']:.2f}x fewer than f32; q8 {r['q8_x_fewer_than_f32']:.2f}x fewer than f32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
