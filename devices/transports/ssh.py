"""SSH transport: key authentication through the system `ssh`/`scp` binaries.

    ssh://user@host[:port][?key=~/.ssh/id_ed25519&python=/opt/venv/bin/python&workdir=/tmp]

The device needs Python with edgetk (and the artifact's runtime) installed; the harness file itself is pushed
with the artifact, so the device always measures with this host's harness. BatchMode (no password prompts),
ConnectTimeout and ServerAlive keep every call bounded: a device that disappears mid-run is noticed within
seconds, retried once, then reported.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from edgetk.errors import ConfigError, DeviceError

from .base import BenchOptions, ConnectionLost, RemoteTransport, Shell, run_cmd, split_query

_AUTH_MARKERS = ("Permission denied", "Too many authentication failures", "no mutual signature")
_HOSTKEY_MARKERS = ("Host key verification failed", "REMOTE HOST IDENTIFICATION HAS CHANGED")


class SshShell(Shell):
    name = "ssh"

    def __init__(self, user: str, host: str, port: int, key: str | None, connect_timeout: float,
                 known_hosts: str | None = None):
        from edgetk.devices.toolchains import check_tools

        tools = check_tools(["ssh", "scp"])
        self.ssh, self.scp = tools["ssh"], tools["scp"]
        self.user, self.host, self.port, self.key = user, host, port, key
        self.target = f"{user}@{host}" if user else host
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
                "-o", "ServerAliveInterval=2", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR",
                "-o", "StrictHostKeyChecking=accept-new"]
        if known_hosts:
            opts += ["-o", f"UserKnownHostsFile={known_hosts}"]
        if key:
            opts += ["-i", key, "-o", "IdentitiesOnly=yes"]
        self.opts = opts

    def ssh_command(self, command: str) -> list[str]:
        return [self.ssh, *self.opts, "-p", str(self.port), self.target, command]

    def scp_command(self, src: str, dst: str) -> list[str]:
        return [self.scp, *self.opts, "-q", "-r", "-P", str(self.port), src, dst]

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
        if proc.returncode != 255:
            return proc
        err = proc.stderr.strip()
        where = f"ssh://{self.target}:{self.port}"
        if any(m in err for m in _AUTH_MARKERS):
            raise DeviceError(f"{where}: authentication failed (wrong credentials): {err[-200:]}",
                              hint="pass the right private key with ?key=PATH and make sure its public key is in "
                                   "the device's ~/.ssh/authorized_keys")
        if any(m in err for m in _HOSTKEY_MARKERS):
            raise DeviceError(f"{where}: host key verification failed", hint="remove the stale entry with "
                              f"ssh-keygen -R '[{self.host}]:{self.port}' if the device was re-installed")
        raise ConnectionLost(f"{where} unreachable during {what}: {err[-300:] or 'connection closed'}",
                             hint="check that the device is powered, on the network and runs sshd on that port")

    def run(self, command: str, timeout: float) -> subprocess.CompletedProcess:
        return self._check(run_cmd(self.ssh_command(command), timeout, f"ssh {self.target}: {command[:60]}"), command[:40])

    def push(self, local: Path, remote: str, timeout: float) -> None:
        proc = self._check(run_cmd(self.scp_command(str(local), f"{self.target}:{remote}"), timeout,
                                   f"copying {local.name} to {self.target}"), "push")
        if proc.returncode != 0:
            raise DeviceError(f"copying {local} to {self.target}:{remote} failed: {proc.stderr.strip()[-300:]}",
                              hint="check free disk space on the device")

    def pull(self, remote: str, local: Path, timeout: float) -> bool:
        proc = self._check(run_cmd(self.scp_command(f"{self.target}:{remote}", str(local)), timeout,
                                   f"copying {remote} from {self.target}"), "pull")
        return proc.returncode == 0 and local.is_file()


class SshTransport(RemoteTransport):
    scheme = "ssh"

    def __init__(self, spec: str, profile=None):
        super().__init__(spec, profile)
        base, q = split_query(spec)
        u = urlsplit(base)
        if u.scheme != "ssh" or not u.hostname:
            raise ConfigError(f"bad ssh device {spec!r}", hint="write ssh://user@host[:port][?key=PATH&python=PATH]")
        self.user = u.username or os.environ.get("USER", "root")
        self.host, self.port = u.hostname, u.port or 22
        self.key = os.path.expanduser(q["key"]) if "key" in q else None
        self.known_hosts = q.get("known_hosts")
        self.python = q.get("python", "python3")  # a command prefix (e.g. "taskset -c 2 python3")
        self.workdir = q.get("workdir", "/tmp")
        unknown = set(q) - {"key", "python", "workdir", "known_hosts"}
        if unknown:
            raise ConfigError(f"unknown ssh option(s) {sorted(unknown)} in {spec!r}",
                              hint="known: key, python, workdir, known_hosts")

    def shell(self, opts: BenchOptions) -> SshShell:
        return SshShell(self.user, self.host, self.port, self.key, opts.connect_timeout_s, self.known_hosts)
