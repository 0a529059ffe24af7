"""What every transport shares: the device spec parser, the harness protocol and result checking.

A transport runs the measurement harness (`edgetk.runtimes.harness`) where the device is and returns a
`BenchResult`. Remote transports (ssh, adb) implement a tiny shell interface (`run`, `push`, `pull`) and
inherit the protocol: probe the architecture, push the artifact and the harness, run with a timeout,
pull the result JSON and check it. Every external call has a timeout; connection failures are retried
`retries` times; a missing or corrupt result file is a `DeviceError` naming what happened.
"""
from __future__ import annotations

import json
import logging
import shlex
import subprocess
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetk.errors import ConfigError, DeviceError
from edgetk.runtimes.harness import SCHEMA, BenchResult

log = logging.getLogger(__name__)
HARNESS_FILE = Path(__file__).resolve().parents[2] / "runtimes" / "harness.py"


@dataclass(frozen=True)
class BenchOptions:
    runs: int = 20
    warmup: int = 3
    seq_len: int = 16
    decode_tokens: int = 0
    threads: int | None = None
    timeout_s: float = 600.0     # the whole harness run on the device
    connect_timeout_s: float = 10.0
    retries: int = 1             # extra attempts after a connection-level failure

    def harness_args(self) -> list[str]:
        args = ["--runs", str(self.runs), "--warmup", str(self.warmup), "--seq-len", str(self.seq_len),
                "--decode-tokens", str(self.decode_tokens)]
        return args + (["--threads", str(self.threads)] if self.threads else [])


class Transport(ABC):
    scheme = "?"

    def __init__(self, spec: str, profile=None):
        self.spec = spec
        self.name = spec.partition("?")[0]  # for messages: without keys and paths
        self.profile = profile

    @abstractmethod
    def bench(self, artifact, opts: BenchOptions = BenchOptions()) -> BenchResult:
        """Run the harness on the device and return its result."""

    def check_arch(self, reported: str) -> None:
        """A device that reports another architecture than its profile is an error naming the fix."""
        from edgetk.devices.profile import normalize_arch

        if self.profile is None:
            return
        got = normalize_arch(reported)
        if got != self.profile.arch:
            raise DeviceError(f"device {self.name} reports architecture {got!r} but profile {self.profile.name!r} "
                              f"is {self.profile.arch!r}",
                              hint="pass the --target profile that matches this device (see `edgetk devices list`) "
                                   "or connect to the right device")


def parse_result(text: str | None, where: str) -> BenchResult:
    """A harness result from JSON text; missing, corrupt or failed results are named DeviceErrors."""
    if text is None or not text.strip():
        raise DeviceError(f"the benchmark on {where} left no result file",
                          hint="the harness was killed or the device lost power or disk space; run again")
    try:
        data = json.loads(text.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as exc:
        raise DeviceError(f"the result file from {where} is corrupt ({exc.__class__.__name__}: {exc})",
                          hint="the device may be out of disk space or the transfer was cut; run again") from None
    if isinstance(data, dict) and "error" in data:
        raise DeviceError(f"the harness failed on {where}: {data['error']}",
                          hint="run `python -m edgetk.runtimes.harness ARTIFACT` on the device to see the traceback")
    try:
        return BenchResult.from_dict(data)
    except Exception as exc:
        raise DeviceError(f"the result file from {where} is not a benchmark result: {exc}",
                          hint=f"expected schema {SCHEMA}; check that the device runs the same edgetk version") from None


def run_cmd(cmd: list[str], timeout: float, what: str, input_text: str | None = None) -> subprocess.CompletedProcess:
    """subprocess.run with a timeout that becomes a DeviceError (never a hang)."""
    log.debug("run: %s", shlex.join(cmd))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input_text,
                              stdin=None if input_text is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise DeviceError(f"{what} did not finish within {timeout:.0f} s",
                          hint="the device may have disappeared or hung; check it and raise --timeout if the "
                               "model is just slow") from None
    except FileNotFoundError as exc:
        raise DeviceError(f"cannot run {cmd[0]!r}: {exc}", hint=f"install {cmd[0]}") from None


class Shell(ABC):
    """The three operations a remote transport needs. `ConnectionLost` means: worth a retry."""

    name = "?"

    @abstractmethod
    def run(self, command: str, timeout: float) -> subprocess.CompletedProcess: ...

    @abstractmethod
    def push(self, local: Path, remote: str, timeout: float) -> None: ...

    @abstractmethod
    def pull(self, remote: str, local: Path, timeout: float) -> bool:
        """Copy a remote file here; False if it does not exist."""


class ConnectionLost(DeviceError):
    """The connection dropped (device gone, network cut); the operation may be retried."""


class RemoteTransport(Transport):
    """The push/run/pull protocol over a Shell, with retries for dropped connections."""

    python = "python3"
    workdir = "/tmp"

    @abstractmethod
    def shell(self, opts: BenchOptions) -> Shell: ...

    def bench(self, artifact, opts: BenchOptions = BenchOptions()) -> BenchResult:
        from edgetk.artifact import Artifact

        art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
        last: Exception | None = None
        for attempt in range(opts.retries + 1):
            try:
                res = self._bench_once(art, opts)
                res.device, res.profile = self.name, self.profile.name if self.profile else res.profile
                return res
            except ConnectionLost as exc:
                last = exc
                log.warning("connection to %s lost (attempt %d/%d): %s", self.name, attempt + 1, opts.retries + 1, exc)
                time.sleep(min(2.0, 0.5 * (attempt + 1)))
        raise DeviceError(f"device {self.name} disappeared or is unreachable: {last.args[0] if last else ''}",
                          hint=last.hint if isinstance(last, DeviceError) else None)

    def probe_arch(self, sh: Shell, opts: BenchOptions) -> str:
        p = sh.run("uname -m", opts.connect_timeout_s + 10)
        return p.stdout.strip()

    def _bench_once(self, art, opts: BenchOptions) -> BenchResult:
        sh = self.shell(opts)
        self.check_arch(self.probe_arch(sh, opts))
        rdir = f"{self.workdir.rstrip('/')}/edgetk-bench-{uuid.uuid4().hex[:10]}"
        try:
            sh.run(f"mkdir -p {shlex.quote(rdir)}", opts.connect_timeout_s + 10)
            sh.push(art.root, f"{rdir}/artifact", opts.timeout_s)
            sh.push(HARNESS_FILE, f"{rdir}/harness.py", opts.timeout_s)
            cmd = (f"cd {shlex.quote(rdir)} && {self.python} harness.py artifact "
                   f"{' '.join(opts.harness_args())} --out result.json")
            proc = sh.run(cmd, opts.timeout_s)
            with _tempdir() as d:
                got = sh.pull(f"{rdir}/result.json", d / "result.json", opts.connect_timeout_s + 30)
                text = (d / "result.json").read_text(errors="replace") if got else None
            if text is None and proc.stdout.strip().startswith("{"):
                text = proc.stdout  # the harness reported an error on stdout
            if text is None and proc.returncode != 0:
                raise DeviceError(f"the harness on {self.name} exited with {proc.returncode}: "
                                  f"{(proc.stderr or proc.stdout).strip()[-400:]}",
                                  hint=f"check that {self.python} on the device can `import edgetk` "
                                       "(set ?python=/path/to/python in the device spec)")
            return parse_result(text, self.name)
        finally:
            try:
                sh.run(f"rm -rf {shlex.quote(rdir)}", opts.connect_timeout_s + 10)
            except DeviceError:
                pass


class _tempdir:
    def __enter__(self) -> Path:
        import tempfile

        self._d = tempfile.TemporaryDirectory(prefix="edgetk-pull-")
        return Path(self._d.name)

    def __exit__(self, *a) -> None:
        self._d.cleanup()


def split_query(spec: str) -> tuple[str, dict[str, str]]:
    from urllib.parse import parse_qsl

    base, _, q = spec.partition("?")
    return base, dict(parse_qsl(q))


def unknown_device(spec: str) -> ConfigError:
    return ConfigError(f"unknown device {spec!r}",
                       hint="use local, qemu, ssh://user@host[:port], adb:SERIAL or rpc://tracker:port/key")


def as_dict(res: BenchResult) -> dict[str, Any]:
    return res.to_dict()
