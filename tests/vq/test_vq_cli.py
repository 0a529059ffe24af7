"""`edgetk compress`: list, VQ / RTN / pruning recipes on a small real-tokenizer model, errors, artifacts."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from edgetk.cli.app import main
from edgetk.compressed import save
from edgetk.models import llama, load
from edgetk.models.loading import LoadedModel


@pytest.fixture(scope="module")
def small_art(tmp_path_factory, smollm2):
    """A 2-block random decoder with smollm2's real tokenizer, saved as a plain artifact."""
    cfg = llama.LlamaConfig(vocab_size=smollm2.config.vocab_size, hidden_size=64, intermediate_size=128,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, max_seq_len=512)
    lm = LoadedModel("tiny-tok", "decoder", llama.init_random(cfg, seed=0), tokenizer=smollm2.tokenizer,
                     config=cfg, source="test")
    d = tmp_path_factory.mktemp("cli")
    save(lm, d / "base")
    from edgetk.data import calib_text

    (d / "calib.txt").write_text(calib_text()[:20000])
    return d


def _json_lines(out: str) -> list[dict]:
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


@pytest.mark.slow
def test_compress_vq_rtn_prune_through_cli(small_art, capsys):
    assert main(["compress", "--list", "--json"]) == 0
    recipes = _json_lines(capsys.readouterr().out)[0]["recipes"]
    assert {"vq2", "vq3", "rtn2-g64", "prune-2of4"} <= set(recipes)
    base, calib = str(small_art / "base"), str(small_art / "calib.txt")
    vq = '{"kind": "vq", "vec_len": 4, "codebook_size": 16, "kmeans_iters": 3, "refine_rounds": 1, "cg_iters": 2}'
    for recipe, method in ((vq, "vq"), ("rtn2-g64", "rtn"), ("prune-2of4", None)):
        out = small_art / f"out-{method}"
        assert main(["compress", base, "--recipe", recipe, "--calib", calib, "--samples", "2", "--seq-len", "64",
                     "--eval", "--max-windows", "1", "-o", str(out), "--json"]) == 0
        res = _json_lines(capsys.readouterr().out)[-1]
        assert res["after"]["windows"] == 1 and res["before"]["perplexity"] > 1
        if method:
            assert res["reports"][0]["method"] == method
            man = json.loads((out / "manifest.json").read_text())
            assert man["bits_per_weight"] == pytest.approx(res["totals"]["bits_per_weight"])
            assert "bits_per_weight_model" in man and man["recipe"] == recipe
        back = load(out)  # every compressed artifact loads back as a model
        x = torch.randint(0, 100, (1, 8))
        assert torch.isfinite(back.model(x)).all()
    # the human table renders too (stderr)
    assert main(["compress", base, "--recipe", "rtn2-g32", "-o", str(small_art / "t")]) == 0
    err = capsys.readouterr().err
    assert "compress tiny-tok: layers" in err and "summary" in err


def test_cli_errors_are_named(tmp_path):
    cmd = [sys.executable, "-m", "edgetk.cli.app", "compress", "smollm2-135m", "--recipe", "vq9", "-o",
           str(tmp_path / "x")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown recipe 'vq9'" in r.stderr and "vq2" in r.stderr
    r = subprocess.run(cmd[:6] + ["vq2", "--calib", "eval", "-o", str(tmp_path / "y")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 8 and "evaluation text" in r.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_rotate_then_vq_through_cli(small_art, capsys):
    """`rotate+vq2`: the chain runs, the artifact records the rotated base config and loads back to the same
    logits, and the summary shows the rotation's exactness check."""
    base, calib, out = str(small_art / "base"), str(small_art / "calib.txt"), small_art / "out-rot"
    assert main(["compress", base, "--recipe", "rotate+vq2", "--calib", calib, "--samples", "2", "--seq-len", "64",
                 "-o", str(out), "--json"]) == 0
    res = _json_lines(capsys.readouterr().out)[-1]
    assert [r["method"] for r in res["reports"]] == ["rotate", "vq"]
    assert res["totals"]["rotation_max_abs_logit_change"] < 1e-3 and res["totals"]["rotation_dim"] == 64
    man = json.loads((out / "manifest.json").read_text())
    assert man["base_config"]["residual_rotation"] is True and man["recipe"] == "rotate+vq2"
    back = load(out)
    assert back.model.cfg.residual_rotation and back.model.rotation.shape == (64, 64)
    assert main(["compress", base, "--recipe", "rotate+vq2", "--calib", calib, "--samples", "2", "--seq-len", "64",
                 "-o", str(small_art / "out-rot2")]) == 0
    assert "rotation_max_abs_logit_change" in capsys.readouterr().err
