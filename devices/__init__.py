"""edgetk.devices: device profiles (TOML data), toolchains, compilation per target, and transports.

    from edgetk.devices import load_profile, list_profiles, detect, compile_artifact
"""
from __future__ import annotations

from .profile import DeviceProfile, detect, list_profiles, load_profile


def compile_artifact(artifact, target, out=None, **opts):
    """See edgetk.devices.compile (imported lazily: heavy backends load only when used)."""
    from .compile import compile_artifact as _compile

    return _compile(artifact, target, out, **opts)


__all__ = ["DeviceProfile", "detect", "list_profiles", "load_profile", "compile_artifact"]
