"""Cross-compilation toolchains and device-side tools, checked before any work starts.

    check_profile_toolchain(load_profile("rpi5"))   # raises DeviceError naming the install command
    require_tool("qemu-aarch64")                     # -> absolute path

Each tool is data: the binary, what it is for, and the command that installs it.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgetk.errors import DeviceError


@dataclass(frozen=True)
class Tool:
    binary: str
    purpose: str
    install: str
    files: tuple[str, ...] = ()     # extra files that must exist (e.g. a sysroot)


TOOLS: dict[str, Tool] = {t.binary: t for t in (
    Tool("aarch64-linux-gnu-gcc", "cross-compile and link aarch64 Linux shared libraries",
         "apt-get install gcc-aarch64-linux-gnu", ("/usr/aarch64-linux-gnu/lib",)),
    Tool("aarch64-linux-gnu-g++", "cross-compile the C++ TVM runner for aarch64", "apt-get install g++-aarch64-linux-gnu"),
    Tool("qemu-aarch64", "run aarch64 Linux programs on this host (user mode)",
         "apt-get install qemu-user gcc-aarch64-linux-gnu", ("/usr/aarch64-linux-gnu/lib",)),
    Tool("clang", "compile for macOS / Apple silicon",
         "on the Mac: xcode-select --install (cross-linking to macOS from Linux is not supported)"),
    Tool("ld64.lld", "link Mach-O binaries for macOS",
         "on the Mac: xcode-select --install (cross-linking to macOS from Linux is not supported)"),
    Tool("nvcc", "compile CUDA kernels to PTX/cubin", "install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads)"),
    Tool("ssh", "run commands on a device over SSH", "apt-get install openssh-client"),
    Tool("scp", "copy files to and from a device over SSH", "apt-get install openssh-client"),
    Tool("adb", "talk to an Android phone over USB or TCP", "apt-get install adb"),
    Tool("sshd", "run an SSH server (tests)", "apt-get install openssh-server"),
    Tool("chromium", "render HTML reports headless (tests)", "apt-get install chromium"),
)}


def find_tool(binary: str, path: str | None = None) -> str | None:
    """Absolute path of `binary` on `path` (default $PATH) with its extra files present, or None."""
    found = shutil.which(binary, path=path)
    if found is None and binary == "sshd":
        found = shutil.which(binary, path=(path or os.environ.get("PATH", "")) + os.pathsep + "/usr/sbin")
    tool = TOOLS.get(binary)
    if found and tool and not all(Path(f).exists() for f in tool.files):
        return None
    return found


def require_tool(binary: str, path: str | None = None, why: str | None = None) -> str:
    found = find_tool(binary, path)
    if found:
        return found
    tool = TOOLS.get(binary)
    purpose = why or (tool.purpose if tool else "this step")
    install = tool.install if tool else f"install '{binary}' and put it on PATH"
    raise DeviceError(f"toolchain: '{binary}' is not installed (needed to {purpose})", hint=install)


def check_tools(binaries: tuple[str, ...] | list[str], path: str | None = None) -> dict[str, str]:
    """Check every tool up front; one error lists all that are missing with their install commands."""
    missing = [b for b in binaries if not find_tool(b, path)]
    if missing:
        installs = sorted({TOOLS[b].install if b in TOOLS else f"install '{b}'" for b in missing})
        raise DeviceError(f"toolchain: missing {', '.join(repr(m) for m in missing)}", hint="; ".join(installs))
    return {b: find_tool(b, path) or "" for b in binaries}


def check_profile_toolchain(profile, path: str | None = None) -> dict[str, str]:
    """Every tool a profile's `toolchain` names, checked before compilation starts."""
    try:
        return check_tools(profile.toolchain, path)
    except DeviceError as exc:
        raise DeviceError(f"cannot build for target {profile.name!r}: {exc.args[0]}", hint=exc.hint) from None
