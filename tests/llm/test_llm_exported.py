"""The LLM runtime over exported decoder steps (real exports, real onnxruntime / ExecuTorch runtime / TVM VM):
same greedy text as eager."""
from __future__ import annotations

import copy

import pytest

from edgetk.errors import ConfigError, ModelLoadError
from edgetk.runtimes.kv_cache import KVCacheConfig
from edgetk.runtimes.llm import LLM

pytestmark = pytest.mark.backend


@pytest.fixture(scope="module")
def onnx_step(tmp_path_factory, tiny_lm_shared):
    from edgetk.exporters import export

    lm = tiny_lm_shared
    out = tmp_path_factory.mktemp("llm") / "tiny_onnx"
    export(copy.deepcopy(lm), format="onnx", out=out, max_seq_len=64)
    return lm, out


def test_onnx_step_generates_eager_text(onnx_step, make_byte_tokenizer):
    lm, out = onnx_step
    eager = LLM.load(lm, max_seq_len=64).generate("hello world", 16)
    llm = LLM.load(out, tokenizer=make_byte_tokenizer(), max_seq_len=64)
    r = llm.generate("hello world", 16)
    assert r.token_ids == eager.token_ids and r.text == eager.text
    assert r.metrics.backend == "onnx" and r.metrics.decode_tok_s > 0


@pytest.mark.parametrize("fmt", ["executorch", "tvm"])
def test_other_runtimes_generate_eager_text(tmp_path, tiny_lm_shared, make_byte_tokenizer, fmt):
    if fmt == "tvm":
        pytest.importorskip("tvm", reason="apache-tvm is the 'tvm' extra")
    from edgetk.exporters import export

    lm = tiny_lm_shared
    export(copy.deepcopy(lm), format=fmt, out=tmp_path / fmt, max_seq_len=64, golden_steps=8)
    eager = LLM.load(copy.deepcopy(lm), max_seq_len=64).generate("hello world", 12)
    llm = LLM.load(tmp_path / fmt, tokenizer=make_byte_tokenizer(), max_seq_len=64)
    r = llm.generate("hello world", 12)
    assert r.token_ids == eager.token_ids and r.text == eager.text
    assert r.metrics.backend == fmt and r.metrics.decode_tok_s > 0


def test_onnx_step_bad_requests(onnx_step, make_byte_tokenizer):
    from tokenizers import Tokenizer as HFTokenizer

    from edgetk.models import Tokenizer

    _, out = onnx_step
    llm = LLM.load(out, tokenizer=make_byte_tokenizer(), max_seq_len=64)
    with pytest.raises(ConfigError, match="cannot verify draft trees"):
        llm.generate("hi", 4, speculative="recycling")
    with pytest.raises(ConfigError, match="eager backend"):
        LLM.load(out, tokenizer=make_byte_tokenizer(), kv_cache=KVCacheConfig())
    bigger = HFTokenizer.from_str(make_byte_tokenizer().json_text)
    bigger.add_tokens(["<extra>"])  # 257 tokens for a 256-token artifact
    with pytest.raises(ModelLoadError, match="do not belong together"):
        LLM.load(out, tokenizer=Tokenizer(bigger.to_str()))
