"""Run the harness on this machine, in a fresh process (clean peak RSS), with a timeout."""
from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

from edgetk.runtimes.harness import BenchResult

from .base import BenchOptions, Transport, parse_result, run_cmd


class LocalTransport(Transport):
    scheme = "local"

    def bench(self, artifact, opts: BenchOptions = BenchOptions()) -> BenchResult:
        from edgetk.artifact import Artifact

        art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
        self.check_arch(platform.machine())
        with tempfile.TemporaryDirectory(prefix="edgetk-local-") as d:
            out = Path(d) / "result.json"
            cmd = [sys.executable, "-m", "edgetk.runtimes.harness", str(art.root), *opts.harness_args(),
                   "--out", str(out)]
            proc = run_cmd(cmd, opts.timeout_s, f"the local benchmark of {art.root}")
            text = out.read_text() if out.is_file() else (proc.stdout if proc.stdout.strip().startswith("{") else None)
            if text is None and proc.returncode != 0:
                text = json.dumps({"error": proc.stderr.strip()[-400:] or f"exit {proc.returncode}"})
            res = parse_result(text, "local")
        res.device = "local"
        res.profile = self.profile.name if self.profile else res.profile
        return res
