"""A thin wrapper over a `tokenizers` tokenizer.json (decoders and encoders)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..errors import ModelLoadError


class Tokenizer:
    def __init__(self, json_text: str, bos_id: int | None = None, eos_id: int | None = None):
        from tokenizers import Tokenizer as _T

        try:
            self._tok = _T.from_str(json_text)
        except Exception as exc:
            raise ModelLoadError(f"tokenizer.json cannot be parsed ({exc})", hint="re-create the model directory") from None
        # padding/truncation are done explicitly in `batch` (some tokenizer.json files pad to a fixed length)
        self._tok.no_padding()
        self._tok.no_truncation()
        self.json_text = json_text
        self.bos_id, self.eos_id = bos_id, eos_id
        self.sha256 = hashlib.sha256(json_text.encode()).hexdigest()

    @classmethod
    def from_file(cls, path: str | os.PathLike, bos_id: int | None = None, eos_id: int | None = None) -> "Tokenizer":
        p = Path(path)
        if not p.is_file():
            raise ModelLoadError(f"tokenizer file {p} is missing", hint="the model directory needs tokenizer.json")
        return cls(p.read_text(encoding="utf-8"), bos_id, eos_id)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def batch(self, texts: list[str], max_length: int = 256, pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Encode sentences with special tokens, truncate to max_length, pad to the longest (or pad_to)."""
        encs = [self._tok.encode(t, add_special_tokens=True) for t in texts]
        ids = [e.ids[:max_length] for e in encs]
        if any(len(i) > max_length for i in (e.ids for e in encs)):  # keep [SEP] at the end when truncating
            sep = encs[0].ids[-1]
            ids = [i if len(e.ids) <= max_length else i[:-1] + [sep] for i, e in zip(ids, encs)]
        width = pad_to or max(len(i) for i in ids)
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for r, i in enumerate(ids):
            input_ids[r, : len(i)] = torch.tensor(i)
            mask[r, : len(i)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}
