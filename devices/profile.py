"""Device profiles as data: one TOML file per device, loaded into a frozen `DeviceProfile`.

    prof = load_profile("rpi5")                 # built-in name, a name in $EDGETK_PROFILES, or a .toml path
    prof.arch, prof.triple, prof.cpu_features, prof.gpu.arch, prof.npu.ops
    host = detect()                             # this machine, as a profile

Adding a device is adding a file: drop `mydevice.toml` into `devices/profiles/` or into a directory
named in `EDGETK_PROFILES` (os.pathsep-separated). A missing field is a `ConfigError` naming the field
and the file.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetk.errors import ConfigError

BUILTIN_DIR = Path(__file__).with_name("profiles")
ARCHES = ("x86_64", "aarch64")
# how `edgetk compile` builds for a profile (see edgetk.devices.compile.COMPILERS)
COMPILE_KINDS = ("host", "tvm-aarch64", "tvm-cuda", "tvm-macos", "npu")
_ARCH_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def normalize_arch(machine: str) -> str:
    m = machine.strip().lower()
    return _ARCH_ALIASES.get(m, m)


@dataclass(frozen=True)
class GpuSpec:
    kind: str            # "cuda"
    arch: str            # e.g. "sm_87"
    memory_mb: int


@dataclass(frozen=True)
class NpuSpec:
    name: str
    ops: tuple[str, ...]
    weight_dtypes: tuple[str, ...]
    activation_dtypes: tuple[str, ...]
    static_shapes: bool = True


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    arch: str
    triple: str
    cpu: str
    cpu_features: tuple[str, ...]
    threads: int
    memory_mb: int
    compile: str
    toolchain: tuple[str, ...] = ()
    detected: bool = False
    gpu: GpuSpec | None = None
    npu: NpuSpec | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def has_cuda(self) -> bool:
        return self.gpu is not None and self.gpu.kind == "cuda"


_SECTIONS = {"gpu": GpuSpec, "npu": NpuSpec}
_TYPES = {int: int, str: str, bool: bool}


def _required(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]


def _build(cls: type, data: dict[str, Any], where: str, skip: tuple[str, ...] = ()) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names) - set(skip))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}", hint=f"known fields: {sorted(names)}")
    missing = [n for n in _required(cls) if n not in data and n not in skip]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}",
                          hint=f"add {', '.join(repr(m) for m in missing)} to the profile (see devices/profiles/rpi5.toml)")
    kwargs = {}
    for name, value in data.items():
        if name in skip:
            continue
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: field '{name}' must be a list of strings", hint=f"fix '{name}'")
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _check(prof: DeviceProfile, where: str) -> None:
    checks = [
        (prof.arch in ARCHES, "arch", f"one of {ARCHES}"),
        (prof.compile in COMPILE_KINDS, "compile", f"one of {COMPILE_KINDS}"),
        (isinstance(prof.threads, int) and prof.threads >= 1, "threads", "an integer >= 1"),
        (isinstance(prof.memory_mb, int) and prof.memory_mb > 0, "memory_mb", "an integer > 0 (MiB)"),
        (prof.compile != "tvm-cuda" or prof.has_cuda, "gpu", "a [gpu] section with kind = \"cuda\" for compile = \"tvm-cuda\""),
        (prof.compile != "npu" or prof.npu is not None, "npu", "an [npu] section for compile = \"npu\""),
    ]
    for ok, name, expected in checks:
        if not ok:
            raise ConfigError(f"{where}: field '{name}' = {getattr(prof, name)!r} is invalid: expected {expected}",
                              hint=f"fix '{name}' in {where}")


def profile_from_dict(data: dict[str, Any], where: str = "profile") -> DeviceProfile:
    sections = {}
    for key, cls in _SECTIONS.items():
        if key in data:
            if not isinstance(data[key], dict):
                raise ConfigError(f"{where}: '{key}' must be a table [{key}]", hint=f"write [{key}] on its own line")
            sections[key] = _build(cls, data[key], f"{where} [{key}]")
    prof = _build(DeviceProfile, {**data, **sections}, where, skip=("source",))
    prof = dataclasses.replace(prof, source=where)
    _check(prof, where)
    return prof


def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("EDGETK_PROFILES", "").split(os.pathsep) if p]
    return [*extra, BUILTIN_DIR]


def profile_paths() -> dict[str, Path]:
    """Profile name -> file; earlier directories (EDGETK_PROFILES) override the built-in ones."""
    found: dict[str, Path] = {}
    for d in reversed(search_dirs()):
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found[p.stem] = p
    return found


def list_profiles() -> list[str]:
    return sorted(profile_paths())


def load_profile_file(path: str | os.PathLike) -> DeviceProfile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read device profile {path}: {exc}", hint="check the path") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"device profile {path} is not valid TOML: {exc}", hint="fix the TOML syntax") from None
    prof = profile_from_dict(data, str(path))
    if prof.name != path.stem:
        raise ConfigError(f"{path}: field 'name' = {prof.name!r} differs from the file name {path.stem!r}",
                          hint=f"rename the file to {prof.name}.toml or set name = {path.stem!r}")
    return detect(prof) if prof.detected else prof


def load_profile(name_or_path: "str | os.PathLike | DeviceProfile") -> DeviceProfile:
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    s = str(name_or_path)
    if s.endswith(".toml") or os.sep in s:
        return load_profile_file(s)
    paths = profile_paths()
    if s not in paths:
        raise ConfigError(f"unknown target {s!r}", hint=f"known targets: {', '.join(sorted(paths))}; "
                          "or add a profile file (see `edgetk devices list`)")
    return load_profile_file(paths[s])


# ---------------------------------------------------------------------------------------------- detect
def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if ":" in line:
            k, _, v = line.partition(":")
            info.setdefault(k.strip(), v.strip())
    return info


def _memory_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)
    except (ValueError, OSError, AttributeError):
        return 1024


_FEATURES_OF_INTEREST = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile",
                         "neon", "asimd", "asimddp", "fphp", "i8mm", "sve", "sve2", "bf16")


def detect(base: DeviceProfile | None = None) -> DeviceProfile:
    """This host as a profile: CPU model, features, threads and memory read from the OS."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    arch = normalize_arch(platform.machine())
    features = tuple(f.replace("_", ".") if f == "sse4_2" else f for f in _FEATURES_OF_INTEREST if f in flags)
    values = dict(
        name=base.name if base else f"host-{arch}",
        description=base.description if base else f"this {arch} host (detected)",
        arch=arch if arch in ARCHES else (base.arch if base else arch),
        triple=f"{arch}-linux-gnu" if platform.system() == "Linux" else (base.triple if base else arch),
        cpu=info.get("model name") or info.get("CPU part") or platform.processor() or "unknown",
        cpu_features=features, threads=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else (os.cpu_count() or 1), memory_mb=_memory_mb(),
        compile=base.compile if base else "host", toolchain=base.toolchain if base else (), detected=True,
        gpu=base.gpu if base else None, npu=base.npu if base else None, source=base.source if base else "detected")
    return DeviceProfile(**values)
