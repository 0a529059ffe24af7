"""TVM backend of `Session`: loads the artifact's host library and runs its Relax VM "main".

    sess = Session("out/vq-tvm")            # manifest format "tvm"
    logits, k, v = sess.run([tokens, pos, k_cache, v_cache])

The artifact's other libraries (aarch64, CUDA) are run by the device transports
(`edgetk.devices.tvm_aarch64.run_aarch64` under qemu, TVM RPC on a board); this session runs the one
built for this machine. `threads=N` sets TVM's CPU thread pool size.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from edgetk.artifact import Artifact
from edgetk.errors import ArtifactError, require

from .session import SESSION_BACKENDS, SessionBackend, to_numpy


def flatten(out: Any) -> list[np.ndarray]:
    """VM results (a tensor or nested tuples of tensors) -> flat list of numpy arrays."""
    if hasattr(out, "numpy"):
        return [out.numpy()]
    if isinstance(out, (list, tuple)) or type(out).__name__ in ("Array", "List", "Tuple"):
        return [a for o in out for a in flatten(o)]
    raise ArtifactError(f"the TVM VM returned {type(out).__name__}, not tensors",
                        hint="the library's main function does not match the manifest; re-export it")


class TvmSession(SessionBackend):
    format = "tvm"

    def __init__(self, artifact: Artifact, device: str = "cpu", **options: Any):
        super().__init__(artifact, device, **options)
        tvm = require("tvm", "tvm")
        from tvm import relax

        if device != "cpu":
            raise ArtifactError(f"the TVM session runs the host library on the CPU, not {device!r}",
                                hint="run the CUDA / aarch64 libraries on their device (edgetk bench --device)")
        if options.get("threads"):
            _set_threads(int(options["threads"]))
        path = artifact.file(artifact.manifest.get("file", "model.so"))
        try:
            self.lib = tvm.runtime.load_module(str(path))
            self.vm = relax.VirtualMachine(self.lib, tvm.cpu())
            self._main = self.vm["main"]
        except Exception as exc:  # TVM raises its own error types for bad/alien libraries
            why = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"TVM cannot load {path.name} from {artifact.root}: {why}",
                                hint="the library is corrupt or built for another machine; re-export it") from exc
        self._tvm = tvm
        self._n_inputs = len(self.input_names) or None

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        if self._n_inputs is not None and len(inputs) != self._n_inputs:
            raise ArtifactError(f"the TVM program takes {self._n_inputs} inputs ({', '.join(self.input_names)}), "
                                f"got {len(inputs)}", hint="pass inputs in the manifest's input order")
        dtypes = self.artifact.manifest.get("inputs", {}).get("dtypes") or [None] * len(inputs)
        args = [self._tvm.runtime.tensor(np.ascontiguousarray(_cast(to_numpy(x), dt))) for x, dt in zip(inputs, dtypes)]
        return flatten(self._main(*args))


def _set_threads(n: int) -> None:
    """TVM sizes its pool from TVM_NUM_THREADS when first used; reconfigure it too if it already started."""
    import tvm_ffi

    os.environ["TVM_NUM_THREADS"] = str(n)
    config = tvm_ffi.get_global_func("runtime.config_threadpool", allow_missing=True)
    if config is not None:
        config(0, n)


def _cast(a: np.ndarray, dtype: str | None) -> np.ndarray:
    return a.astype(dtype, copy=False) if dtype and a.dtype != np.dtype(dtype) else a


SESSION_BACKENDS.register("tvm", TvmSession)
