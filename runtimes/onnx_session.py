"""ONNX Runtime backend of `Session` (CPU execution provider; edgetk-domain nodes run from their bodies)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from edgetk.artifact import Artifact
from edgetk.errors import ArtifactError, require

from .session import SESSION_BACKENDS, SessionBackend, to_numpy


class OnnxSession(SessionBackend):
    format = "onnx"

    def __init__(self, artifact: Artifact, device: str = "cpu", **options: Any):
        super().__init__(artifact, device, **options)
        ort = require("onnxruntime", "onnx")
        path = artifact.file(artifact.manifest.get("file", "model.onnx"))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if options.get("unpack", "load") == "per-call" and _has_functions(artifact):
            # ORT's constant folding unpacks the packed codes into int32 index tensors at load time (fast calls,
            # up to 16x the packed bytes in RAM); "per-call" keeps them packed and unpacks on every call
            so.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        threads = options.get("threads")
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ArtifactError(f"onnxruntime cannot load {path.name} from {artifact.root}: "
                                f"{str(exc).splitlines()[0][:300]}",
                                hint="the file is truncated or corrupt; re-export it") from exc
        self._names = [i.name for i in self.session.get_inputs()]

    @property
    def input_names(self) -> list[str]:
        return list(self._names)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        if len(inputs) != len(self._names):
            raise ArtifactError(f"the ONNX graph takes {len(self._names)} inputs ({', '.join(self._names)}), "
                                f"got {len(inputs)}", hint="pass inputs in the manifest's input order")
        feed = {n: to_numpy(x) for n, x in zip(self._names, inputs)}
        return list(self.session.run(None, feed))


def _has_functions(artifact: Artifact) -> bool:
    ops = (artifact.manifest.get("compression") or {}).get("custom_ops") or {}
    return any(v.get("lowering") == "function" for v in ops.values())


SESSION_BACKENDS.register("onnx", OnnxSession)
