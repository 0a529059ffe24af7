"""edgetk: compress, export, compile and measure PyTorch models for edge devices."""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ArtifactError,
    ConfigError,
    DataError,
    DeviceError,
    EdgetkError,
    MissingDependencyError,
    ModelLoadError,
    ParityError,
    UnsupportedOpError,
)


def export(model, example_inputs=None, format: str = "onnx", target=None, out=None, **kwargs):
    """Export any nn.Module to an artifact (see edgetk.exporters)."""
    from edgetk.exporters import export as _export  # heavy imports only when used

    return _export(model, example_inputs, format=format, target=target, out=out, **kwargs)


__all__ = [
    "__version__", "export", "EdgetkError", "ConfigError", "UnsupportedOpError", "ParityError",
    "MissingDependencyError", "ArtifactError", "ModelLoadError", "DataError", "DeviceError",
]
