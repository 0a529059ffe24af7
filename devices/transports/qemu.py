"""qemu-aarch64 user-mode transport: runs an artifact's aarch64 build on this x86 host.

For TVM artifacts this is the aarch64 library run by the TVM helper's runner
(`edgetk.devices.tvm_aarch64.run_aarch64_timed`: aarch64 TVM runtime + a small C++ runner under qemu),
timed inside the emulated process. Emulated timings measure correctness and relative cost, not the
speed of a real board.
"""
from __future__ import annotations

from edgetk.errors import ArtifactError, DeviceError
from edgetk.runtimes.harness import BenchResult, example_inputs

from .base import BenchOptions, Transport

AARCH64_LIB = "aarch64-linux-gnu/model.so"


class QemuTransport(Transport):
    scheme = "qemu"

    def bench(self, artifact, opts: BenchOptions = BenchOptions()) -> BenchResult:
        from edgetk.artifact import Artifact
        from edgetk.devices.toolchains import check_tools
        from edgetk.devices.tvm_aarch64 import run_aarch64_timed

        art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
        self.check_arch("aarch64")
        if art.manifest.get("format") != "tvm" or AARCH64_LIB not in art.manifest.get("files", {}):
            raise ArtifactError(f"{art.root} has no aarch64 build ({AARCH64_LIB})",
                                hint="build one with `edgetk compile ARTIFACT --target rpi5` (or export --format tvm "
                                     "--target rpi5)")
        check_tools(["qemu-aarch64"])
        _, timing = run_aarch64_timed(art.root / AARCH64_LIB, example_inputs(art, opts.seq_len),
                                      repeat=opts.warmup + opts.runs, timeout=opts.timeout_s)
        runs = [float(x) for x in timing.get("run_ms", [])]
        if len(runs) != opts.warmup + opts.runs:
            raise DeviceError(f"the qemu runner reported {len(runs)} runs, expected {opts.warmup + opts.runs}",
                              hint="the run was cut short; run again")
        return BenchResult(artifact=str(art.root), format="tvm", runs=opts.runs, warmup=opts.warmup,
                           latencies_ms=runs[opts.warmup:], load_s=float(timing.get("load_ms", 0.0)) / 1e3,
                           model_bytes=art.manifest["files"][AARCH64_LIB]["bytes"], peak_rss_mb=None,
                           arch="aarch64", device="qemu", profile=self.profile.name if self.profile else None,
                           timer="steady_clock (emulated)", extra={"library": AARCH64_LIB, "emulated": True})
