"""The CLI contract: exit codes, one JSON object per line with --json, one-line errors with hints."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgetk.cli.app", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("models", "eval"):
        assert cmd in r.stdout


def test_unknown_model_is_one_line_error_with_hint():
    r = run("eval", "no-such-model", "--json")
    assert r.returncode == 7
    assert "error: unknown model 'no-such-model'" in r.stderr and "hint:" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_debug_shows_traceback():
    r = run("--debug", "eval", "no-such-model")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bad_text_file_exit_code(tmp_path):
    r = run("eval", "smollm2-135m", "--text", str(tmp_path / "missing.txt"))
    assert r.returncode in (7, 8)


def test_models_list_json():
    r = run("models", "list", "--json")
    assert r.returncode == 0
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert {row["name"] for row in rows} >= {"smollm2-135m", "minilm-l6"}


@pytest.mark.slow
def test_eval_json_contract(smollm2):
    r = run("eval", "smollm2-135m", "--text", "eval", "--max-windows", "2", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["windows"] == 2 and obj["perplexity"] > 1


@pytest.mark.slow
def test_models_info_json(minilm):
    r = run("models", "info", "minilm-l6", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["kind"] == "encoder" and obj["parameters"] > 20_000_000


def test_usage_errors_exit_2():
    r = run("models", "list", "unexpected-extra")
    assert r.returncode == 2 and "unexpected extra argument" in r.stderr and "internal error" not in r.stderr
    r = run("eval", "--max-windows", "abc")
    assert r.returncode == 2 and "internal error" not in r.stderr
