"""Every error edgetk raises on purpose. Each carries a hint that tells the user what to do."""
from __future__ import annotations


class EdgetkError(Exception):
    """Base class. `hint` says how to fix the problem; the CLI prints it under the message."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:  # keep the hint visible in plain tracebacks too
        msg = super().__str__()
        return f"{msg} (hint: {self.hint})" if self.hint else msg


class ConfigError(EdgetkError, ValueError):
    """A config field is invalid. The message names the field."""

    exit_code = 2


class UnsupportedOpError(EdgetkError):
    """A graph node cannot run on the requested target/format; found at export time."""

    exit_code = 3


class ParityError(EdgetkError):
    """An exported artifact disagrees with eager PyTorch beyond the stated tolerance."""

    exit_code = 4


class MissingDependencyError(EdgetkError, ImportError):
    """An optional backend is not installed. The hint names the extra to install."""

    exit_code = 5


class ArtifactError(EdgetkError):
    """An artifact directory is missing, incomplete, tampered with or of an unknown format."""

    exit_code = 6


class ModelLoadError(EdgetkError):
    """A model file/directory/zoo name cannot be loaded."""

    exit_code = 7


class DataError(EdgetkError):
    """Text data is missing, empty or too short for what was asked."""

    exit_code = 8


class DeviceError(EdgetkError):
    """A device, transport or toolchain problem."""

    exit_code = 9


def require(module: str, extra: str):
    """Import an optional heavy backend or raise MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"'{module}' is not installed ({exc})",
            hint=f"pip install 'edgetk[{extra}]'",
        ) from exc
