"""Shared fixtures. Real zoo models are session-scoped (loaded once) and their tests marked `slow`."""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from edgetk.models import bert, llama

# `python -m pytest` puts the working directory (the repository root) first on sys.path. There the source folder
# `kernels/` (installed as `edgetk.kernels`) would shadow the `kernels` distribution that transformers >= 5.25
# requires and imports ("cannot import name 'CUDAProperties' from 'kernels'"): import the installed one first,
# with the root off the path, so that `import kernels` finds it in sys.modules from then on.
_ROOT = Path(__file__).resolve().parents[1]


def _prefer_installed_kernels() -> None:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
    try:
        importlib.import_module("kernels")
    except Exception:  # noqa: BLE001 - a broken install fails later where transformers imports it, as before
        pass
    finally:
        sys.path[:] = saved


_prefer_installed_kernels()


class OpsSeen(TorchDispatchMode):
    """Records every op dispatched inside the block (`with OpsSeen() as seen: ...; seen.ops`): what export and
    other tracers see of an eager fast path."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)
    torch.manual_seed(0)


TINY_LLAMA = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=16, max_seq_len=128, tie_embeddings=True)
TINY_BERT = bert.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            max_position=128)


@pytest.fixture
def tiny_llama() -> llama.LlamaForCausalLM:
    return llama.init_random(TINY_LLAMA, seed=0)


@pytest.fixture
def tiny_bert() -> bert.BertEncoder:
    return bert.init_random(TINY_BERT, seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """The real smollm2-135m zoo model (LoadedModel). Do not mutate it: deep-copy `.model` first."""
    from edgetk.models import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def minilm():
    from edgetk.models import load

    return load("minilm-l6")


@pytest.fixture(scope="session")
def eval_text() -> str:
    from edgetk.data import eval_text

    return eval_text()
