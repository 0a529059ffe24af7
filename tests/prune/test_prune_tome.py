"""Token merging: against a naive ToMe reference, conservation, padding, sub-token merging, export, artifacts."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from edgetk.compress import compress
from edgetk.compress.token_merge import (ToMeEncoder, TokenMergeConfig, bipartite_merge, subword_merge)
from edgetk.models import load
from tests.conftest import TINY_BERT

pytestmark = pytest.mark.usefixtures("one_thread")


def merged(tiny_bert, **kw):
    m = load(copy.deepcopy(tiny_bert))
    m.config = TINY_BERT
    compress(m, TokenMergeConfig(**kw))
    return m


def naive_tome(x, metric, size, r, protect_cls=True):
    """Per-sample Python reference of bipartite soft matching with size-weighted averaging."""
    xs, ss = [], []
    for b in range(x.shape[0]):
        a_idx, b_idx = list(range(0, x.shape[1], 2)), list(range(1, x.shape[1], 2))
        m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        best = {}
        for i in a_idx:
            sims = [float(m[i] @ m[j]) for j in b_idx]
            k = int(np.argmax(sims))
            score = -1e4 if (protect_cls and i == 0) else sims[k]
            best[i] = (1e4 if size[b, i] == 0 else score, b_idx[k])
        order = sorted(a_idx, key=lambda i: -best[i][0])
        src, keep = order[:r], sorted(order[r:])
        acc = {j: (x[b, j] * size[b, j], size[b, j].clone()) for j in b_idx}
        for i in src:
            j = best[i][1]
            acc[j] = (acc[j][0] + x[b, i] * size[b, i], acc[j][1] + size[b, i])
        rows = [x[b, i] * size[b, i] / size[b, i].clamp_min(1e-6) for i in keep]
        rows += [acc[j][0] / acc[j][1].clamp_min(1e-6) for j in b_idx]
        xs.append(torch.stack(rows))
        ss.append(torch.stack([size[b, i] for i in keep] + [acc[j][1] for j in b_idx]))
    return torch.stack(xs), torch.stack(ss)


@pytest.mark.parametrize("t,r", [(12, 3), (13, 4), (9, 1)])
def test_bipartite_merge_matches_naive_reference(t, r):
    g = torch.Generator().manual_seed(t)
    x, metric = torch.randn(2, t, 6, generator=g), torch.randn(2, t, 5, generator=g)
    size = torch.randint(1, 4, (2, t), generator=g).float()
    size[1, -2:] = 0  # padding
    got_x, got_s, pos = bipartite_merge(x, metric, size, r, True)
    ref_x, ref_s = naive_tome(x, metric, size, r)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_s, ref_s)
    assert got_x.shape[1] == t - r
    torch.testing.assert_close((got_x * got_s[..., None]).sum(1), (x * size[..., None]).sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(got_s.sum(1), size.sum(1))
    torch.testing.assert_close(got_x[:, 0], x[:, 0])  # [CLS] unmerged, first
    # every original token maps to the slot that holds it: slot sizes = how many tokens point at it (weighted)
    counted = torch.zeros_like(got_s).scatter_add(1, pos, size)
    torch.testing.assert_close(counted, got_s)


def test_r0_is_the_unmerged_model(tiny_bert):
    ids = torch.randint(5, 128, (3, 30))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    torch.testing.assert_close(merged(tiny_bert, r=0).model(ids, mask), tiny_bert(ids, mask), rtol=1e-5, atol=1e-6)


def test_padding_is_merged_first_and_changes_nothing(tiny_bert):
    """With more padding than merges, only pads merge: the padded row's embedding equals the unmerged one."""
    ids = torch.randint(5, 128, (2, 40))
    mask = torch.ones_like(ids)
    mask[:, 16:] = 0
    out = merged(tiny_bert, r=4).model(ids, mask)
    torch.testing.assert_close(out, tiny_bert(ids, mask), rtol=1e-5, atol=1e-5)
    full = merged(tiny_bert, r=4).model(ids[:, :16])  # unpadded: real tokens must merge now
    assert not torch.allclose(full, tiny_bert(ids[:, :16]), atol=1e-5)


def test_subword_merge_averages_word_pieces():
    cont = torch.zeros(10, dtype=torch.bool)
    cont[[7, 8]] = True  # ids 7, 8 are '##' pieces
    ids = torch.tensor([[1, 5, 7, 8, 6, 7, 2, 0]])
    size = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.float)
    x = torch.randn(1, 8, 4)
    y, s, wid = subword_merge(x, size, ids, cont, None)
    assert wid.tolist() == [[0, 1, 1, 1, 2, 2, 3, 4]]
    assert s.tolist() == [[1, 3, 2, 1, 0]]
    torch.testing.assert_close(y[0, 1], x[0, 1:4].mean(0))
    torch.testing.assert_close(y[0, 2], x[0, 4:6].mean(0))
    y2, _, _ = subword_merge(x, size, ids, cont, torch.zeros(4))  # learned weights start as the average
    torch.testing.assert_close(y2, y)


def test_subword_encoder_uses_the_tokenizer_pieces(minilm):
    m = load(copy.deepcopy(minilm.model))
    m.config, m.tokenizer = minilm.config, minilm.tokenizer
    compress(m, TokenMergeConfig(r=0, subword="average"))
    enc = m.model.encoder
    assert enc.continuation[minilm.tokenizer.token_to_id("##s")] and not enc.continuation[
        minilm.tokenizer.token_to_id("the")]
    b = minilm.tokenizer.batch(["Unquestionably, the chancellor's reorganisation failed."])
    c = torch.nn.functional.cosine_similarity(m.model(**b), minilm.model(**b)).item()
    assert 0.8 < c < 0.99999


@pytest.mark.backend
def test_tome_exports_with_static_r_and_matches_eager(tiny_bert, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m = merged(tiny_bert, layers=(6, 3))
    ids = torch.randint(5, 128, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    ep = torch.export.export(m.model, (ids, mask))
    torch.testing.assert_close(ep.module()(ids, mask), m.model(ids, mask), rtol=1e-5, atol=1e-6)
    path = tmp_path / "tome.onnx"
    torch.onnx.export(m.model, (ids, mask), dynamo=True, input_names=["input_ids", "attention_mask"]).save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert np.abs(got - m.model(ids, mask).detach().numpy()).max() < 1e-5


def test_tome_artifact_reloads(tiny_bert, tmp_path):
    from edgetk.compressed import save

    m = load(copy.deepcopy(tiny_bert))
    m.config = TINY_BERT
    reps = compress(m, "tome-r8")
    save(m, tmp_path / "t", reps)
    back = load(tmp_path / "t")
    assert type(back.model.encoder) is ToMeEncoder and back.model.encoder.r == (8, 8)
    ids = torch.randint(5, 128, (2, 40))
    torch.testing.assert_close(back.model(ids), m.model(ids), rtol=0, atol=0)
    assert reps[0].totals["tokens_left_at_256"] == [248, 240]


@pytest.mark.slow
def test_minilm_tome_keeps_real_sentence_embeddings(minilm, eval_text):
    from edgetk.data import sentences

    sents = sentences(eval_text, 400)
    texts = [" ".join(sents[i: i + 4]) for i in range(0, 64, 4)]  # ~100-token passages
    b = minilm.tokenizer.batch(texts, max_length=128)
    m = load(copy.deepcopy(minilm.model))
    m.config, m.tokenizer = minilm.config, minilm.tokenizer
    compress(m, "tome-r8")
    with torch.inference_mode():
        c = torch.nn.functional.cosine_similarity(m.model(**b), minilm.model(**b))
    assert c.mean() > 0.98 and c.min() > 0.95
