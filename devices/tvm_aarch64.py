"""The TVM runtime for aarch64 Linux, a small C++ runner, and running TVM libraries under qemu-aarch64.

    outs = run_aarch64("art/aarch64-linux-gnu/model.so", [tokens, pos, k, v])   # list of numpy arrays
    outs, timing = run_aarch64_timed(lib, inputs, repeat=10)                      # + {"load_ms", "run_ms"}

`aarch64_runtime()` fetches the aarch64 wheels of the installed apache-tvm and apache-tvm-ffi versions
once (`pip download --platform manylinux_2_28_aarch64`, into the edgetk cache), extracts
`libtvm_runtime.so`, `libtvm_ffi.so` and the tvm-ffi headers, and cross-compiles `tvm_runner.cc` with
`aarch64-linux-gnu-g++ ... -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi` (without --no-as-needed the
linker drops libtvm_runtime and the Relax VM executable is "not registered"). Everything is cached
under `<edgetk cache>/tvm-aarch64/<versions>/`, so a rerun neither downloads nor compiles.

The runner protocol (files, so any transport can carry it): IN_DIR/inputs.txt lists
"DTYPE NDIM D0 .. FILE" per input (raw little-endian bytes); the runner writes OUT_DIR/outputs.txt in the
same format plus out_<i>.bin, and one JSON line with load and per-run times on stdout.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgetk.cache import cache_dir
from edgetk.errors import DeviceError, MissingDependencyError

from .toolchains import check_tools

log = logging.getLogger(__name__)

PLATFORM = "manylinux_2_28_aarch64"
RUNNER_SOURCE = Path(__file__).with_name("tvm_runner.cc")
CXX = "aarch64-linux-gnu-g++"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"
# what each wheel contributes: (pip name, distribution name, {member prefix: destination in the runtime dir})
WHEELS = (
    ("apache-tvm", "apache-tvm", {"tvm/lib/libtvm_runtime.so": "lib/libtvm_runtime.so"}),
    ("apache-tvm-ffi", "apache-tvm-ffi", {"tvm_ffi/lib/libtvm_ffi.so": "lib/libtvm_ffi.so",
                                          "tvm_ffi/include/tvm/": "include/tvm/",
                                          "tvm_ffi/include/dlpack/": "include/dlpack/"}),
)
# SHA-256 of the extracted libraries for versions we have checked (others are trusted as pip delivered them)
KNOWN_SHA256 = {
    ("apache-tvm", "0.27.0.post1", "lib/libtvm_runtime.so"):
        "ba06950fac134b8d71549111fad2c6605cd6f738061fe0482f217c37ccbdff05",
    ("apache-tvm-ffi", "0.1.15.post2", "lib/libtvm_ffi.so"):
        "c4c51b8793866b704dcefd12a2f127c691b905977962f0970a112b4df5f9ea07",
}
DTYPES = {"float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


@dataclass(frozen=True)
class AArch64Runtime:
    root: Path

    @property
    def lib_dir(self) -> Path:
        return self.root / "lib"

    @property
    def runner(self) -> Path:
        return self.root / f"tvm_runner-{_runner_hash()}"


def _versions() -> dict[str, str]:
    out = {}
    for pip_name, dist, _ in WHEELS:
        try:
            out[pip_name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            raise MissingDependencyError(f"{dist} is not installed: the aarch64 runtime matches the host's TVM",
                                         hint="pip install 'edgetk[tvm]'") from None
    return out


def _runner_hash() -> str:
    return hashlib.sha256(RUNNER_SOURCE.read_bytes()).hexdigest()[:12]


def aarch64_runtime() -> AArch64Runtime:
    """The cached aarch64 TVM runtime + runner for the installed TVM versions (fetched/built on first use)."""
    vers = _versions()
    rt = AArch64Runtime(cache_dir() / "tvm-aarch64" / "_".join(f"{k}-{v}" for k, v in vers.items()))
    if not (rt.lib_dir / "libtvm_runtime.so").is_file() or not (rt.lib_dir / "libtvm_ffi.so").is_file():
        _install_runtime(rt, vers)
    if not rt.runner.is_file():
        _build_runner(rt)
    return rt


def _download(pip_name: str, version: str) -> Path:
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = f"{pip_name.replace('-', '_')}-{version}-"
    for w in wheels.glob("*.whl"):
        if w.name.startswith(stem) and "aarch64" in w.name:
            return w
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--platform", PLATFORM, "--python-version", py, f"{pip_name}=={version}", "-d", tmp]
        log.info("downloading the aarch64 wheel of %s==%s", pip_name, version)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not found:
            raise DeviceError(f"could not download the aarch64 wheel of {pip_name}=={version}: "
                              f"{(proc.stderr or proc.stdout).strip()[-300:]}",
                              hint=f"check PyPI access, or put the {PLATFORM} wheel into {wheels} by hand")
        dest = wheels / found[0].name
        os.replace(found[0], dest)
        return dest


def _install_runtime(rt: AArch64Runtime, vers: dict[str, str]) -> None:
    rt.root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tvm-aarch64-", dir=rt.root.parent))
    try:
        for pip_name, _, members in WHEELS:
            wheel = _download(pip_name, vers[pip_name])
            _extract(wheel, members, tmp)
            for (name, ver, rel), sha in KNOWN_SHA256.items():
                if name == pip_name and ver == vers[pip_name] and _sha256(tmp / rel) != sha:
                    wheel.unlink(missing_ok=True)
                    raise DeviceError(f"{rel} from {wheel.name} does not match its known SHA-256",
                                      hint="the download was corrupted; run again to fetch it anew")
        if rt.root.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
            return
        os.replace(tmp, rt.root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _extract(wheel: Path, members: dict[str, str], dest: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as z:
            names = z.namelist()
            for prefix, target in members.items():
                picked = [n for n in names if n == prefix or (prefix.endswith("/") and n.startswith(prefix))]
                if not picked:
                    raise DeviceError(f"{wheel.name} lacks {prefix}", hint="TVM changed its wheel layout; "
                                      "pin apache-tvm to a version edgetk knows")
                for n in picked:
                    if n.endswith("/"):
                        continue
                    out = dest / (target + n[len(prefix):] if prefix.endswith("/") else target)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(n) as src, open(out, "wb") as f:
                        shutil.copyfileobj(src, f, 1 << 20)
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise DeviceError(f"{wheel.name} is damaged", hint="run again to download it anew") from None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_runner(rt: AArch64Runtime) -> None:
    check_tools([CXX])
    fd, tmp = tempfile.mkstemp(prefix=".tvm_runner.", dir=rt.root)
    os.close(fd)
    cmd = [CXX, "-std=c++17", "-O2", "-I", str(rt.root / "include"), str(RUNNER_SOURCE), "-o", tmp,
           "-L", str(rt.lib_dir), "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN/lib"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise DeviceError(f"cross-compiling the TVM runner failed: {proc.stderr.strip()[-400:]}",
                          hint=f"check that {CXX} works (apt-get install g++-aarch64-linux-gnu)")
    os.chmod(tmp, 0o755)
    os.replace(tmp, rt.runner)


# -- running ------------------------------------------------------------------------------------------
def write_inputs(inputs: Sequence[Any], in_dir: Path) -> None:
    lines = []
    for i, x in enumerate(inputs):
        a = np.ascontiguousarray(np.asarray(x))
        if str(a.dtype) not in DTYPES:
            raise DeviceError(f"input {i} has dtype {a.dtype}, which the runner does not carry",
                              hint=f"use one of {sorted(DTYPES)}")
        a.astype(a.dtype.newbyteorder("<"), copy=False).tofile(in_dir / f"in_{i}.bin")
        lines.append(" ".join([str(a.dtype), str(a.ndim), *map(str, a.shape), f"in_{i}.bin"]))
    (in_dir / "inputs.txt").write_text("\n".join(lines) + "\n")


def read_outputs(out_dir: Path) -> list[np.ndarray]:
    spec = out_dir / "outputs.txt"
    if not spec.is_file():
        raise DeviceError(f"the runner left no {spec.name}", hint="the run crashed; see the error above")
    outs = []
    for line in spec.read_text().splitlines():
        parts = line.split()
        dtype, ndim = parts[0], int(parts[1])
        shape, name = tuple(int(d) for d in parts[2:2 + ndim]), parts[2 + ndim]
        data = np.fromfile(out_dir / name, dtype=np.dtype(dtype).newbyteorder("<"))
        if data.size != int(np.prod(shape, dtype=np.int64)):
            raise DeviceError(f"runner output {name} is truncated ({data.size} values for shape {shape})",
                              hint="the device ran out of space or the run was killed; run again")
        outs.append(data.reshape(shape).astype(dtype))
    return outs


def qemu_command(runtime: AArch64Runtime, lib: Path, in_dir: Path, out_dir: Path, repeat: int) -> list[str]:
    tools = check_tools([QEMU])
    return [tools[QEMU], "-L", SYSROOT, str(runtime.runner), str(lib.resolve()), str(in_dir), str(out_dir), str(repeat)]


def run_aarch64_timed(lib_path: str | os.PathLike, inputs: Sequence[Any], repeat: int = 1,
                      timeout: float = 600) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Run an aarch64 TVM library's Relax "main" under qemu-aarch64; outputs and the runner's timings."""
    lib = Path(lib_path)
    if not lib.is_file():
        raise DeviceError(f"no TVM library at {lib}", hint="export with --format tvm --target rpi5 (or another "
                                                           "aarch64 profile) first")
    rt = aarch64_runtime()
    with tempfile.TemporaryDirectory(prefix="edgetk-qemu-") as d:
        in_dir, out_dir = Path(d) / "in", Path(d) / "out"
        in_dir.mkdir()
        out_dir.mkdir()
        write_inputs(inputs, in_dir)
        cmd = qemu_command(rt, lib, in_dir, out_dir, repeat)
        env = {**os.environ, "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", "1")}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"the aarch64 run of {lib.name} under qemu exceeded {timeout:.0f} s",
                              hint="use a smaller model or raise the timeout") from None
        if proc.returncode != 0:
            raise DeviceError(f"the aarch64 run of {lib} failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-400:]}",
                              hint="check that the library was built for aarch64-linux-gnu by edgetk export")
        outs = read_outputs(out_dir)
    timing = json.loads(proc.stdout.strip().splitlines()[-1])
    return outs, timing


def run_aarch64(lib_path: str | os.PathLike, inputs: Sequence[Any], timeout: float = 600) -> list[np.ndarray]:
    """Outputs of one run of the library's "main" under qemu-aarch64 with the aarch64 TVM runtime."""
    return run_aarch64_timed(lib_path, inputs, 1, timeout)[0]
