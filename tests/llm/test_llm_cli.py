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


def test_run_lut_option_picks_the_codebook_kernel(tmp_path, tiny_lm, capsys, monkeypatch):
    """--lut q8 runs the VQ layers of a (vq2-r16 format) artifact through the int8-LUT GEMV, scoped to the command;
    a bad name is a usage error."""
    import torch

    from edgetk.compress import compress
    from edgetk.compress.vq import VQConfig
    from edgetk.compressed import save
    from edgetk.kernels import llvm_codebook as lk

    monkeypatch.delenv("EDGETK_LUT", raising=False)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    reports = compress(tiny_lm, VQConfig(vec_len=4, codebook_size=16, stages=2, kmeans_iters=3, refine_rounds=1,
                                         cg_iters=2, calib_samples=4), calib=calib)
    art = save(tiny_lm, tmp_path / "vq", reports, recipe="tiny-r16")
    args = ["run", str(art.root), "--prompt", "hello there", "-n", "8", "--max-seq-len", "64", "--json"]
    q8 = lk.lut_kernel("q8")
    calls, real = [], q8.gemv
    spy = lambda p, x, n=None, lead=(): calls.append(p.spec) or real(p, x, n, lead)  # noqa: E731 - counts, runs it
    monkeypatch.setattr(q8, "gemv", spy)
    main(args + ["--lut", "none"])
    exact = _json_lines(capsys.readouterr().out)[0]
    assert not calls
    main(args + ["--lut", "q8"])
    fast = _json_lines(capsys.readouterr().out)[0]
    if lk.lut_available("q8"):  # x86 AVX2 / AVX-512 VBMI, aarch64: every decode step's VQ layers, 4-bit nibbles
        assert len(calls) >= 7 * 2 * 7 and all(s.nibbles and s.stages == 2 for s in calls)
    assert len(fast["token_ids"]) == len(exact["token_ids"]) == 8
    import os

    assert "EDGETK_LUT" not in os.environ  # scoped to the command
    with pytest.raises(SystemExit) as e:
        main(args + ["--lut", "q4"])
    assert e.value.code == 2


def test_run_prefill_option_picks_the_prefill_path(tmp_path, tiny_lm, capsys, monkeypatch):
    """--prefill lut / dense run the prompt's VQ layers through that float32 path (same tokens: both ~1e-6 from the
    reference), int8 through the int8 GEMM, scoped to the command; a bad mode is a usage error."""
    import os

    import torch

    from edgetk.compress import compress
    from edgetk.compress.vq import VQConfig
    from edgetk.compressed import save
    from edgetk.kernels import llvm_codebook as lk

    monkeypatch.delenv("EDGETK_PREFILL", raising=False)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    reports = compress(tiny_lm, VQConfig(vec_len=4, codebook_size=16, kmeans_iters=3, refine_rounds=1, cg_iters=2,
                                         calib_samples=4), calib=calib)
    art = save(tiny_lm, tmp_path / "vq", reports, recipe="tiny-vq")
    args = ["run", str(art.root), "--prompt", "hello there, how are you", "-n", "6", "--max-seq-len", "64", "--json"]
    dq = lk.dequant_module()
    dense_calls, lut_calls, real_dense, real_lut = [], [], dq.gemm, lk.gemm
    monkeypatch.setattr(dq, "gemm", lambda p, x, n=None: dense_calls.append(x.shape) or real_dense(p, x, n))
    monkeypatch.setattr(lk, "gemm", lambda p, x, n=None: lut_calls.append(x.shape) or real_lut(p, x, n))
    main(args + ["--prefill", "lut"])
    via_lut = _json_lines(capsys.readouterr().out)[0]
    assert lut_calls and not dense_calls
    lut_calls.clear()
    main(args + ["--prefill", "dense"])
    via_dense = _json_lines(capsys.readouterr().out)[0]
    assert dense_calls and not lut_calls and all(s[0] > 1 for s in dense_calls)
    assert via_dense["token_ids"] == via_lut["token_ids"]
    m8 = lk.int8_module()
    int8_calls, real_int8 = [], m8.gemm
    monkeypatch.setattr(m8, "gemm", lambda p, x, n=None: int8_calls.append(x.shape) or real_int8(p, x, n))
    monkeypatch.setattr(m8, "host_ok", lambda: True)  # the plain-IR form where the host has no int8 multiply-add
    dense_calls.clear()
    main(args + ["--prefill", "int8"])
    via_int8 = _json_lines(capsys.readouterr().out)[0]
    assert int8_calls and not dense_calls and all(s[0] > 1 for s in int8_calls)
    assert len(via_int8["token_ids"]) == len(via_lut["token_ids"])
    assert "EDGETK_PREFILL" not in os.environ  # scoped to the command
    with pytest.raises(SystemExit) as e:
        main(args + ["--prefill", "int4"])
    assert e.value.code == 2


def test_eval_prefill_option_measures_the_int8_path(tmp_path, tiny_lm, capsys, monkeypatch):
    """`edgetk eval ARTIFACT --prefill int8` scores the windows through the int8 GEMM (a perplexity near the float32
    path's, not equal to it); a bad mode is a usage error."""
    import torch

    from edgetk.compress import compress
    from edgetk.compress.vq import VQConfig
    from edgetk.compressed import save
    from edgetk.kernels import llvm_codebook as lk

    monkeypatch.delenv("EDGETK_PREFILL", raising=False)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    reports = compress(tiny_lm, VQConfig(vec_len=4, codebook_size=16, kmeans_iters=3, refine_rounds=1, cg_iters=2,
                                         calib_samples=4), calib=calib)
    art = save(tiny_lm, tmp_path / "vq", reports, recipe="tiny-vq")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and looked at the dog. " * 40)
    args = ["eval", str(art.root), "--text", str(text), "--window", "64", "--max-windows", "3", "--json"]
    m8 = lk.int8_module()
    calls, real = [], m8.gemm
    monkeypatch.setattr(m8, "gemm", lambda p, x, n=None: calls.append(x.shape) or real(p, x, n))
    monkeypatch.setattr(m8, "host_ok", lambda: True)
    main(args + ["--prefill", "lut"])
    ppl_lut = _json_lines(capsys.readouterr().out)[0]["perplexity"]
    assert not calls
    main(args + ["--prefill", "int8"])
    ppl_int8 = _json_lines(capsys.readouterr().out)[0]["perplexity"]
    assert calls and ppl_int8 != ppl_lut and abs(ppl_int8 / ppl_lut - 1) < 0.05
    with pytest.raises(SystemExit) as e:
        main(args + ["--prefill", "int4"])
    assert e.value.code == 2
