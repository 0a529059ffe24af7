"""`compile_artifact(artifact, target) -> Artifact`: build what a device profile runs, dispatched by
`profile.compile` through the `COMPILERS` table.

| profile.compile | input                          | output                                                       |
|-----------------|--------------------------------|--------------------------------------------------------------|
| host            | any artifact                   | the same artifact (it already runs here)                      |
| tvm-aarch64     | model artifact / zoo name / TVM artifact built for the target | TVM artifact with `aarch64-linux-gnu/model.so` (edgetk.exporters.tvm, checked under qemu) |
| tvm-cuda        | same                           | TVM artifact with `cuda-<arch>/model.so` + kernels.cu (+ cubin with nvcc)                  |
| tvm-macos       | -                              | refused here: needs Apple's toolchain (named in the error)   |
| npu             | ONNX artifact (or a model, exported to ONNX first) | static QDQ int8 ONNX + placement report (edgetk.devices.npu) |

Toolchains are checked before any work starts.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from edgetk.artifact import Artifact
from edgetk.errors import ConfigError, UnsupportedOpError

from .profile import DeviceProfile, load_profile
from .toolchains import check_profile_toolchain

log = logging.getLogger(__name__)
MODEL_KINDS = ("model",)  # artifact kinds that hold a PyTorch model (compress output)


def _as_artifact(src: Any) -> Artifact | None:
    if isinstance(src, Artifact):
        return src
    if isinstance(src, (str, os.PathLike)) and Artifact.is_artifact(src):
        return Artifact.load(src)
    return None


def _tvm_libs(profile: DeviceProfile) -> list[str]:
    libs = []
    if profile.arch == "aarch64":
        libs.append(f"{profile.triple}/model.so")
    if profile.has_cuda:
        libs.append(f"cuda-{profile.gpu.arch}/model.so")
    return libs


def compile_tvm(src: Any, profile: DeviceProfile, out: Path, **opts: Any) -> Artifact:
    """TVM libraries for the profile, via edgetk.exporters.tvm (the export builds every library of the target)."""
    art = _as_artifact(src)
    want = _tvm_libs(profile)
    if art is not None and art.manifest.get("format") == "tvm":
        files = art.manifest.get("files", {})
        missing = [w for w in want if w not in files]
        if not missing:
            return art
        raise UnsupportedOpError(f"TVM artifact {art.root} has no {', '.join(missing)} for {profile.name}",
                                 hint="compile the model artifact (compress output) or zoo name instead, or re-export "
                                      f"with --format tvm --target {profile.name}")
    if art is not None and art.kind not in MODEL_KINDS:
        raise UnsupportedOpError(f"TVM compilation starts from a PyTorch model; {art.root} is a "
                                 f"{art.manifest.get('format')!r} graph", hint="pass the model artifact or a zoo name")
    from edgetk.exporters import export
    from edgetk.models import load

    loaded = load(art.root if art is not None else src)
    return export(loaded, None, format="tvm", target=profile, out=out, **opts)


def compile_npu(src: Any, profile: DeviceProfile, out: Path, **opts: Any) -> Artifact:
    from . import npu

    art = _as_artifact(src)
    if art is None or art.manifest.get("format") != "onnx":
        if art is not None and art.kind not in MODEL_KINDS:
            raise UnsupportedOpError(f"the NPU path needs an ONNX graph; {art.root} is {art.manifest.get('format')!r}",
                                     hint="export with --format onnx first")
        from edgetk.exporters import export
        from edgetk.models import load

        onnx_out = out.with_name(out.name + ".onnx-src")
        art = export(load(art.root if art is not None else src), None, format="onnx", out=onnx_out)
    return npu.compile_npu(art, profile, out, **opts)


def compile_host(src: Any, profile: DeviceProfile, out: Path, **opts: Any) -> Artifact:
    art = _as_artifact(src)
    if art is None:
        raise ConfigError(f"{src!r} is not an artifact", hint="export the model first (edgetk export)")
    return art


def compile_refused(src: Any, profile: DeviceProfile, out: Path, **opts: Any) -> Artifact:
    raise UnsupportedOpError(f"edgetk cannot cross-build for {profile.name} ({profile.triple}) from this host",
                             hint="run `edgetk compile` on the Mac itself, or export to onnx/executorch for it")


COMPILERS: dict[str, Callable[..., Artifact]] = {
    "host": compile_host,
    "tvm-aarch64": compile_tvm,
    "tvm-cuda": compile_tvm,
    "tvm-macos": compile_refused,
    "npu": compile_npu,
}


def compile_artifact(artifact: Any, target: "str | DeviceProfile", out: str | os.PathLike | None = None,
                     **opts: Any) -> Artifact:
    """Build `artifact` (artifact dir, Artifact, model spec) for `target` (profile name, .toml path or profile)."""
    profile = load_profile(target)
    check_profile_toolchain(profile)  # before any work
    fn = COMPILERS.get(profile.compile)
    if fn is None:
        raise ConfigError(f"profile {profile.name!r} has compile = {profile.compile!r}, which edgetk cannot build",
                          hint=f"use one of {sorted(COMPILERS)}")
    if out is None and profile.compile != "host":
        base = Path(artifact.root if isinstance(artifact, Artifact) else str(artifact))
        out = base.with_name(f"{base.name}-{profile.name}")
    return fn(artifact, profile, Path(out) if out is not None else Path("."), **opts)
