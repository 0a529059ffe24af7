"""Calibration and evaluation text.

* evaluation text: gensim's `lee_background.cor` (300 news articles), from the gensim 4.4.0 wheel;
* calibration text: gensim's shortened English Wikipedia dump (pages, `#REDIRECT` skipped, markup stripped).
Never calibrate on evaluation text. Any local `.txt` or `.jsonl` (field "text") file works too.
"""
from __future__ import annotations

import bz2
import json
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import torch

from .cache import cache_dir, extract_verified, fetch_wheel
from .errors import DataError

GENSIM = ("gensim", "4.4.0")
_TD = "gensim/test/test_data/"
EVAL_FILE = (_TD + "lee_background.cor", "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb")
CALIB_FILE = (_TD + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
              "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d")
BUILTIN = {"eval": "lee news articles (evaluation)", "calib": "English Wikipedia pages (calibration)"}


def _gensim_file(member: tuple[str, str]) -> Path:
    dest = cache_dir() / "data" / Path(member[0]).name
    if dest.is_file():
        return dest
    return extract_verified(fetch_wheel(*GENSIM), member[0], dest, member[1])


@lru_cache(maxsize=1)
def eval_text() -> str:
    return _gensim_file(EVAL_FILE).read_text(encoding="utf-8", errors="replace")


_MARKUP = [
    (re.compile(r"\{\{[^{}]*\}\}"), ""),  # templates (one nesting level per pass)
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def clean_wiki(text: str) -> str:
    for _ in range(3):
        text = _MARKUP[0][0].sub("", text)
    for pat, rep in _MARKUP[1:]:
        text = pat.sub(rep, text)
    return text.strip()


@lru_cache(maxsize=1)
def calib_text() -> str:
    path = _gensim_file(CALIB_FILE)
    pages = []
    with bz2.open(path, "rb") as f:
        for _, el in ET.iterparse(f):
            if el.tag.endswith("}text") and el.text:
                if not el.text.lstrip().upper().startswith("#REDIRECT"):
                    cleaned = clean_wiki(el.text)
                    if len(cleaned) > 200:
                        pages.append(cleaned)
            el.clear()
    return "\n\n".join(pages)


def load_text(source: str | Path) -> str:
    """'eval', 'calib', or a path to a .txt or .jsonl file (one {"text": ...} object per line)."""
    if str(source) == "eval":
        return eval_text()
    if str(source) == "calib":
        return calib_text()
    p = Path(source)
    if not p.is_file():
        raise DataError(f"text file {p} does not exist", hint="pass 'eval', 'calib', or a .txt/.jsonl path")
    if p.suffix == ".jsonl":
        parts = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{i} is not valid JSON ({exc.msg})", hint="one JSON object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f"{p}:{i} has no string field 'text'", hint='write lines like {"text": "..."}')
            parts.append(obj["text"])
        text = "\n\n".join(parts)
    else:
        text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"text file {p} is empty", hint="pass a file with text in it")
    return text


def token_windows(tokenizer, text: str, window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `window` tokens, [N, window]; the tail shorter than a window is dropped."""
    ids = tokenizer.encode(text)
    n = len(ids) // window
    if n == 0:
        raise DataError(f"the text has {len(ids)} tokens, fewer than one window of {window}",
                        hint="use a longer text or a smaller window")
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)


def calibration_windows(tokenizer, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                        text: str | None = None) -> torch.Tensor:
    """`n_samples` random windows of `seq_len` tokens from the calibration text (deterministic by seed)."""
    ids = tokenizer.encode(text if text is not None else calib_text())
    if len(ids) < seq_len + 1:
        raise DataError(f"calibration text has {len(ids)} tokens, fewer than one sample of {seq_len}",
                        hint="use a longer calibration text or shorter samples")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len, (n_samples,), generator=g)
    t = torch.tensor(ids, dtype=torch.long)
    return torch.stack([t[s: s + seq_len] for s in starts.tolist()])


_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences(text: str, n: int | None = None, min_words: int = 5) -> list[str]:
    """Split text into sentences (real sentences for encoder evaluation), keeping those of min_words+."""
    out = [s.strip() for line in text.splitlines() for s in _SENT.split(line) if len(s.split()) >= min_words]
    if not out:
        raise DataError("no sentences found in the text", hint="pass prose text")
    return out[:n] if n else out
