"""`edgetk run` and `edgetk chat` end to end on a tiny HF-style model directory (real loader, real tokenizer)."""
from __future__ import annotations

import io
import json

import pytest

from edgetk.cli.app import main


@pytest.fixture
def tiny_dir(tmp_path, tiny_lm):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_lm.model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(tiny_lm.config.to_hf()))
    (tmp_path / "tokenizer.json").write_text(tiny_lm.tokenizer.json_text)
    return tmp_path


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_run_json_and_speculative_identical(tiny_dir, capsys):
    main(["run", str(tiny_dir), "--prompt", "hello there", "-n", "12", "--max-seq-len", "128", "--json"])
    plain = _json_lines(capsys.readouterr().out)[0]
    main(["run", str(tiny_dir), "--prompt", "hello there", "-n", "12", "--max-seq-len", "128", "--json",
          "--speculative", "recycling", "--kv-preset", "kv4-block"])
    spec = _json_lines(capsys.readouterr().out)[0]
    assert len(plain["token_ids"]) == 12 and plain["metrics"]["decode_tok_s"] > 0
    assert spec["metrics"]["speculative"] == "recycling" and spec["metrics"]["kv_bits"] == 4
    assert plain["stop_reason"] == "length"


def test_run_streams_text_and_reports_bad_input(tiny_dir, capsys):
    main(["run", str(tiny_dir), "--prompt", "hello", "-n", "6", "--max-seq-len", "64"])
    assert capsys.readouterr().out.strip()  # streamed text on stdout
    with pytest.raises(SystemExit) as e:
        main(["run", str(tiny_dir), "--prompt", "", "-n", "6", "--max-seq-len", "64"])
    assert e.value.code == 8  # DataError: empty prompt
    with pytest.raises(SystemExit) as e:
        main(["run", str(tiny_dir), "--prompt", "hi", "--kv-bits", "4", "--kv-preset", "kv4", "--max-seq-len", "64"])
    assert e.value.code == 2


def test_chat_reads_stdin_non_interactively(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nhow are you?\n/exit\nnever read\n"))
    main(["chat", str(tiny_dir), "-n", "8", "--max-seq-len", "256", "--json"])
    replies = _json_lines(capsys.readouterr().out)
    assert [r["user"] for r in replies] == ["hello", "how are you?"]
    assert all(r["metrics"]["new_tokens"] >= 1 for r in replies)
