"""Tiny-model tests here run single-threaded: OpenMP fork/join on matrices this small costs more than it gives
(and on a loaded 2-core machine a 2-thread tiny matmul can take milliseconds)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
