"""Quality measurements: perplexity, next-token top-1 agreement, embedding cosine similarity.

Perplexity uses non-overlapping windows (default 512 tokens) and scores every prediction in a window
(511 per 512-token window) unless `score="second-half"` (llama.cpp's perplexity tool scores only the
second half of each window; report which scoring you use).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .errors import DataError
from .progress import track

SCORING = ("all", "second-half")


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    windows: int
    window: int
    tokens_scored: int
    nll: float
    scoring: str

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out[0]


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, scoring: str = "all", batch_size: int = 1) -> PerplexityResult:
    if scoring not in SCORING:
        raise DataError(f"unknown scoring {scoring!r}", hint=f"one of {SCORING}")
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise DataError("perplexity needs at least one token window", hint="use a longer text")
    w = windows.shape[1]
    start = 0 if scoring == "all" else w // 2 - 1
    total, count = 0.0, 0
    for i in track(range(0, windows.shape[0], batch_size), "perplexity", total=-(-windows.shape[0] // batch_size)):
        x = windows[i: i + batch_size]
        logits = _logits(model, x)[:, start:-1].float()
        tgt = x[:, start + 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
        count += tgt.numel()
    nll = total / count
    return PerplexityResult(math.exp(nll), windows.shape[0], w, count, nll, scoring)


@torch.inference_mode()
def top1_agreement(reference, model, windows: torch.Tensor) -> float:
    """Fraction of positions where `model`'s argmax next token equals `reference`'s (LLM-KICK's point:
    perplexity alone hides damage)."""
    agree = n = 0
    for i in track(range(windows.shape[0]), "top-1 agreement"):
        x = windows[i: i + 1]
        a, b = _logits(reference, x).argmax(-1), _logits(model, x).argmax(-1)
        agree += (a == b).sum().item()
        n += a.numel()
    return agree / n


@torch.inference_mode()
def embeddings(model, tokenizer, sents: list[str], batch_size: int = 32, max_length: int = 256) -> torch.Tensor:
    outs = []
    for i in track(range(0, len(sents), batch_size), "embeddings", total=-(-len(sents) // batch_size)):
        b = tokenizer.batch(sents[i: i + batch_size], max_length=max_length)
        outs.append(model(b["input_ids"], b["attention_mask"]))
    return torch.cat(outs)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> dict:
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
    return {"mean_cosine": cos.mean().item(), "min_cosine": cos.min().item(), "sentences": int(cos.numel())}


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio in dB (torchao style): how close an approximation is to its reference."""
    noise = (reference.float() - approx.float()).pow(2).mean()
    signal = reference.float().pow(2).mean()
    return float("inf") if noise == 0 else 10 * math.log10((signal / noise).item())


def evaluate(loaded, text: str = "eval", max_windows: int | None = None, window: int = 512,
             scoring: str = "all", max_sentences: int = 256) -> dict:
    """Evaluate a LoadedModel: perplexity for decoders, embedding norm stats for encoders."""
    from .data import load_text, sentences, token_windows

    body = load_text(text)
    if loaded.kind == "decoder":
        wins = token_windows(loaded.tokenizer, body, window, max_windows)
        return {"model": loaded.name, "text": str(text), **perplexity(loaded.model, wins, scoring).to_dict()}
    if loaded.kind == "encoder":
        sents = sentences(body, max_sentences)
        emb = embeddings(loaded.model, loaded.tokenizer, sents)
        return {"model": loaded.name, "text": str(text), "sentences": len(sents),
                "embedding_dim": int(emb.shape[-1]), "mean_norm": emb.norm(dim=-1).mean().item()}
    raise DataError(f"model kind {loaded.kind!r} has no text evaluation",
                    hint="evaluate decoders (perplexity) or encoders (embeddings)")
