"""Text data and quality measurements."""
from __future__ import annotations

import json
import math

import pytest
import torch

from edgetk import data
from edgetk.errors import DataError
from edgetk.eval import cosine_similarity, perplexity, snr_db, top1_agreement


class _CharTok:
    def encode(self, text):
        return [ord(c) % 256 for c in text]


def test_load_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert data.load_text(tmp_path / "a.txt") == "hello world"
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert data.load_text(tmp_path / "b.jsonl") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"text": 1}\n')
    with pytest.raises(DataError, match="c.jsonl:1"):
        data.load_text(tmp_path / "c.jsonl")
    (tmp_path / "d.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        data.load_text(tmp_path / "d.txt")
    with pytest.raises(DataError, match="does not exist"):
        data.load_text(tmp_path / "nope.txt")


def test_token_windows_and_calibration():
    tok = _CharTok()
    w = data.token_windows(tok, "x" * 1100, window=512)
    assert w.shape == (2, 512)
    assert data.token_windows(tok, "x" * 1100, 512, max_windows=1).shape == (1, 512)
    with pytest.raises(DataError, match="fewer than one window"):
        data.token_windows(tok, "short", 512)
    c1 = data.calibration_windows(tok, 4, 32, seed=1, text="abcdefghij" * 20)
    c2 = data.calibration_windows(tok, 4, 32, seed=1, text="abcdefghij" * 20)
    assert c1.shape == (4, 32) and torch.equal(c1, c2)
    with pytest.raises(DataError, match="calibration text"):
        data.calibration_windows(tok, 4, 512, text="tiny")


def test_clean_wiki_markup():
    raw = "'''Anarchism''' is a [[political philosophy|philosophy]]{{cite|x}}.<ref>r</ref> [[Category:Foo]]"
    assert data.clean_wiki(raw) == "Anarchism is a philosophy."


def test_perplexity_of_uniform_model_is_vocab_size():
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 50)

    r = perplexity(Uniform(), torch.randint(0, 50, (3, 16)))
    assert r.windows == 3 and r.tokens_scored == 45 and math.isclose(r.perplexity, 50, rel_tol=1e-5)
    half = perplexity(Uniform(), torch.randint(0, 50, (3, 16)), scoring="second-half")
    assert half.tokens_scored == 3 * 8
    with pytest.raises(DataError, match="scoring"):
        perplexity(Uniform(), torch.zeros(1, 4, dtype=torch.long), scoring="bogus")


def test_top1_and_similarity(tiny_llama):
    w = torch.randint(0, 256, (2, 16))
    assert top1_agreement(tiny_llama, tiny_llama, w) == 1.0
    a = torch.randn(5, 8)
    s = cosine_similarity(a, a)
    assert math.isclose(s["mean_cosine"], 1.0, rel_tol=1e-6) and s["sentences"] == 5
    assert snr_db(a, a + 0.01 * torch.randn(5, 8)) > 30


@pytest.mark.slow
def test_real_texts(eval_text):
    assert len(eval_text) > 300_000 and "bushfire" in eval_text
    calib = data.calib_text()
    assert len(calib) > 1_000_000 and "#REDIRECT" not in calib and "Anarchism" in calib
    assert not set(calib[:20000].split()) & {"{{", "}}"}
    sents = data.sentences(eval_text, 20)
    assert len(sents) == 20 and all(len(s.split()) >= 5 for s in sents)


@pytest.mark.slow
def test_smollm2_perplexity_on_eval_text(smollm2, eval_text):
    from edgetk.eval import evaluate

    r = evaluate(smollm2, "eval", max_windows=3)
    assert r["windows"] == 3 and r["tokens_scored"] == 3 * 511
    assert 15 < r["perplexity"] < 45, r  # full text: ~29.8 (all predictions), see README
    assert json.dumps(r)
