"""Device profiles as data, toolchain checks, compile dispatch and its bad input."""
from __future__ import annotations

import dataclasses
import platform

import pytest

from edgetk.devices.profile import BUILTIN_DIR, DeviceProfile, detect, list_profiles, load_profile
from edgetk.devices.toolchains import check_profile_toolchain, check_tools, require_tool
from edgetk.errors import ConfigError, DeviceError, UnsupportedOpError

REQUIRED = {"host-x86", "rpi5", "jetson-orin-nano", "snapdragon-8gen3", "cuda-generic", "apple-m"}


def test_builtin_profiles_load_and_are_frozen():
    assert REQUIRED <= set(list_profiles())
    for name in REQUIRED:
        p = load_profile(name)
        assert isinstance(p, DeviceProfile) and p.name == name
        with pytest.raises(dataclasses.FrozenInstanceError):
            p.arch = "x"  # type: ignore[misc]
    rpi = load_profile("rpi5")
    assert (rpi.arch, rpi.cpu) == ("aarch64", "cortex-a76") and {"neon", "dotprod"} <= set(rpi.cpu_features)
    jet = load_profile("jetson-orin-nano")
    assert jet.gpu.arch == "sm_87" and jet.gpu.memory_mb > 0 and jet.arch == "aarch64"
    sd = load_profile("snapdragon-8gen3")
    assert sd.npu.static_shapes and set(sd.npu.activation_dtypes) == {"int8", "int16"} and "MatMul" in sd.npu.ops


def test_host_profile_values_are_detected():
    host = load_profile("host-x86")
    det = detect()
    assert host.detected and host.threads == det.threads and host.memory_mb == det.memory_mb
    assert host.cpu == det.cpu and det.arch == {"x86_64": "x86_64", "aarch64": "aarch64"}.get(platform.machine(),
                                                                                              det.arch)


def test_adding_a_device_is_adding_a_file(tmp_path, monkeypatch):
    text = (BUILTIN_DIR / "rpi5.toml").read_text().replace('name = "rpi5"', 'name = "rpi4"')
    (tmp_path / "rpi4.toml").write_text(text.replace("cortex-a76", "cortex-a72"))
    monkeypatch.setenv("EDGETK_PROFILES", str(tmp_path))
    assert "rpi4" in list_profiles() and load_profile("rpi4").cpu == "cortex-a72"


def test_profile_missing_field_is_named(tmp_path):
    text = (BUILTIN_DIR / "rpi5.toml").read_text()
    bad = "\n".join(line for line in text.splitlines() if not line.startswith("triple"))
    (tmp_path / "rpi5.toml").write_text(bad)
    with pytest.raises(ConfigError, match=r"missing required field\(s\) \['triple'\]") as e:
        load_profile(tmp_path / "rpi5.toml")
    assert "rpi5.toml" in str(e.value)
    (tmp_path / "rpi5.toml").write_text(text + "\n[gpu]\nkind = \"cuda\"\n")
    with pytest.raises(ConfigError, match=r"\[gpu\]: missing required field\(s\) \['arch', 'memory_mb'\]"):
        load_profile(tmp_path / "rpi5.toml")
    (tmp_path / "rpi5.toml").write_text(text.replace('arch = "aarch64"', 'arch = "riscv"'))
    with pytest.raises(ConfigError, match="field 'arch'"):
        load_profile(tmp_path / "rpi5.toml")
    (tmp_path / "rpi5.toml").write_text("name = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profile(tmp_path / "rpi5.toml")


def test_unknown_target():
    with pytest.raises(ConfigError, match="unknown target 'pi9'") as e:
        load_profile("pi9")
    assert "rpi5" in e.value.hint


def test_toolchain_absent_names_install_command(tmp_path):
    empty = str(tmp_path)  # a PATH with nothing on it
    with pytest.raises(DeviceError, match="aarch64-linux-gnu-gcc") as e:
        check_profile_toolchain(load_profile("rpi5"), path=empty)
    assert e.value.hint == "apt-get install gcc-aarch64-linux-gnu"
    with pytest.raises(DeviceError, match="'qemu-aarch64' is not installed") as e:
        require_tool("qemu-aarch64", path=empty)
    assert "apt-get install qemu-user" in e.value.hint
    assert check_tools(["aarch64-linux-gnu-gcc", "qemu-aarch64"])  # installed here (.ci/run)


def test_compile_refuses_before_work(tmp_path):
    from edgetk.devices.compile import compile_artifact

    with pytest.raises(ConfigError, match="unknown target"):
        compile_artifact(tmp_path, "pi9")
    with pytest.raises(DeviceError, match="cannot build for target 'apple-m'") as e:
        compile_artifact(tmp_path, "apple-m")  # Apple's linker is not installable on Linux
    assert "xcode-select" in e.value.hint


@pytest.mark.backend
def test_compile_dispatch_tvm(tvm_mlp, onnx_mlp):
    from edgetk.devices.compile import compile_artifact

    art = compile_artifact(tvm_mlp, "rpi5")  # already holds the aarch64 build: returned as is
    assert "aarch64-linux-gnu/model.so" in art.manifest["files"]
    with pytest.raises(UnsupportedOpError, match="cuda-sm_87/model.so"):
        compile_artifact(tvm_mlp, "jetson-orin-nano")
    with pytest.raises(UnsupportedOpError, match="starts from a PyTorch model"):
        compile_artifact(onnx_mlp, "rpi5")
