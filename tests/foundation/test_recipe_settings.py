"""Recipes with fields changed (`with_settings`, `--set`) and how many calibration windows a recipe draws."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from edgetk.cli.app import main
from edgetk.compress import (DEFAULT_CALIB_WINDOWS, calib_windows_needed, compress, parse_settings, resolve_recipe,
                             windows_to_draw, with_settings)
from edgetk.compress.prune import PruneConfig
from edgetk.compress.vq import VQConfig
from edgetk.errors import ConfigError
from edgetk.models import load


def test_parse_settings_json_values_else_strings():
    assert parse_settings(["e2e_samples=512", "e2e_embed=true", "ft_precision=float32", "layers=[\"mlp.up_proj\"]",
                           "e2e_lr=3e-4"]) == {"e2e_samples": 512, "e2e_embed": True, "ft_precision": "float32",
                                                "layers": ["mlp.up_proj"], "e2e_lr": 3e-4}
    for bad in ("e2e_samples", "=3"):
        with pytest.raises(ConfigError, match="not FIELD=VALUE"):
            parse_settings([bad])


def test_with_settings_changes_only_the_configs_that_have_the_field():
    base = resolve_recipe("rotate+vq2-mix-kd")
    got = with_settings("rotate+vq2-mix-kd", ["e2e_samples=64", "seed=3"])
    assert [type(c) for c in got] == [type(c) for c in base]
    assert got[1].e2e_samples == 64 and base[1].e2e_samples == 512  # the preset itself is untouched
    assert got[0].seed == 3 and got[1].seed == 3  # both configs have `seed`
    assert got[1].replace(e2e_samples=512, seed=base[1].seed) == base[1]  # nothing else moved
    assert with_settings("vq2", {}) == list(resolve_recipe("vq2"))


def test_with_settings_refuses_unknown_fields_and_bad_values():
    with pytest.raises(ConfigError, match=r"field\(s\) \['e2e_sample'\]") as e:
        with_settings("rotate+vq2-mix-kd", ["e2e_sample=512"])
    assert "e2e_samples" in e.value.hint  # the hint lists the recipe's fields
    with pytest.raises(ConfigError, match="e2e_samples"):  # the config's own validation names the field
        with_settings("vq2-kd", {"e2e_samples": -1})
    with pytest.raises(ConfigError, match="do not fit config 'vq'"):  # a wrong type is a named error too
        with_settings("vq2-kd", {"e2e_samples": "many"})


def test_calib_windows_needed_per_recipe():
    assert calib_windows_needed("rtn2-g64") == 0 and calib_windows_needed("rotate") == 0
    assert calib_windows_needed("vq2") == VQConfig().calib_samples
    assert calib_windows_needed("vq2-mix") == 64 and calib_windows_needed("vq2-evo") == 128
    assert calib_windows_needed("rotate+vq2-mix-kd") == 512  # the -kd stage distills on 512 windows
    assert calib_windows_needed(with_settings("rotate+vq2-mix-kd", {"e2e_samples": 0})) == 128
    # e2e_samples only counts when the end-to-end stage runs
    assert calib_windows_needed(VQConfig(calib_samples=8, e2e_samples=512)) == 8
    assert calib_windows_needed([PruneConfig("magnitude", 0.5, n_samples=300)]) == 0
    assert calib_windows_needed([PruneConfig("wanda", 0.5, n_samples=300), VQConfig(calib_samples=8)]) == 300
    # what compress draws: none for a recipe reading none, else what the caller says, else max(128, the most read)
    assert windows_to_draw("rtn2-g64", 64) == 0 and windows_to_draw("vq2") == DEFAULT_CALIB_WINDOWS
    assert windows_to_draw("vq2-kd") == 512 and windows_to_draw("vq2-kd", 100) == 100


def test_calibration_windows_are_prefix_stable(smollm2):
    """Drawing more windows keeps the first ones: a recipe that reads k of n drawn windows sees what a draw of k
    gives, so drawing max(128, what the recipe reads) leaves every recipe reading <= 128 where it was."""
    from edgetk.data import calib_text, calibration_windows

    text = calib_text()[:50000]
    a = calibration_windows(smollm2.tokenizer, 16, 64, seed=0, text=text)
    b = calibration_windows(smollm2.tokenizer, 600, 64, seed=0, text=text)
    assert torch.equal(a, b[:16])
    assert not torch.equal(a, calibration_windows(smollm2.tokenizer, 16, 64, seed=1, text=text))


def test_compress_draws_what_the_recipe_reads(tiny_llama, monkeypatch, caplog):
    import edgetk.data as data

    drawn = []

    def fake_windows(tokenizer, n_samples, seq_len, seed, text=None):
        drawn.append(n_samples)
        return torch.randint(0, 256, (n_samples, 16), generator=torch.Generator().manual_seed(seed))

    monkeypatch.setattr(data, "calibration_windows", fake_windows)
    lm = load(copy.deepcopy(tiny_llama))
    lm.tokenizer = object()  # the windows come from fake_windows
    compress(lm, PruneConfig("wanda", 0.5, n_samples=4))
    compress(lm, PruneConfig("wanda", 0.5, n_samples=200))
    assert drawn == [DEFAULT_CALIB_WINDOWS, 200]  # at least the default; more when the recipe reads more
    with caplog.at_level(logging.WARNING, logger="edgetk.compress"):  # explicit and too few: said, and used
        compress(lm, PruneConfig("wanda", 0.5, n_samples=20), n_samples=5)
    assert drawn[-1] == 5
    assert "n_samples=20 but only 5 calibration windows were drawn" in caplog.text and "--samples 20" in caplog.text


def test_cli_set_changes_the_recipe_and_names_it(tmp_path, tiny_llama, capsys):
    from edgetk.compressed import save

    lm = load(copy.deepcopy(tiny_llama))
    lm.config = tiny_llama.cfg
    save(lm, tmp_path / "base")
    out = tmp_path / "out"
    assert main(["compress", str(tmp_path / "base"), "--recipe", "rtn2-g64", "--set", "group=32", "-o", str(out),
                 "--json"]) == 0
    res = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")][-1]
    assert res["recipe"] == "rtn2-g64 group=32" and res["reports"][0]["config"]["group"] == 32
    man = json.loads((out / "manifest.json").read_text())
    assert man["recipe"] == "rtn2-g64 group=32" and man["compression"][-1]["group"] == 32
    bad = tmp_path / "bad"
    with pytest.raises(SystemExit) as e:
        main(["compress", str(tmp_path / "base"), "--recipe", "rtn2-g64", "--set", "groop=32", "-o", str(bad)])
    assert e.value.code == 2
    assert "groop" in capsys.readouterr().err and not bad.exists()
