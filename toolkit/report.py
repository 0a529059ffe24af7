"""Reports render data: benchmark results (and size/quality points) as versioned JSON, a markdown table,
PNG plots (latency distribution; size vs quality across recipes) and one self-contained HTML page.

    rep = Report.from_results([res_local, res_rpc], title="smollm2 vq2 on rpi5")
    rep.write(out_dir)          # report.json, report.md, latency.png, size_quality.png, report.html

`load_results(paths)` reads past results (bench JSON, JSON lines from `edgetk bench --json`, or report.json)
so `edgetk report` can put them side by side. matplotlib is the `report` extra.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifact import atomic_write_text
from .errors import ArtifactError, require

SCHEMA = "edgetk.report/1"
BENCH_SCHEMA = "edgetk.bench/1"
COLUMNS = [("device", "device"), ("profile", "profile"), ("artifact", "artifact"), ("format", "format"),
           ("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"), ("p99 ms", "p99_ms"), ("load s", "load_s"),
           ("peak RSS MiB", "peak_rss_mb"), ("model MB", "model_mb"), ("TTFT ms", "ttft_ms"),
           ("tok/s", "tokens_per_s"), ("timer", "timer")]


def _row(r: dict[str, Any]) -> dict[str, Any]:
    out = dict(r)
    out["artifact"] = Path(str(r.get("artifact", ""))).name
    out["model_mb"] = r.get("model_bytes", 0) / 1e6 if r.get("model_bytes") is not None else None
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@dataclass
class Report:
    title: str
    results: list[dict[str, Any]] = field(default_factory=list)
    quality: list[dict[str, Any]] = field(default_factory=list)   # {"label", "bytes", "metric", "value"}
    stages: list[dict[str, Any]] = field(default_factory=list)    # deploy stages: {"name", "status", ...}
    notes: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    schema: str = SCHEMA

    @classmethod
    def from_results(cls, results: list, title: str = "edgetk benchmark", **kw: Any) -> "Report":
        return cls(title=title, results=[r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in results], **kw)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "title": self.title, "created": self.created, "results": self.results,
                "quality": self.quality, "stages": self.stages, "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Report":
        if d.get("schema") != SCHEMA:
            raise ArtifactError(f"report schema {d.get('schema')!r} is not {SCHEMA!r}", hint="re-create the report")
        return cls(**{k: d[k] for k in ("title", "results", "quality", "stages", "notes", "created") if k in d})

    # -- renderings ---------------------------------------------------------------------------------
    def markdown(self) -> str:
        lines = [f"# {self.title}", "", f"_{self.created}, schema {self.schema}_", ""]
        if self.stages:
            lines += ["| stage | status | seconds | detail |", "|---|---|---|---|"]
            lines += [f"| {s.get('name')} | {s.get('status')} | {_fmt(s.get('seconds'))} | {s.get('detail', '')} |"
                      for s in self.stages] + [""]
        if self.results:
            lines += ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
            lines += ["| " + " | ".join(_fmt(_row(r).get(k)) for _, k in COLUMNS) + " |" for r in self.results]
        if self.quality:
            lines += ["", "| recipe | bytes | metric | value |", "|---|---|---|---|"]
            lines += [f"| {q.get('label')} | {q.get('bytes')} | {q.get('metric')} | {_fmt(q.get('value'))} |"
                      for q in self.quality]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def plots(self) -> dict[str, bytes]:
        out = {}
        if self.results:
            out["latency.png"] = latency_plot(self.results)
        if self.quality:
            out["size_quality.png"] = size_quality_plot(self.quality)
        return out

    def html(self, plots: dict[str, bytes] | None = None) -> str:
        plots = self.plots() if plots is None else plots
        imgs = "".join(f'<figure><img alt="{html.escape(n)}" src="data:image/png;base64,'
                       f'{base64.b64encode(b).decode()}"><figcaption>{html.escape(n)}</figcaption></figure>'
                       for n, b in plots.items())
        return _HTML.format(title=html.escape(self.title), created=html.escape(self.created),
                            schema=html.escape(self.schema), stages="<h2>Stages</h2>" + _html_table(
                                ["stage", "status", "seconds", "detail"],
                                [[s.get("name"), s.get("status"), s.get("seconds"), s.get("detail", "")]
                                 for s in self.stages]) if self.stages else "",
                            results=_html_table([c for c, _ in COLUMNS],
                                                [[_row(r).get(k) for _, k in COLUMNS] for r in self.results]),
                            quality="<h2>Size and quality</h2>" + _html_table(["recipe", "bytes", "metric", "value"],
                                                [[q.get("label"), q.get("bytes"), q.get("metric"), q.get("value")]
                                                 for q in self.quality]) if self.quality else "",
                            notes="".join(f"<li>{html.escape(n)}</li>" for n in self.notes), plots=imgs)

    def write(self, out: str | os.PathLike) -> dict[str, Path]:
        """report.json, report.md, the PNGs and report.html (self-contained) under `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        plots = self.plots()
        paths = {"json": out / "report.json", "markdown": out / "report.md", "html": out / "report.html"}
        atomic_write_text(paths["json"], json.dumps(self.to_dict(), indent=1, sort_keys=True))
        atomic_write_text(paths["markdown"], self.markdown())
        for name, data in plots.items():
            tmp = out / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, out / name)
            paths[name] = out / name
        atomic_write_text(paths["html"], self.html(plots))
        return paths


def _html_table(cols: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}th{{background:#eee}}
figure{{display:inline-block;margin:0 1em}}img{{max-width:560px}}</style></head>
<body><h1>{title}</h1><p>{created} · schema {schema}</p>
{stages}<h2>Measurements</h2>{results}{quality}
<div>{plots}</div><ul>{notes}</ul></body></html>
"""


def _pyplot():
    mpl = require("matplotlib", "report")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def latency_plot(results: list[dict[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(results) + 1.8))
    labels = [f"{Path(str(r.get('artifact'))).name} @ {r.get('device')}" for r in results]
    data = [r.get("latencies_ms") or [float("nan")] for r in results]
    try:  # matplotlib >= 3.10
        ax.boxplot(data, orientation="horizontal", showfliers=True)
    except TypeError:
        ax.boxplot(data, vert=False, showfliers=True)
    ax.set_yticks(range(1, len(labels) + 1), labels)
    flat = [x for r in results for x in (r.get("latencies_ms") or []) if x and x > 0]
    if flat and max(flat) / min(flat) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("latency per run (ms)")
    ax.set_title("latency distribution")
    return _png(fig)


def size_quality_plot(points: list[dict[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for p in points:
        ax.scatter(p["bytes"] / 1e6, p["value"])
        ax.annotate(str(p.get("label")), (p["bytes"] / 1e6, p["value"]), textcoords="offset points", xytext=(4, 4))
    metric = points[0].get("metric", "quality")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(metric)
    ax.set_title(f"size vs {metric}")
    return _png(fig)


def load_results(paths: list[str | os.PathLike]) -> Report:
    """Merge past results: bench JSON, JSON lines (`edgetk bench --json`), report.json files or run dirs."""
    merged = Report(title="edgetk results side by side")
    for p in map(Path, paths):
        if p.is_dir():
            p = p / "report" / "report.json" if (p / "report" / "report.json").is_file() else p / "report.json"
        try:
            text = p.read_text()
        except OSError as exc:
            raise ArtifactError(f"cannot read results {p}: {exc}", hint="pass JSON files written by edgetk bench/deploy")
        for obj in _json_objects(text, p):
            if obj.get("schema") == SCHEMA:
                rep = Report.from_dict(obj)
                merged.results += rep.results
                merged.quality += rep.quality
            elif obj.get("schema") == BENCH_SCHEMA and "latencies_ms" in obj:
                merged.results.append(obj)
            else:
                raise ArtifactError(f"{p} holds JSON with schema {obj.get('schema')!r}, not an edgetk result",
                                    hint=f"expected {SCHEMA} or {BENCH_SCHEMA}")
    return merged


def _json_objects(text: str, p: Path) -> list[dict[str, Any]]:
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, list) else [obj]
    except json.JSONDecodeError:
        pass
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{p}:{i} is not JSON ({exc.msg})", hint="the file is corrupt or truncated") from None
    return out
