"""A real sshd on 127.0.0.1 with throwaway keys: a loopback "device" for tests, benchmarks and demos.

    with LoopbackSshd(tmp_dir) as d:
        open_transport(d.spec()).bench(artifact)

Runs `sshd -D -f CONFIG` on a free high port with its own host key, `UsePAM no`, public-key auth only
(a generated client key; a second, unauthorised key for negative tests) and the internal SFTP server (scp).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgetk.errors import DeviceError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackSshd:
    """sshd on a free port of 127.0.0.1; `spec()` is the device spec that reaches it with the client key."""

    def __init__(self, root: Path):
        from edgetk.devices.toolchains import require_tool

        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        root = self.root
        self.sshd = require_tool("sshd")
        self.port = _free_port()
        self.key = root / "client_key"
        self.wrong_key = root / "wrong_key"
        for k in (root / "host_key", self.key, self.wrong_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True, timeout=30)
        shutil.copy(f"{self.key}.pub", root / "authorized_keys")
        (root / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}",
            f"PidFile {root / 'sshd.pid'}", "UsePAM no", "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", "StrictModes no", "MaxStartups 50",
            "MaxSessions 50", "LogLevel ERROR", "Subsystem sftp internal-sftp", ""]))
        try:  # sshd's privilege-separation directory (as root; a non-root sshd does not need it)
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        except OSError:
            pass
        self.proc = None

    def start(self) -> "LoopbackSshd":
        with open(self.root / "sshd.log", "wb") as log:
            self.proc = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(self.root / "sshd_config")],
                                         stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DeviceError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise DeviceError("sshd did not start within 20 s", hint="see sshd.log in the temp dir")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=10)

    def spec(self, key: Path | None = None, **q: str) -> str:
        query = {"key": str(key or self.key), "python": sys.executable,
                 "known_hosts": str(self.root / "known_hosts"), **q}
        user = os.environ.get("USER", "root")
        return f"ssh://{user}@127.0.0.1:{self.port}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def __enter__(self) -> "LoopbackSshd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
