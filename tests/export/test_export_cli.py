"""`edgetk export`: a compressed (VQ) decoder artifact through the CLI, and its named errors."""
from __future__ import annotations

import json

import pytest
import torch

from edgetk.artifact import Artifact
from edgetk.cli.app import main
from edgetk.kernels.codebook_gemm import CodebookFormat
from edgetk.models import LoadedModel


def _vq_tiny_decoder(model):
    """Swap every MLP projection of a tiny decoder for a random 2-bit VQLinear (codebook_gemm in the graph)."""
    from edgetk.compress.vq_linear import VQLinear

    g = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(layer.mlp, name)
            f = CodebookFormat(out_features=lin.out_features, in_features=lin.in_features, vec_len=4, code_bits=8,
                               codebook_size=256, has_scale=True)
            vq = VQLinear.from_parts(f, torch.randint(0, 256, (1, f.out_features, f.n_vec), generator=g),
                                     torch.randn(1, 1, 256, 4, generator=g) / 4,
                                     scale=lin.weight.norm(dim=1) / 4)
            setattr(layer.mlp, name, vq)
    return model


@pytest.mark.backend
def test_cli_exports_vq_decoder_artifact(tmp_path, tiny_llama, capsys):
    from edgetk.compressed import save

    model = _vq_tiny_decoder(tiny_llama)
    save(LoadedModel("tiny-vq", "decoder", model, config=model.cfg, source="test"), tmp_path / "vq")
    out = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "vq"), "--format", "onnx", "-o", str(out), "--max-seq-len", "48",
                 "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["golden_identical"] is True and line["golden_steps"] == 32
    assert line["custom_ops"]["edgetk::codebook_gemm"] == {"count": 6, "lowering": "function"}
    art = Artifact.load(out)
    assert art.manifest["decoder"]["mode"] == "explicit"
    # no dense copy of a VQ matrix in the file, and the file is far below the fp32 model's bytes
    import onnx

    proto = onnx.load(str(art.file("model.onnx")))
    assert not [i.name for i in proto.graph.initializer if sorted(i.dims)[-2:] == [64, 160]]
    dense_mlp = 6 * 64 * 160 * 4
    fp32_model = sum(p.numel() for p in model.parameters()) * 4 + dense_mlp
    assert art.manifest["files"]["model.onnx"]["bytes"] < fp32_model - dense_mlp / 2


def test_cli_unknown_model_exits_with_named_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["export", "no-such-model", "--format", "onnx", "-o", str(tmp_path / "a")])
    assert info.value.code == 7  # ModelLoadError
    assert not (tmp_path / "a").exists()


def test_cli_bad_format_is_config_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["export", "minilm-l6", "--format", "tflite", "-o", str(tmp_path / "a")])
    assert info.value.code == 2


@pytest.mark.backend
def test_cli_exports_a_mixed_format_vq_artifact(tmp_path, tiny_llama, capsys):
    """Per-layer formats (VQConfig.overrides) export like uniform ones: each node carries its own format (here also
    9-bit codes, vq3-k512's format, with the input padded to the vector length)."""
    from edgetk.compress import compress
    from edgetk.compress.vq import VQConfig
    from edgetk.compressed import save

    lm = LoadedModel("tiny-mix", "decoder", tiny_llama, config=tiny_llama.cfg, source="test")
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = VQConfig(vec_len=4, codebook_size=16, kmeans_iters=3, refine_rounds=1, cg_iters=2, calib_samples=4,
                   overrides=("self_attn.v_proj:vec_len=2,codebook_size=64", "mlp.down_proj:stages=2",
                              "self_attn.q_proj:vec_len=3,codebook_size=512"))
    reports = compress(lm, cfg, calib=calib)
    save(lm, tmp_path / "mix", reports)
    out = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "mix"), "--format", "onnx", "-o", str(out), "--max-seq-len", "48",
                 "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["golden_identical"] is True
    assert line["custom_ops"]["edgetk::codebook_gemm"]["count"] == 7 * len(tiny_llama.model.layers)
