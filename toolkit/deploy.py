"""`deploy`: compress → export → compile → bench → report, one stage after another, resumable.

    run = deploy(DeployConfig(model="smollm2-135m", recipe="vq2", target="rpi5", device="qemu"), "runs/pi")

Each finished stage writes a marker `RUN_DIR/stages/<stage>.json` (atomically) naming its output; a rerun
with the same config skips finished stages ("resumed") and continues after the last one. A stage whose
implementation is not in the tree (e.g. `edgetk.compress.vq` or an exporter module) is reported as
"not built yet" and the chain stops there rather than faking its output.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifact import atomic_write_text
from .config import Config, check, config
from .errors import ConfigError

log = logging.getLogger(__name__)
STAGES = ("compress", "export", "compile", "bench", "report")
# profile.compile -> export format used when --format is not given
DEFAULT_FORMAT = {"host": "onnx", "npu": "onnx", "tvm-aarch64": "tvm", "tvm-cuda": "tvm", "tvm-macos": "tvm"}


@config("deploy", version=1)
@dataclass(frozen=True)
class DeployConfig(Config):
    model: str = "smollm2-135m"
    recipe: str = "vq2"
    target: str = "host-x86"
    device: str = "local"
    format: str | None = None
    runs: int = 10

    def validate(self) -> None:
        check(self.runs >= 1, "runs", self.runs, "an integer >= 1")
        check(bool(self.model), "model", self.model, "a model name or path")

    def default_run_dir(self) -> Path:
        """Where a run goes when no directory is given: runs/MODEL-RECIPE-TARGET."""
        return Path("runs") / f"{Path(self.model.rstrip('/')).name}-{self.recipe or 'none'}-{self.target}"


@dataclass
class StageResult:
    name: str
    status: str            # done | resumed | skipped | not built yet
    seconds: float = 0.0
    output: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DeployRun:
    root: Path
    config: DeployConfig
    stages: list[StageResult] = field(default_factory=list)
    report: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.root), "config": self.config.to_dict(),
                "stages": [s.to_dict() for s in self.stages], "report": self.report}


class NotBuilt(Exception):
    """A stage's implementation is not in the tree yet."""


def _missing(*modules: str) -> list[str]:
    out = []
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except ModuleNotFoundError:
            out.append(m)
    return out


# -- stages: each takes (cfg, run_dir, outputs so far) and returns (output path, detail) ---------------------
def stage_compress(cfg: DeployConfig, root: Path, prev: dict[str, str]) -> tuple[str | None, str]:
    if cfg.recipe in ("none", ""):
        raise _Skip("no recipe")
    from . import compress as C

    try:
        C.resolve_recipe(cfg.recipe)
    except ConfigError:
        gone = _missing(*C.METHOD_MODULES)
        if gone:
            raise NotBuilt(f"recipe {cfg.recipe!r} is unknown and {', '.join(gone)} are not built yet") from None
        raise
    from .compressed import save
    from .models import load

    loaded = load(cfg.model)
    reports = C.compress(loaded, cfg.recipe)
    art = save(loaded, root / "compressed", reports)
    return str(art.root), f"{art.total_bytes / 1e6:.1f} MB"


def stage_export(cfg: DeployConfig, root: Path, prev: dict[str, str]) -> tuple[str | None, str]:
    from edgetk.devices.profile import load_profile

    prof = load_profile(cfg.target)
    fmt = cfg.format or DEFAULT_FORMAT.get(prof.compile, "onnx")
    gone = _missing("edgetk.exporters", f"edgetk.exporters.{fmt}")
    if gone:
        raise NotBuilt(f"exporter {fmt!r} is not built yet ({', '.join(gone)})")
    from edgetk.exporters import export

    src = prev.get("compress") or cfg.model
    art = export(src, None, format=fmt, target=prof if fmt == "tvm" else None, out=root / f"export-{fmt}")
    par = art.manifest.get("parity", {})
    return str(art.root), f"{fmt}, {art.total_bytes / 1e6:.1f} MB, parity max_abs {par.get('max_abs', '?')}"


def stage_compile(cfg: DeployConfig, root: Path, prev: dict[str, str]) -> tuple[str | None, str]:
    if not prev.get("export"):
        raise NotBuilt("nothing to compile: the export stage did not run")
    from edgetk.devices.compile import compile_artifact

    art = compile_artifact(prev["export"], cfg.target, root / "compiled")
    return str(art.root), f"{art.kind}, {art.total_bytes / 1e6:.1f} MB"


def stage_bench(cfg: DeployConfig, root: Path, prev: dict[str, str]) -> tuple[str | None, str]:
    if not prev.get("compile"):
        raise NotBuilt("nothing to benchmark: the compile stage did not run")
    from edgetk.devices.profile import load_profile
    from edgetk.devices.transports import BenchOptions, open_transport

    res = open_transport(cfg.device, load_profile(cfg.target)).bench(prev["compile"], BenchOptions(runs=cfg.runs))
    path = root / "bench.json"
    atomic_write_text(path, json.dumps(res.to_dict(), sort_keys=True))
    return str(path), f"p50 {res.p50_ms:.3g} ms on {res.device}"


def stage_report(cfg: DeployConfig, root: Path, prev: dict[str, str], stages: list[StageResult] = ()
                 ) -> tuple[str | None, str]:
    from .report import Report

    results = [json.loads(Path(prev["bench"]).read_text())] if prev.get("bench") else []
    rep = Report.from_results(results, title=f"deploy {cfg.model} ({cfg.recipe}) → {cfg.target} @ {cfg.device}",
                              stages=[s.to_dict() for s in stages])
    rep.quality = _quality(prev)
    paths = rep.write(root / "report")
    return str(paths["html"]), "report.html, report.md, report.json"


def _quality(prev: dict[str, str]) -> list[dict[str, Any]]:
    points = []
    for stage in ("compress", "export"):
        p = prev.get(stage)
        if not p or not (Path(p) / "manifest.json").is_file():
            continue
        m = json.loads((Path(p) / "manifest.json").read_text())
        size = sum(f["bytes"] for f in m.get("files", {}).values())
        for metric in ("perplexity", "cosine", "top1_agreement"):
            if isinstance(m.get(metric), (int, float)):
                points.append({"label": f"{stage}", "bytes": size, "metric": metric, "value": m[metric]})
    return points


class _Skip(Exception):
    pass


STAGE_FUNCS: dict[str, Callable[..., tuple[str | None, str]]] = {
    "compress": stage_compress, "export": stage_export, "compile": stage_compile, "bench": stage_bench,
    "report": stage_report}


def _marker(root: Path, name: str) -> Path:
    return root / "stages" / f"{name}.json"


def _check_config(root: Path, cfg: DeployConfig) -> None:
    p = root / "deploy.json"
    if p.is_file():
        old = json.loads(p.read_text())
        if old != cfg.to_dict():
            raise ConfigError(f"{root} holds a run with another config ({old})",
                              hint="use a new --out directory, or rerun with the same arguments to resume")
    else:
        atomic_write_text(p, json.dumps(cfg.to_dict(), sort_keys=True))


def deploy(cfg: DeployConfig, out, on_stage: Callable[[StageResult], None] | None = None) -> DeployRun:
    from .progress import task

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _check_config(root, cfg)
    run = DeployRun(root, cfg)
    outputs: dict[str, str] = {}
    stopped = None
    for name in STAGES:
        mk = _marker(root, name)
        if mk.is_file() and name != "report":
            st = StageResult(**{**json.loads(mk.read_text()), "status": "resumed"})
        elif stopped and name != "report":
            st = StageResult(name, "skipped", detail=f"after {stopped}")
        else:
            st = _run_stage(name, cfg, root, outputs, run.stages, task)
        if st.output:
            outputs[name] = st.output
        if st.status == "not built yet":
            stopped = name
        run.stages.append(st)
        if on_stage:
            on_stage(st)
    run.report = outputs.get("report")
    return run


def _run_stage(name: str, cfg: DeployConfig, root: Path, outputs: dict[str, str], stages: list, task) -> StageResult:
    t0 = time.perf_counter()
    fn = STAGE_FUNCS[name]
    try:
        with task(f"deploy: {name}"):
            args = (cfg, root, outputs, stages) if name == "report" else (cfg, root, outputs)
            output, detail = fn(*args)
    except _Skip as s:
        st = StageResult(name, "skipped", detail=str(s))
        atomic_write_text(_marker(root, name), json.dumps({**st.to_dict(), "status": "done"}))
        return st
    except NotBuilt as nb:
        return StageResult(name, "not built yet", detail=str(nb))
    st = StageResult(name, "done", round(time.perf_counter() - t0, 3), output, detail)
    if name != "report":
        atomic_write_text(_marker(root, name), json.dumps(st.to_dict()))
    return st
