"""Harness results, reports (JSON / markdown / PNG / HTML) and the HTML page in headless Chromium."""
from __future__ import annotations

import json
import subprocess

import pytest

from edgetk.runtimes.harness import SCHEMA, BenchResult, bench


def _result(name: str, lat: list[float], device: str = "local") -> BenchResult:
    return BenchResult(artifact=f"/x/{name}", format="onnx", runs=len(lat), warmup=1, latencies_ms=lat, load_s=0.1,
                       model_bytes=123456, peak_rss_mb=50.0, device=device)


def test_bench_result_percentiles_and_roundtrip():
    r = _result("a", [float(i) for i in range(1, 101)])
    assert (r.p50_ms, round(r.p90_ms, 2), round(r.p99_ms, 2)) == (50.5, 90.1, 99.01)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["schema"] == SCHEMA and BenchResult.from_dict(d) == r
    from edgetk.errors import ArtifactError

    with pytest.raises(ArtifactError, match="not an edgetk benchmark result"):
        BenchResult.from_dict({"schema": "other"})


def test_harness_decoder_ttft_and_tokens_per_s(tiny_decoder_art):
    res = bench(tiny_decoder_art, runs=2, warmup=1, seq_len=8, decode_tokens=4)
    assert len(res.latencies_ms) == 2 and res.load_s > 0 and res.model_bytes > 0 and res.peak_rss_mb > 10
    assert res.ttft_ms > 0 and res.tokens_per_s > 0 and res.format == "eager"


def test_harness_cli_reports_errors_as_json(tmp_path):
    import sys

    p = subprocess.run([sys.executable, "-m", "edgetk.runtimes.harness", str(tmp_path), "--runs", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 3
    assert "not an edgetk artifact" in json.loads(p.stdout)["error"]


def test_report_files_and_headless_chromium(tmp_path):
    from edgetk.devices.toolchains import require_tool
    from edgetk.report import Report, load_results

    a, b = _result("vq2", [1.0, 1.2, 1.1, 1.5]), _result("fp32", [3.0, 3.3, 2.9, 3.1], "ssh://pi@h:22")
    (tmp_path / "a.json").write_text(json.dumps(a.to_dict()))
    (tmp_path / "b.jsonl").write_text(json.dumps(b.to_dict()) + "\n")
    rep = load_results([tmp_path / "a.json", tmp_path / "b.jsonl"])
    rep.quality = [{"label": "fp32", "bytes": 5e8, "metric": "perplexity", "value": 27.1},
                   {"label": "vq2", "bytes": 5e7, "metric": "perplexity", "value": 34.0}]
    rep.stages = [{"name": "compress", "status": "done", "seconds": 1.0, "detail": ""}]
    paths = rep.write(tmp_path / "out")
    assert json.loads(paths["json"].read_text())["schema"] == "edgetk.report/1"
    md = paths["markdown"].read_text()
    assert "| ssh://pi@h:22 |" in md and "| vq2 |" in md
    for png in ("latency.png", "size_quality.png"):
        assert paths[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2 and "src=\"http" not in page  # self-contained
    assert Report.from_dict(json.loads(paths["json"].read_text())).results[1]["device"] == "ssh://pi@h:22"
    chromium = require_tool("chromium")
    shot = tmp_path / "shot.png"
    p = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1200,1400", f"--screenshot={shot}",
                        paths["html"].as_uri()], capture_output=True, text=True, timeout=90)
    assert p.returncode == 0, p.stderr[-500:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_load_results_rejects_foreign_json(tmp_path):
    from edgetk.errors import ArtifactError
    from edgetk.report import load_results

    (tmp_path / "x.json").write_text('{"schema": "something/1"}')
    with pytest.raises(ArtifactError, match="not an edgetk result"):
        load_results([tmp_path / "x.json"])
    (tmp_path / "y.json").write_text('{"schema": "edgetk.bench/1", "latencies_ms": [1]}\n{trunc')
    with pytest.raises(ArtifactError, match="y.json:2 is not JSON"):
        load_results([tmp_path / "y.json"])
