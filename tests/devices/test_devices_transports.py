"""Transports over real loopback devices: local, qemu-aarch64, sshd, TVM RPC tracker + servers; adb without a phone."""
from __future__ import annotations

import threading
import time

import pytest

from edgetk.devices.profile import load_profile
from edgetk.devices.transports import BenchOptions, open_transport
from edgetk.errors import ArtifactError, ConfigError, DeviceError

pytestmark = pytest.mark.backend  # the artifacts are ONNX / TVM builds
FAST = BenchOptions(runs=5, warmup=1, timeout_s=120, connect_timeout_s=5)


def _check(res, runs=5):
    assert res.runs == runs and len(res.latencies_ms) == runs
    assert all(x > 0 for x in res.latencies_ms)
    assert res.p50_ms <= res.p90_ms <= res.p99_ms
    assert res.model_bytes > 0


def test_local_onnx_and_profile(onnx_mlp):
    res = open_transport("local", load_profile("host-x86")).bench(onnx_mlp, FAST)
    _check(res)
    assert res.format == "onnx" and res.device == "local" and res.peak_rss_mb > 10
    assert res.profile == "host-x86" and res.arch == "x86_64"


def test_qemu_runs_aarch64_build(tvm_mlp):
    res = open_transport("qemu", load_profile("rpi5")).bench(tvm_mlp, FAST)
    _check(res)
    assert res.arch == "aarch64" and res.extra["library"] == "aarch64-linux-gnu/model.so"


def test_qemu_rejects_x86_only_artifact_and_x86_profile(onnx_mlp, tvm_mlp):
    with pytest.raises(ArtifactError, match="no aarch64 build"):
        open_transport("qemu").bench(onnx_mlp, FAST)
    with pytest.raises(DeviceError, match="reports architecture 'aarch64' but profile 'host-x86'"):
        open_transport("qemu", load_profile("host-x86")).bench(tvm_mlp, FAST)


def test_ssh_pushes_runs_pulls(sshd, onnx_mlp):
    res = open_transport(sshd.spec(), load_profile("host-x86")).bench(onnx_mlp, FAST)
    _check(res)
    assert res.device.startswith("ssh://") and res.format == "onnx"


def test_ssh_wrong_credentials(sshd, onnx_mlp):
    with pytest.raises(DeviceError, match="wrong credentials") as e:
        open_transport(sshd.spec(key=sshd.wrong_key)).bench(onnx_mlp, FAST)
    assert "authorized_keys" in e.value.hint


def test_ssh_unreachable_device(onnx_mlp, tmp_path):
    from edgetk.devices.transports.loopback import _free_port

    spec = f"ssh://root@127.0.0.1:{_free_port()}?known_hosts={tmp_path / 'kh'}"
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="unreachable"):
        open_transport(spec).bench(onnx_mlp, BenchOptions(runs=1, connect_timeout_s=2, retries=1))
    assert time.monotonic() - t0 < 30


def test_ssh_device_reports_other_arch(sshd, onnx_mlp):
    with pytest.raises(DeviceError, match="reports architecture 'x86_64' but profile 'rpi5' is 'aarch64'"):
        open_transport(sshd.spec(), load_profile("rpi5")).bench(onnx_mlp, FAST)


def test_ssh_missing_python_and_corrupt_result(sshd, onnx_mlp):
    with pytest.raises(DeviceError, match="import edgetk|exited with"):
        open_transport(sshd.spec(python="/nonexistent/python")).bench(onnx_mlp, FAST)
    # a "python" that writes garbage where the result should be: corrupt result file, named
    with pytest.raises(DeviceError, match="corrupt"):
        open_transport(sshd.spec(python="sh -c 'echo garbage > result.json' --")).bench(onnx_mlp, FAST)
    # a "python" that writes nothing: missing result
    with pytest.raises(DeviceError, match="left no result"):
        open_transport(sshd.spec(python="true")).bench(onnx_mlp, FAST)


def test_ssh_device_disappears_mid_run(tmp_path, onnx_mlp):
    from edgetk.devices.transports.loopback import LoopbackSshd as Sshd

    d = Sshd(tmp_path).start()
    opts = BenchOptions(runs=1, timeout_s=60, connect_timeout_s=3, retries=1)
    # the remote "python" sleeps; the whole sshd (listener + sessions) is killed while it runs
    spec = d.spec(python="sleep 30; python3")
    killer = threading.Timer(2.5, lambda: _kill_tree(d.proc.pid))
    killer.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(DeviceError, match="disappeared|unreachable"):
            open_transport(spec).bench(onnx_mlp, opts)
    finally:
        killer.cancel()
        d.stop()
    assert time.monotonic() - t0 < 45


def _kill_tree(pid: int) -> None:
    """Kill the sshd we started and every session process it forked (the device "loses power")."""
    import psutil

    root = psutil.Process(pid)
    for p in [*root.children(recursive=True), root]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_adb_commands_and_missing_adb(monkeypatch, onnx_mlp, tmp_path):
    from edgetk.devices.transports.adb import AdbShell

    sh = AdbShell("R5CX123", adb="/usr/bin/adb")
    assert sh.shell_command("uname -m") == ["/usr/bin/adb", "-s", "R5CX123", "shell", "uname -m; echo __rc=$?"]
    assert sh.push_command("/a", "/data/local/tmp/x") == ["/usr/bin/adb", "-s", "R5CX123", "push", "/a",
                                                          "/data/local/tmp/x"]
    assert sh.pull_command("/r.json", "/l.json")[-3:] == ["pull", "/r.json", "/l.json"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no adb on PATH
    with pytest.raises(DeviceError, match="'adb' is not installed") as e:
        open_transport("adb:R5CX123").bench(onnx_mlp, FAST)
    assert "apt-get install adb" in e.value.hint
    with pytest.raises(ConfigError, match="bad adb device"):
        open_transport("adb:")


def test_unknown_device_spec():
    with pytest.raises(ConfigError, match="unknown device"):
        open_transport("telnet://x")


def test_rpc_time_evaluator(rpc_fleet, tvm_mlp):
    res = open_transport(rpc_fleet.spec, load_profile("host-x86")).bench(tvm_mlp, FAST)
    _check(res)
    assert res.timer == "time_evaluator" and res.peak_rss_mb is None
    assert res.extra["library"] == "model.so"


def test_rpc_fleet_splits_work(rpc_fleet, tvm_mlp):
    from edgetk.devices.transports.rpc import fleet_bench

    results = fleet_bench([tvm_mlp] * 4, rpc_fleet.spec, BenchOptions(runs=30, warmup=1, timeout_s=120))
    servers = {r.extra["server"] for r in results}
    assert len(results) == 4 and len(servers) == 2, servers


def test_rpc_bad_key_unreachable_and_wrong_arch(rpc_fleet, tvm_mlp, onnx_mlp):
    from edgetk.devices.transports.loopback import _free_port

    with pytest.raises(DeviceError, match="no RPC server with key 'rpi5'"):
        open_transport(f"rpc://127.0.0.1:{rpc_fleet.port}/rpi5").bench(tvm_mlp, FAST)
    with pytest.raises(DeviceError, match="unreachable"):
        open_transport(f"rpc://127.0.0.1:{_free_port()}/x").bench(tvm_mlp, FAST)
    with pytest.raises(ArtifactError, match="runs TVM libraries"):
        open_transport(rpc_fleet.spec).bench(onnx_mlp, FAST)
    # the x86 servers are asked to load the rpi5 (aarch64) library: the device reports another architecture
    with pytest.raises(DeviceError, match="cannot load the aarch64 library"):
        open_transport(rpc_fleet.spec, load_profile("rpi5")).bench(tvm_mlp, FAST)
