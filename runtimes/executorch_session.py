"""ExecuTorch runtime backend of `Session` (the .pte is loaded from a buffer this object keeps alive).

A decoder program carries its KV cache as mutable state of the loaded method: successive `run` calls
continue the same sequence; `reset()` reloads the method with a zeroed cache.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from edgetk.artifact import Artifact
from edgetk.errors import ArtifactError, require

from .session import SESSION_BACKENDS, SessionBackend


class ExecuTorchSession(SessionBackend):
    format = "executorch"

    def __init__(self, artifact: Artifact, device: str = "cpu", **options: Any):
        super().__init__(artifact, device, **options)
        self._runtime_mod = require("executorch.runtime", "executorch")
        self.path = artifact.file(artifact.manifest.get("file", "model.pte"))
        # the runtime does not copy the program bytes: keep them referenced for the session's lifetime
        self._buffer = self.path.read_bytes()
        self.reset()

    def reset(self) -> None:
        try:
            rt = self._runtime_mod.Runtime.get()
            self._program = rt.load_program(self._buffer)
            self._method = self._program.load_method("forward")
        except Exception as exc:  # the pybindings raise RuntimeError / ValueError with status codes
            raise ArtifactError(f"ExecuTorch cannot load {self.path.name} from {self.artifact.root}: "
                                f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}",
                                hint="the file is truncated or corrupt; re-export it") from exc

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        args = [x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
        try:
            outs = self._method.execute(args)
        except Exception as exc:
            raise ArtifactError(f"ExecuTorch failed to run {self.path.name}: {exc}",
                                hint="check input count, shapes and dtypes against the manifest") from exc
        return [o.detach().numpy().copy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outs]


SESSION_BACKENDS.register("executorch", ExecuTorchSession)
