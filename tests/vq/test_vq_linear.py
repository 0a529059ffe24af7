"""VQLinear: the packed layout, the custom op against the dense weight, honest bit counts, artifact round trip."""
from __future__ import annotations

import copy

import pytest
import torch

from edgetk.compress import compress
from edgetk.compress.calib import model_bits
from edgetk.compress.rtn import RTNConfig, RTNLinear
from edgetk.compress.vq import VQConfig
from edgetk.compress.vq_linear import VQLinear
from edgetk.compressed import save
from edgetk.eval import snr_db
from edgetk.kernels import table
from edgetk.kernels.codebook_gemm import CodebookFormat
from edgetk.models import load
from tests.conftest import OpsSeen


def _safetensors_data_bytes(path) -> int:
    import struct

    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - header


def _random_vq(fmt: CodebookFormat, seed: int = 0) -> VQLinear:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, fmt.codebook_size, (fmt.stages, fmt.out_features, fmt.n_vec), generator=g)
    cbs = torch.randn(fmt.stages, fmt.groups, fmt.codebook_size, fmt.vec_len, generator=g)
    perm = torch.randperm(fmt.in_features, generator=g) if fmt.n_outliers else None
    outl = torch.randn(fmt.out_features, fmt.n_outliers, generator=g) if fmt.n_outliers else None
    scale = torch.rand(fmt.out_features, generator=g) + 0.5 if fmt.has_scale else None
    bias = torch.randn(fmt.out_features, generator=g) if fmt.has_bias else None
    return VQLinear.from_parts(fmt, codes, cbs, perm, outl, scale, bias)


FORMATS = [
    CodebookFormat(out_features=48, in_features=64, vec_len=4, code_bits=8, codebook_size=256, has_scale=True),
    CodebookFormat(out_features=32, in_features=30, vec_len=4, code_bits=6, codebook_size=64, stages=2, groups=2,
                   n_outliers=3, has_scale=True, has_bias=True),
    CodebookFormat(out_features=16, in_features=40, vec_len=2, code_bits=12, codebook_size=4096),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=["v4k256", "res-out-bias", "v2k4096"])
def test_forward_matches_dense_and_bits_are_honest(fmt):
    m = _random_vq(fmt)
    w = m.dequantize()
    b = m.bias.float() if fmt.has_bias else 0
    for batch in ((1, fmt.in_features), (2, 5, fmt.in_features)):
        x = torch.randn(*batch)
        with table.force("reference"):
            y = m(x)
        assert y.shape == (*batch[:-1], fmt.out_features)
        assert snr_db(x @ w.T + b, y) > 80  # fp32 LUT-GEMV vs dense: only summation-order rounding
    assert m.buffer_bits() == fmt.storage_bits()
    assert m.codes.dtype == torch.uint8 and m.codebooks.dtype == torch.float16


def test_op_is_called_not_a_dense_weight(monkeypatch):
    m = _random_vq(FORMATS[0])
    calls = []
    real = table.select

    def spy(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(table, "select", spy)
    m(torch.randn(1, 64))
    assert calls and calls[0][0] == "codebook_gemm"
    assert not any(p.numel() == 48 * 64 for p in m.buffers())  # no dense weight stored


def test_eager_forward_skips_the_dispatcher_but_tracers_see_the_op():
    """Plain eager CPU calls run the kernel the op would pick (same result as the op); export, dispatch modes and
    autograd inputs go through `torch.ops.edgetk.codebook_gemm`."""
    m = _random_vq(FORMATS[1])
    x = torch.randn(1, 30)
    op = torch.ops.edgetk.codebook_gemm.default
    args = (m.codes, m.codebooks, m.perm_i64, m.outlier_w, m.scale, m.bias, 30, 4, 6)
    assert torch.equal(m(x), op(x, *args))

    with OpsSeen() as seen:
        m(x)
    assert op in seen.ops
    ep = torch.export.export(m, (x,))
    assert [n.target for n in ep.graph.nodes if n.op == "call_function"] == [op]
    from edgetk.kernels.codebook_gemm import _plain_eager

    assert _plain_eager(x) and not _plain_eager(x.requires_grad_())
    with torch.no_grad():
        assert _plain_eager(x)


def test_vq_artifact_round_trip_and_size(tiny_llama, tmp_path):
    lm = load(copy.deepcopy(tiny_llama))

    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    reports = compress(lm, VQConfig(vec_len=4, codebook_size=16, kmeans_iters=3, refine_rounds=1, cg_iters=2,
                                    calib_samples=4), calib=calib)
    lm.config = tiny_llama.cfg
    x = torch.randint(0, 256, (1, 16))
    y = lm.model(x)
    art = save(lm, tmp_path / "vq", reports)
    man = art.manifest
    assert man["bits_per_weight"] == pytest.approx(reports[0].totals["bits_per_weight"])
    assert 1.0 < man["bits_per_weight"] < 8  # 4-bit codes per 4 weights + codebook/scale overhead
    disk = man["files"]["model.safetensors"]["bytes"]
    # the tensor data equals the accounted bits exactly; the safetensors JSON header is extra (large here
    # only because the model is tiny; the real-model test checks the whole file within 5%)
    accounted = man["bits_per_weight_model"] * man["params"] / 8
    assert _safetensors_data_bytes(art.file("model.safetensors")) == pytest.approx(accounted, rel=1e-9)
    assert disk > accounted
    back = load(tmp_path / "vq")
    kinds = {type(m).__name__ for m in back.model.modules()}
    assert "VQLinear" in kinds and "Linear" in kinds  # lm_head stays dense
    torch.testing.assert_close(back.model(x), y, rtol=0, atol=1e-5)


def test_rtn_quantizes_and_round_trips(tiny_llama, tmp_path):
    lm = load(copy.deepcopy(tiny_llama))
    lm.config = tiny_llama.cfg
    reports = compress(lm, "rtn2-g32")
    rtn = [m for m in lm.model.modules() if isinstance(m, RTNLinear)]
    assert len(rtn) == 14
    # 2-bit codes + fp16 scale and minimum per 32 weights = 3.0 bits exactly
    assert reports[0].totals["bits_per_weight"] == pytest.approx(3.0)
    q, = [m for m in rtn if m.out_features == 160][:1]
    w = q.dequantize()
    for row in w.view(w.shape[0], -1, 32)[:4]:
        for grp in row:
            assert len(torch.unique(grp)) <= 4
    art = save(lm, tmp_path / "rtn", reports)
    assert model_bits(lm.model) // 8 == _safetensors_data_bytes(art.file("model.safetensors"))
    back = load(tmp_path / "rtn")
    x = torch.randint(0, 256, (1, 12))
    torch.testing.assert_close(back.model(x), lm.model(x))


def test_rtn_pads_ragged_groups():
    w = torch.randn(8, 40)
    q = RTNLinear.quantize(w, None, 2, 32)
    assert q.dequantize().shape == (8, 40)
    # min-max: the error is at most half a step everywhere
    step = (q.scale.float().repeat_interleave(32, 1)[:, :40])
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-2).all()
    with pytest.raises(Exception):
        RTNConfig(bits=5)


@pytest.mark.slow
def test_real_model_artifact_size_matches_manifest_bits(smollm2, tmp_path):
    """Whole smollm2 (RTN 2-bit g64, the quick quantizer): file size on disk within 5% of the manifest's
    bits_per_weight_model x params (header included), and bits_per_weight over the 210 layers = 2.5."""
    from edgetk.models.loading import LoadedModel

    lm = LoadedModel(smollm2.name, "decoder", copy.deepcopy(smollm2.model), smollm2.tokenizer, smollm2.config)
    reports = compress(lm, "rtn2-g64")
    man = save(lm, tmp_path / "rtn", reports).manifest
    assert man["bits_per_weight"] == pytest.approx(2.5)
    assert len(reports[0].layers) == 210
    disk = man["files"]["model.safetensors"]["bytes"]
    assert abs(disk - man["bits_per_weight_model"] * man["params"] / 8) / disk < 0.05


def test_per_layer_overrides_quantize_round_trip_and_are_validated(tiny_llama, tmp_path):
    """`overrides` gives chosen layers their own format (mixed bits); the artifact keeps each layer's format and
    its bits are counted per layer; malformed entries are refused naming the entry."""
    from edgetk.compress.vq_linear import VQLinear
    from edgetk.errors import ConfigError

    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    base = dict(vec_len=4, codebook_size=16, kmeans_iters=3, refine_rounds=1, cg_iters=2, calib_samples=4)
    cfg = VQConfig(**base, overrides=("self_attn.v_proj:vec_len=2,codebook_size=64", "mlp.down_proj:stages=2"))
    lm = load(copy.deepcopy(tiny_llama))
    lm.config = tiny_llama.cfg
    reports = compress(lm, cfg, calib=calib)
    fmts = {n: m.fmt for n, m in lm.model.named_modules() if isinstance(m, VQLinear)}
    for n, f in fmts.items():
        want = (2, 64, 1) if n.endswith("v_proj") else (4, 16, 2) if n.endswith("down_proj") else (4, 16, 1)
        assert (f.vec_len, f.codebook_size, f.stages) == want, n
    plain = load(copy.deepcopy(tiny_llama))
    plain.config = tiny_llama.cfg
    r0 = compress(plain, VQConfig(**base), calib=calib)
    assert reports[0].totals["bits_per_weight"] > r0[0].totals["bits_per_weight"]  # 3 and 2 bits per weight there, 1 elsewhere
    x = torch.randint(0, 256, (1, 16))
    y = lm.model(x)
    save(lm, tmp_path / "mix", reports)
    back = load(tmp_path / "mix")
    assert {n: m.fmt for n, m in back.model.named_modules() if isinstance(m, VQLinear)} == fmts
    torch.testing.assert_close(back.model(x), y, rtol=0, atol=1e-5)
    for bad, match in [(("x_proj:vec_len=2",), "layer among"), (("mlp.up_proj",), "layer among"),
                       (("mlp.up_proj:seed=3",), "fields among"), (("mlp.up_proj:vec_len=two",), "integer"),
                       (("mlp.up_proj:vec_len=64",), "entry 'mlp.up_proj:vec_len=64'.*vec_len"),
                       (("mlp.up_proj:stages=2", "mlp.up_proj:groups=2"), "one entry per layer")]:
        with pytest.raises(ConfigError, match=match):
            VQConfig(**base, overrides=bad)
