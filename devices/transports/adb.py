"""ADB transport: the same push/run/pull protocol as SSH, over `adb` to an Android phone.

    adb:SERIAL[?python=/data/local/tmp/py/bin/python3&workdir=/data/local/tmp]

The phone needs a Python with edgetk and the artifact's runtime (e.g. Termux, or an embedded CPython pushed
to /data/local/tmp). `adb` exits 0 even when the remote command fails, so the harness's exit code travels
back in the output (`; echo __rc=$?`).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from edgetk.errors import ConfigError, DeviceError

from .base import BenchOptions, ConnectionLost, RemoteTransport, Shell, run_cmd, split_query

_RC = re.compile(r"__rc=(\d+)\s*$")
_GONE = ("device offline", "not found", "no devices", "device unauthorized", "closed", "protocol fault")


class AdbShell(Shell):
    name = "adb"

    def __init__(self, serial: str, adb: str | None = None):
        from edgetk.devices.toolchains import require_tool

        self.serial = serial
        self.adb = adb or require_tool("adb", why=f"reach the Android device {serial}")

    def base(self) -> list[str]:
        return [self.adb, "-s", self.serial]

    def shell_command(self, command: str) -> list[str]:
        return [*self.base(), "shell", f"{command}; echo __rc=$?"]

    def push_command(self, local: str, remote: str) -> list[str]:
        return [*self.base(), "push", local, remote]

    def pull_command(self, remote: str, local: str) -> list[str]:
        return [*self.base(), "pull", remote, local]

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
        err = (proc.stderr or "").strip()
        if proc.returncode != 0 and any(m in err for m in _GONE):
            if "unauthorized" in err:
                raise DeviceError(f"adb:{self.serial} is unauthorized", hint="accept the USB debugging prompt on the phone")
            raise ConnectionLost(f"adb:{self.serial} is not reachable during {what}: {err[-200:]}",
                                 hint="check the cable / `adb devices`, or `adb connect HOST:PORT` for TCP")
        return proc

    def run(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        proc = self._check(run_cmd(self.shell_command(command), timeout, f"adb shell on {self.serial}"), command[:40])
        m = _RC.search(proc.stdout or "")
        if m:
            proc = subprocess.CompletedProcess(proc.args, int(m.group(1)), proc.stdout[:m.start()], proc.stderr)
        return proc

    def push(self, local: Path, remote: str, timeout: float) -> None:
        proc = self._check(run_cmd(self.push_command(str(local), remote), timeout, f"adb push to {self.serial}"), "push")
        if proc.returncode != 0:
            raise DeviceError(f"adb push {local} failed: {proc.stderr.strip()[-300:]}", hint="check free space on the phone")

    def pull(self, remote: str, local: Path, timeout: float) -> bool:
        proc = self._check(run_cmd(self.pull_command(remote, str(local)), timeout, f"adb pull from {self.serial}"), "pull")
        return proc.returncode == 0 and local.is_file()


class AdbTransport(RemoteTransport):
    scheme = "adb"
    workdir = "/data/local/tmp"

    def __init__(self, spec: str, profile=None):
        super().__init__(spec, profile)
        base, q = split_query(spec)
        serial = base.partition(":")[2]
        if not base.startswith("adb:") or not serial:
            raise ConfigError(f"bad adb device {spec!r}", hint="write adb:SERIAL (see `adb devices`)")
        self.serial = serial
        self.python = q.get("python", "python3")  # a command prefix (e.g. "taskset -c 2 python3")
        self.workdir = q.get("workdir", self.workdir)

    def shell(self, opts: BenchOptions) -> AdbShell:
        return AdbShell(self.serial)
