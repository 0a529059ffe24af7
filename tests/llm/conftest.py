"""Fixtures for the LLM runtime tests: a tiny random decoder with a real byte-level tokenizer."""
from __future__ import annotations

import pytest

from edgetk.models import LoadedModel, Tokenizer, llama

TINY = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_seq_len=256, tie_embeddings=True,
                         bos_token_id=None, eos_token_id=None)


def byte_tokenizer() -> Tokenizer:
    """A real `tokenizers` byte-level tokenizer with exactly 256 tokens (one per byte), no merges."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    t = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return Tokenizer(t.to_str())


@pytest.fixture
def tiny_lm() -> LoadedModel:
    return LoadedModel("tiny", "decoder", llama.init_random(TINY, seed=0), byte_tokenizer(), TINY)


@pytest.fixture
def make_byte_tokenizer():
    return byte_tokenizer


@pytest.fixture(scope="module")
def tiny_lm_shared() -> LoadedModel:
    """Module-scoped tiny decoder (do not mutate)."""
    return LoadedModel("tiny", "decoder", llama.init_random(TINY, seed=0), byte_tokenizer(), TINY)
