"""The CLI commands (devices, compile, bench, report, deploy) and deploy's stages, resume and "not built yet"."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgetk.cli.app import app

runner = CliRunner()


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_devices_cli():
    r = runner.invoke(app, ["devices", "list", "--json"])
    assert r.exit_code == 0, r.output
    names = {d["name"] for d in _json_lines(r.stdout)}
    assert {"rpi5", "jetson-orin-nano", "snapdragon-8gen3"} <= names
    r = runner.invoke(app, ["devices", "show", "jetson-orin-nano", "--json"])
    assert _json_lines(r.stdout)[0]["gpu"]["arch"] == "sm_87"
    r = runner.invoke(app, ["devices", "detect", "--json"])
    assert _json_lines(r.stdout)[0]["threads"] >= 1


def test_cli_bad_target_exit_code():
    from edgetk.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["devices", "show", "pi9"])
    assert e.value.code == 2


@pytest.mark.backend
def test_bench_and_report_cli(onnx_mlp, tmp_path):
    r = runner.invoke(app, ["bench", str(onnx_mlp), "--device", "local", "--runs", "3", "--json",
                            "-o", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    res = _json_lines(r.stdout)[0]
    assert res["runs"] == 3 and res["p50_ms"] > 0
    r = runner.invoke(app, ["report", str(tmp_path / "b.json"), "-o", str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.html").stat().st_size > 1000


@pytest.mark.backend
def test_compile_cli_npu(onnx_mlp, tmp_path):
    r = runner.invoke(app, ["compile", str(onnx_mlp), "--target", "snapdragon-8gen3", "-o", str(tmp_path / "n"),
                            "--json"])
    assert r.exit_code == 0, r.output
    data = _json_lines(r.stdout)[0]
    assert data["kind"] == "npu" and data["placement"]["cpu_fallback_ops"] == {"Erf": 1}


def test_deploy_not_built_yet_is_reported_not_faked(tmp_path, monkeypatch):
    from edgetk import compress
    from edgetk.deploy import DeployConfig, deploy

    monkeypatch.setattr(compress, "METHOD_MODULES", [*compress.METHOD_MODULES, "edgetk.compress.not_here"])
    cfg = DeployConfig(model="tiny", recipe="future-recipe", target="host-x86", format="onnx")
    run = deploy(cfg, tmp_path / "run")
    st = {s.name: s for s in run.stages}
    assert st["compress"].status == "not built yet" and "edgetk.compress.not_here" in st["compress"].detail
    assert [st[n].status for n in ("export", "compile", "bench")] == ["skipped"] * 3
    assert st["report"].status == "done" and not (tmp_path / "run" / "stages" / "compress.json").exists()
    assert "not built yet" in (tmp_path / "run" / "report" / "report.md").read_text()
    with pytest.raises(Exception, match="another config"):
        deploy(cfg.replace(target="rpi5"), tmp_path / "run")


@pytest.mark.backend
def test_deploy_chain_and_resume(tiny_decoder_art, tmp_path):
    out = tmp_path / "run"
    args = ["deploy", str(tiny_decoder_art), "--recipe", "none", "--target", "host-x86", "--device", "local",
            "--format", "onnx", "--runs", "3", "-o", str(out), "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    first = {s["name"]: s["status"] for s in _json_lines(r.stdout)[-1]["stages"]}
    assert first == {"compress": "skipped", "export": "done", "compile": "done", "bench": "done", "report": "done"}
    bench = json.loads((out / "bench.json").read_text())
    assert bench["runs"] == 3 and bench["format"] == "onnx"
    assert (out / "report" / "report.html").is_file()
    (out / "stages" / "bench.json").unlink()  # as if the run had stopped during bench
    r = runner.invoke(app, args)
    again = {s["name"]: s["status"] for s in _json_lines(r.stdout)[-1]["stages"]}
    assert again == {"compress": "resumed", "export": "resumed", "compile": "resumed", "bench": "done",
                     "report": "done"}
