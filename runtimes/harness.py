"""The device-side measurement harness: load an artifact, warm up, time N runs, report a `BenchResult`.

    res = bench(artifact_dir, runs=50, warmup=5)        # latency p50/p90/p99, peak RSS, load time, model bytes
    res = bench(decoder_artifact, decode_tokens=32)     # + time to first token and tokens/s for decoders

On a device (this is what the transports run):

    python -m edgetk.runtimes.harness ARTIFACT --runs N --json [--out result.json]

The file only imports `edgetk` by absolute name, so a transport may push it next to the artifact and run it
as a plain script with the device's Python (`python harness.py ARTIFACT ...`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SCHEMA = "edgetk.bench/1"


@dataclass
class BenchResult:
    artifact: str
    format: str
    runs: int
    warmup: int
    latencies_ms: list[float]
    load_s: float
    model_bytes: int
    peak_rss_mb: float | None
    arch: str = field(default_factory=platform.machine)
    host: str = field(default_factory=socket.gethostname)
    device: str = "local"              # transport spec the result came through
    profile: str | None = None         # device profile name
    timer: str = "perf_counter"        # or "time_evaluator" (TVM RPC: the device's own timer)
    gpu_peak_mb: float | None = None
    ttft_ms: float | None = None       # decoders: prefill + first token
    tokens_per_s: float | None = None  # decoders: decode throughput
    extra: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    def _q(self, q: float) -> float:
        return float(np.percentile(np.asarray(self.latencies_ms), q)) if self.latencies_ms else float("nan")

    @property
    def p50_ms(self) -> float:
        return self._q(50)

    @property
    def p90_ms(self) -> float:
        return self._q(90)

    @property
    def p99_ms(self) -> float:
        return self._q(99)

    @property
    def mean_ms(self) -> float:
        return float(np.mean(self.latencies_ms)) if self.latencies_ms else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(p50_ms=self.p50_ms, p90_ms=self.p90_ms, p99_ms=self.p99_ms, mean_ms=self.mean_ms)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BenchResult":
        from edgetk.errors import ArtifactError

        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ArtifactError(f"not an edgetk benchmark result (schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                                f"expected {SCHEMA!r})", hint="pass a JSON file written by `edgetk bench --json`")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise ArtifactError(f"benchmark result is incomplete: {exc}", hint="re-run the benchmark") from None


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / 2**20


def _gpu_peak_mb() -> float | None:
    """Peak CUDA memory of this process when torch has used the GPU (None otherwise)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _fill(shape: Sequence[int], dtype: str, vocab: int = 100, rng=None) -> np.ndarray:
    rng = rng or np.random.default_rng(0)
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        return rng.integers(1, vocab, size=tuple(shape)).astype(dt)
    if dt.kind == "b":
        return np.ones(tuple(shape), dtype=dt)
    return rng.standard_normal(tuple(shape)).astype(dt)


def _named(name: str, shape: Sequence[int], dtype: str) -> np.ndarray:
    """Plausible values by input role: positions count up, masks are ones, caches start empty."""
    n = name.lower()
    if "pos" in n and np.dtype(dtype).kind in "iu":
        return np.broadcast_to(np.arange(shape[-1] if shape else 1, dtype=dtype), tuple(shape)).copy()
    if "mask" in n:
        return np.ones(tuple(shape), dtype=dtype)
    if "cache" in n or "past" in n:
        return np.zeros(tuple(shape), dtype=dtype)
    return _fill(shape, dtype)


_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 3: "int8", 2: "uint8"}


def _onnx_specs(path: Path, seq_len: int) -> list[tuple[list[int], str, str]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    out = []
    for vi in m.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else (1 if i == 0 else seq_len) for i, d in enumerate(t.shape.dim)]
        out.append((dims, _ONNX_DTYPES.get(t.elem_type, "float32"), vi.name))
    return out


def example_inputs(art, seq_len: int = 16) -> list[np.ndarray]:
    """Inputs for one run: from the manifest's declared shapes, the model kind, or the ONNX graph."""
    from edgetk.errors import ArtifactError

    m = art.manifest
    spec = m.get("inputs") or {}
    if spec.get("shapes"):
        dtypes = spec.get("dtypes") or ["float32"] * len(spec["shapes"])
        names = spec.get("names") or [""] * len(spec["shapes"])
        return [_named(n, s, d) for n, s, d in zip(names, spec["shapes"], dtypes)]
    if m.get("format") == "eager" and m.get("model_kind") == "encoder":
        return [_fill((1, seq_len), "int64"), np.ones((1, seq_len), dtype=np.int64)]
    if m.get("format") == "eager":
        return [_fill((1, seq_len), "int64")]
    onnx_files = [f for f in m.get("files", {}) if f.endswith(".onnx")]
    if onnx_files:
        return [_named(n, s, d) for s, d, n in _onnx_specs(art.root / onnx_files[0], seq_len)]
    raise ArtifactError(f"artifact {art.root} declares no input shapes",
                        hint="write manifest['inputs'] = {'names': [...], 'shapes': [...], 'dtypes': [...]}")


def _decoder_figures(session, prompt_len: int, tokens: int) -> tuple[float, float]:
    """Time to first token and decode tokens/s of an eager decoder, with its KV cache. The model is warmed up
    first as `LLM.load` does (`llm.warm_up`): a layer's batch-1 kernel is compiled and packed on its first
    single-token call, which is load time, not decode time."""
    import torch

    from .llm import warm_up

    model = session.loaded.model
    prompt = torch.as_tensor(_fill((1, prompt_len), "int64"))
    warm_up(model)
    with torch.inference_mode():
        model.setup_cache(1, prompt_len + tokens + 1)
        t0 = time.perf_counter()
        logits = model(prompt, torch.arange(prompt_len))
        nxt = logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(tokens):
            logits = model(nxt, torch.tensor([prompt_len + i]))
            nxt = logits[:, -1:].argmax(-1)
        dt = time.perf_counter() - t1
    return ttft * 1e3, tokens / dt


def bench(artifact, runs: int = 20, warmup: int = 3, seq_len: int = 16, decode_tokens: int = 0,
          threads: int | None = None) -> BenchResult:
    """Measure an artifact in this process. `decode_tokens > 0` adds TTFT and tokens/s for decoders."""
    from edgetk.artifact import Artifact
    from edgetk.errors import ConfigError
    from edgetk.progress import track
    from edgetk.runtimes.session import Session

    if runs < 1 or warmup < 0:
        raise ConfigError(f"runs={runs}, warmup={warmup}: need runs >= 1 and warmup >= 0", hint="fix --runs/--warmup")
    if threads:
        import torch

        torch.set_num_threads(threads)
    art = artifact if isinstance(artifact, Artifact) else Artifact.load(artifact)
    t0 = time.perf_counter()
    sess = Session(art, **({"threads": threads} if threads else {}))
    inputs = example_inputs(art, seq_len)
    sess.run(inputs)  # first run completes loading (lazy initialisation counts as load time)
    load_s = time.perf_counter() - t0
    for _ in range(warmup):
        sess.run(inputs)
    lat = []
    for _ in track(range(runs), "benchmark runs"):
        t = time.perf_counter()
        sess.run(inputs)
        lat.append((time.perf_counter() - t) * 1e3)
    res = BenchResult(artifact=str(art.root), format=art.manifest.get("format", "?"), runs=runs, warmup=warmup,
                      latencies_ms=lat, load_s=load_s, model_bytes=art.total_bytes, peak_rss_mb=peak_rss_mb(),
                      profile=None)
    if decode_tokens and art.manifest.get("model_kind") == "decoder" and hasattr(sess, "loaded"):
        res.ttft_ms, res.tokens_per_s = _decoder_figures(sess, seq_len, decode_tokens)
        res.extra["decode_tokens"] = decode_tokens
    res.extra["seq_len"] = seq_len
    res.peak_rss_mb = peak_rss_mb()
    res.gpu_peak_mb = _gpu_peak_mb()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgetk.runtimes.harness", description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--out", help="also write the result JSON to this file (atomically)")
    a = p.parse_args(argv)
    try:
        res = bench(a.artifact, runs=a.runs, warmup=a.warmup, seq_len=a.seq_len, decode_tokens=a.decode_tokens,
                    threads=a.threads)
    except Exception as exc:  # the transport reads this line and re-raises a named error
        sys.stdout.write(json.dumps({"schema": SCHEMA, "error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 3
    text = json.dumps(res.to_dict(), sort_keys=True)
    if a.out:
        tmp = f"{a.out}.tmp{os.getpid()}"
        Path(tmp).write_text(text)
        os.replace(tmp, a.out)
    if a.json or not a.out:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
