"""One `Session` interface over eager PyTorch, ONNX Runtime, the ExecuTorch runtime and the TVM VM.

    sess = Session(artifact_or_dir)          # picks the backend from the artifact's manifest "format"
    outputs = sess.run([x])                  # list of numpy arrays, in the graph's output order

Backends register themselves: `SESSION_BACKENDS.register("onnx", OnnxSession)`; they are imported
lazily by format name from `BACKEND_MODULES`, so a missing heavy runtime only matters when used.
"""
from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from typing import Any, Sequence

import numpy as np
import torch

from edgetk.artifact import Artifact
from edgetk.errors import ArtifactError
from edgetk.registry import Registry

SESSION_BACKENDS: Registry[type] = Registry("runtime backend")
# format -> module that registers its backend when imported
BACKEND_MODULES = {
    "eager": "edgetk.runtimes.session",
    "onnx": "edgetk.runtimes.onnx_session",
    "executorch": "edgetk.runtimes.executorch_session",
    "tvm": "edgetk.runtimes.tvm_session",
}


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class SessionBackend(ABC):
    format: str = "?"

    def __init__(self, artifact: Artifact, device: str = "cpu", **options: Any):
        self.artifact = artifact
        self.device = device
        self.options = options

    @property
    def input_names(self) -> list[str]:
        return list(self.artifact.manifest.get("inputs", {}).get("names", []))

    @property
    def output_names(self) -> list[str]:
        return list(self.artifact.manifest.get("outputs", {}).get("names", []))

    @abstractmethod
    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """Run once on positional inputs (tensors or arrays); return outputs as numpy arrays."""


def Session(artifact: Artifact | str | os.PathLike, device: str = "cpu", **options: Any) -> SessionBackend:
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    fmt = art.manifest.get("format")
    if fmt is None:
        raise ArtifactError(f"artifact {art.root} (kind {art.kind!r}) declares no 'format'",
                            hint="pass an artifact written by `edgetk export` or `edgetk compress`")
    if fmt not in SESSION_BACKENDS and fmt in BACKEND_MODULES:
        importlib.import_module(BACKEND_MODULES[fmt])
    backend = SESSION_BACKENDS.get(fmt)
    return backend(art, device=device, **options)


class EagerSession(SessionBackend):
    """Runs a compressed-model artifact (format "eager") in PyTorch."""

    format = "eager"

    def __init__(self, artifact: Artifact, device: str = "cpu", **options: Any):
        super().__init__(artifact, device, **options)
        from edgetk.models import load

        self.loaded = load(artifact.root)

    @torch.inference_mode()
    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        args = [torch.as_tensor(x) for x in inputs]
        out = self.loaded.model(*args)
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [to_numpy(o) for o in outs]


SESSION_BACKENDS.register("eager", EagerSession)
