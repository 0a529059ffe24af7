"""Transports run the measurement harness where the device is: local, qemu-aarch64, ssh, adb, TVM RPC.

    t = open_transport("ssh://pi@10.0.0.5:22?key=~/.ssh/id_ed25519", profile=load_profile("rpi5"))
    result = t.bench("out/model-onnx", BenchOptions(runs=50))        # -> BenchResult
"""
from __future__ import annotations

import importlib

from .base import BenchOptions, Transport, unknown_device

# device-spec prefix -> (module, class); modules import lazily so ssh/adb/tvm are only needed when used
TRANSPORTS = {
    "local": ("edgetk.devices.transports.local", "LocalTransport"),
    "qemu": ("edgetk.devices.transports.qemu", "QemuTransport"),
    "ssh://": ("edgetk.devices.transports.ssh", "SshTransport"),
    "adb:": ("edgetk.devices.transports.adb", "AdbTransport"),
    "rpc://": ("edgetk.devices.transports.rpc", "RpcTransport"),
}


def open_transport(spec: str, profile=None) -> Transport:
    for prefix, (mod, cls) in TRANSPORTS.items():
        if spec == prefix or (prefix.endswith((":", "//")) and spec.startswith(prefix)):
            return getattr(importlib.import_module(mod), cls)(spec, profile)
    raise unknown_device(spec)


__all__ = ["BenchOptions", "Transport", "TRANSPORTS", "open_transport"]
