"""TVM RPC transport: a tracker keyed by device profile, RPC servers on the devices, the device's own timer.

    rpc://TRACKER_HOST:PORT/KEY        e.g. rpc://10.0.0.2:9190/rpi5

On each device: `python -m tvm.exec.rpc_server --tracker HOST:PORT --key rpi5`. The tracker hands a free
server of that key to each request, so a fleet (many boards under one key) is a pool. A benchmark uploads
the artifact's library for the profile's architecture, loads it in the remote Relax VM and times "main"
with `time_evaluator` — measured by the device's clock, excluding upload and argument transfer.

`fleet_bench(artifacts, "rpc://host:port/key")` spreads a list of artifacts over all free servers of the key.
`LocalFleet(key, n)` starts a real tracker and n servers on loopback (tests, benchmarks, one-machine farms).
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from edgetk.errors import ArtifactError, ConfigError, DeviceError, require
from edgetk.runtimes.harness import BenchResult, example_inputs

from .base import BenchOptions, Transport, split_query

log = logging.getLogger(__name__)
# profile triple -> library inside a TVM artifact (the host library sits at the root)
LIBS = {"aarch64-linux-gnu": "aarch64-linux-gnu/model.so"}


def parse_rpc(spec: str) -> tuple[str, int, str]:
    base, _ = split_query(spec)
    u = urlsplit(base)
    key = u.path.strip("/")
    if u.scheme != "rpc" or not u.hostname or not u.port or not key:
        raise ConfigError(f"bad rpc device {spec!r}", hint="write rpc://TRACKER_HOST:PORT/KEY (KEY = profile name)")
    return u.hostname, u.port, key


def _reachable(host: str, port: int, timeout: float) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise DeviceError(f"RPC tracker {host}:{port} is unreachable ({exc})",
                          hint="start it with `python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port PORT`") from None


def tracker_summary(host: str, port: int, timeout: float = 10.0) -> dict:
    rpc = require("tvm.rpc", "tvm")
    _reachable(host, port, timeout)
    return rpc.connect_tracker(host, port).summary()


def free_servers(host: str, port: int, key: str, timeout: float = 10.0) -> int:
    q = tracker_summary(host, port, timeout).get("queue_info", {}).get(key)
    return int(q.get("free", 0)) if q else 0


class RpcTransport(Transport):
    scheme = "rpc"

    def __init__(self, spec: str, profile=None):
        self.host, self.port, self.key = parse_rpc(spec)
        if profile is None:  # fleets are keyed by profile name: rpc://tracker:9190/rpi5 means an rpi5
            from edgetk.devices.profile import list_profiles, load_profile

            profile = load_profile(self.key) if self.key in list_profiles() else None
        super().__init__(spec, profile)

    def library(self, art) -> str:
        triple = self.profile.triple if self.profile is not None else None
        rel = LIBS.get(triple, art.manifest.get("file", "model.so"))
        if art.manifest.get("format") != "tvm":
            raise ArtifactError(f"TVM RPC runs TVM libraries; {art.root} is format {art.manifest.get('format')!r}",
                                hint="export with --format tvm --target PROFILE, or use --device ssh://... for other formats")
        if rel not in art.manifest.get("files", {}):
            raise ArtifactError(f"artifact {art.root} has no library for {triple} ({rel})",
                                hint=f"re-export with --format tvm --target {self.profile.name if self.profile else 'PROFILE'}")
        return rel

    def request(self, opts: BenchOptions):
        rpc = require("tvm.rpc", "tvm")
        summ = tracker_summary(self.host, self.port, opts.connect_timeout_s)
        if not summ.get("queue_info", {}).get(self.key, {}).get("free", 0) and \
                not summ.get("queue_info", {}).get(self.key, {}).get("pending", 0) and \
                not any(s.get("key", "").endswith(f":{self.key}") for s in summ.get("server_info", [])):
            raise DeviceError(f"no RPC server with key {self.key!r} is registered at {self.host}:{self.port}",
                              hint=f"on the device: python -m tvm.exec.rpc_server --tracker {self.host}:{self.port} "
                                   f"--key {self.key}")
        return _request(rpc, self.host, self.port, self.key, opts)

    def bench(self, artifact, opts: BenchOptions = BenchOptions()) -> BenchResult:
        from edgetk.artifact import Artifact

        art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
        rel = self.library(art)
        remote, server = self.request(opts)
        try:
            return self._run(remote, server, art, rel, opts)
        except DeviceError:
            raise
        except Exception as exc:  # TVMError / socket errors when the device goes away mid-run
            msg = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise DeviceError(f"RPC benchmark on {self.name} failed: {msg}",
                              hint="the device disconnected or could not load the library (architecture mismatch?)"
                              ) from exc

    def _run(self, remote, server: str, art, rel: str, opts: BenchOptions) -> BenchResult:
        import tvm
        from tvm import relax

        remote_name = f"edgetk-{os.getpid()}-{Path(rel).name}"
        remote.upload(str(art.root / rel), remote_name)
        t0 = time.perf_counter()
        try:
            lib = remote.load_module(remote_name)
        except Exception as exc:
            arch = self.profile.arch if self.profile else "this"
            raise DeviceError(f"device {self.name} cannot load the {arch} library {rel}: "
                              f"{str(exc).strip().splitlines()[-1][:200]}",
                              hint="the device reports another architecture than its profile; use the matching "
                                   "--target / tracker key") from None
        dev = remote.cpu()
        vm = relax.VirtualMachine(lib, dev)
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in example_inputs(art, opts.seq_len)]
        vm["main"](*args)
        load_s = time.perf_counter() - t0
        for _ in range(opts.warmup):
            vm["main"](*args)
        timer = vm.time_evaluator("main", dev, number=1, repeat=opts.runs)
        lat = [float(s) * 1e3 for s in timer(*args).results]
        return BenchResult(artifact=str(art.root), format="tvm", runs=opts.runs, warmup=opts.warmup, latencies_ms=lat,
                           load_s=load_s, model_bytes=art.manifest["files"][rel]["bytes"], peak_rss_mb=None,
                           arch=self.profile.arch if self.profile else "?", host=f"{self.host}:{self.port}",
                           device=self.name, profile=self.profile.name if self.profile else self.key,
                           timer="time_evaluator", extra={"library": rel, "server": server})


def _request(rpc, host: str, port: int, key: str, opts: BenchOptions):
    """Ask the tracker for a free server of `key` (bounded wait), connect to it; -> (session, "addr:port")."""
    from tvm.rpc import base

    sock = socket.create_connection((host, port), timeout=opts.connect_timeout_s)
    try:
        sock.settimeout(opts.timeout_s)  # a request never blocks forever on a busy or vanished fleet
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        if struct.unpack("<i", base.recvall(sock, 4))[0] != base.RPC_TRACKER_MAGIC:
            raise DeviceError(f"{host}:{port} is not a TVM RPC tracker", hint="check the port")
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", 1])
        value = base.recvjson(sock)
    except (OSError, ValueError) as exc:
        raise DeviceError(f"no RPC session for key {key!r} within {opts.timeout_s:.0f} s: {exc}",
                          hint="all devices are busy or gone; check `python -m tvm.exec.query_rpc_tracker`") from None
    finally:
        sock.close()
    if value[0] != base.TrackerCode.SUCCESS:
        raise DeviceError(f"the tracker refused the request for {key!r}: {value}", hint="check the tracker's log")
    url, sport, matchkey = value[1]
    try:
        return rpc.connect(url, sport, matchkey, session_timeout=opts.timeout_s), f"{url}:{sport}"
    except Exception as exc:
        raise DeviceError(f"RPC server {url}:{sport} ({key}) is unreachable: {exc}",
                          hint="the device went away after registering; restart its rpc_server") from None


def fleet_bench(artifacts: list, spec: str, opts: BenchOptions = BenchOptions(), profile=None) -> list[BenchResult]:
    """Benchmark many artifacts over every free server of one key, in parallel (one session per job)."""
    t = RpcTransport(spec, profile)
    n = max(1, free_servers(t.host, t.port, t.key, opts.connect_timeout_s))
    with ThreadPoolExecutor(max_workers=min(n, len(artifacts)) or 1) as pool:
        return list(pool.map(lambda a: t.bench(a, opts), artifacts))


# ---------------------------------------------------------------------------- loopback fleet (real processes)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalFleet(contextlib.AbstractContextManager):
    """A real TVM RPC tracker plus `servers` RPC servers under `key`, on 127.0.0.1."""

    def __init__(self, key: str = "host-x86", servers: int = 2, start_timeout: float = 120.0):
        self.key, self.n, self.start_timeout = key, servers, start_timeout
        self.port = _free_port()
        self.procs: list[subprocess.Popen] = []
        self._log = tempfile.TemporaryFile()

    @property
    def spec(self) -> str:
        return f"rpc://127.0.0.1:{self.port}/{self.key}"

    def _spawn(self, *args: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", *args], stdout=self._log, stderr=self._log,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def __enter__(self) -> "LocalFleet":
        require("tvm.rpc", "tvm")
        try:
            self._spawn("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                        "--port-end", str(self.port + 1), "--silent")
            self._wait(lambda: _try_connect(self.port), "tracker")
            for _ in range(self.n):
                self.add_server()
            self._wait(lambda: free_servers("127.0.0.1", self.port, self.key) >= self.n, f"{self.n} servers")
        except BaseException:
            self.close()
            raise
        return self

    def add_server(self) -> subprocess.Popen:
        base = _free_port()
        return self._spawn("tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{self.port}", "--key", self.key,
                           "--host", "127.0.0.1", "--port", str(base), "--port-end", str(base + 50), "--silent")

    def _wait(self, ok, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                self._log.seek(0)
                raise DeviceError(f"RPC {what} exited early: {self._log.read().decode(errors='replace')[-500:]}",
                                  hint="pip install tornado psutil (the TVM tracker needs them)")
            try:
                if ok():
                    return
            except (DeviceError, OSError, RuntimeError):
                pass
            time.sleep(0.3)
        raise DeviceError(f"RPC {what} did not come up within {self.start_timeout:.0f} s", hint="machine overloaded?")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 15)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, 9)
                p.wait(timeout=10)
        self.procs.clear()
        self._log.close()

    def __exit__(self, *exc) -> None:
        self.close()


def _try_connect(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
