import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers_export

from helpers_export import small_cnn  # noqa: E402


@pytest.fixture(scope="session")
def cnn_artifacts(tmp_path_factory):
    """The small CNN exported once per format (batch 2, 32x32); tests copy before modifying."""
    import edgetk

    cache: dict = {}

    def get(fmt: str):
        if fmt not in cache:
            out = tmp_path_factory.mktemp(f"cnn-{fmt}") / "a"
            cache[fmt] = edgetk.export(small_cnn(), (torch.randn(2, 3, 32, 32),), format=fmt, out=out)
        return cache[fmt]

    return get
