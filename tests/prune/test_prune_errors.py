"""Bad input: clear, named errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edgetk.compress import compress, resolve_recipe
from edgetk.compress.evopress import EvoPruneConfig
from edgetk.compress.prune import PruneConfig
from edgetk.compress.prune_structured import StructuredPruneConfig
from edgetk.compress.token_merge import TokenMergeConfig
from edgetk.config import Config
from edgetk.errors import ConfigError, DataError
from edgetk.models import load
from tests.conftest import TINY_BERT


@pytest.mark.parametrize("s", [1.0, 1.5, -0.1])
def test_sparsity_outside_unit_interval(s):
    with pytest.raises(ConfigError, match="sparsity"):
        PruneConfig("magnitude", s)
    with pytest.raises(ConfigError, match="sparsity"):
        EvoPruneConfig(s)
    with pytest.raises(ConfigError, match="fraction"):
        StructuredPruneConfig("mlp", s)


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4)])
def test_nm_with_n_not_below_m(n, m):
    with pytest.raises(ConfigError, match="'n'"):
        PruneConfig(n=n, m=m)


pytestmark = pytest.mark.usefixtures("one_thread")

def test_json_config_is_validated_too():
    with pytest.raises(ConfigError, match="sparsity"):
        resolve_recipe('{"kind": "prune", "sparsity": 1.2}')
    assert Config.from_json(PruneConfig(n=2, m=4).to_json()) == PruneConfig(n=2, m=4)


def test_model_without_prunable_layers():
    m = load(nn.Sequential(nn.Conv1d(2, 2, 3), nn.ReLU()))
    with pytest.raises(ConfigError, match="no prunable nn.Linear"):
        compress(m, PruneConfig("magnitude", 0.5))
    with pytest.raises(ConfigError, match="MLP layout"):
        compress(m, StructuredPruneConfig("mlp", 0.25, method="magnitude"))
    with pytest.raises(ConfigError, match="BERT encoders"):
        compress(m, TokenMergeConfig(r=2))


def test_wanda_without_calibration_data():
    m = load(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(DataError, match="calibration"):
        compress(m, PruneConfig("wanda", 0.5))  # a bare module has no tokenizer to draw calibration text


def test_r_larger_than_tokens_left(tiny_bert):
    m = load(copy.deepcopy(tiny_bert))
    m.config = TINY_BERT
    compress(m, TokenMergeConfig(r=6))
    m.model(torch.randint(0, 128, (1, 40)))  # 40 -> 34 -> 28: fine
    with pytest.raises(ConfigError, match="r=6 is larger than the tokens left"):
        m.model(torch.randint(0, 128, (1, 16)))  # 16 -> 10 -> second layer has 5 A tokens (4 mergeable)
    with pytest.raises(ConfigError, match="'r'"):
        TokenMergeConfig(r=-1)
    with pytest.raises(ConfigError, match="layers"):
        compress(load(copy.deepcopy(tiny_bert)), TokenMergeConfig(layers=(2, 2, 2)))
