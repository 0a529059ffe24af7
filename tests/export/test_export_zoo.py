"""Golden exports of the real zoo models: smollm2-135m (fp) and minilm-l6, in their real runtimes.
smollm2 is exported once per format per session (module-scoped), with a 64-token cache."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgetk
from edgetk.cli.app import main
from edgetk.exporters.decoder import ExplicitStepper
from edgetk.runtimes import Session

pytestmark = [pytest.mark.slow, pytest.mark.backend]


@pytest.fixture(scope="module", params=["onnx", "executorch"])
def smollm2_artifact(request, smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"smollm2-{request.param}") / "a"
    return edgetk.export(smollm2, format=request.param, out=out, max_seq_len=64, golden_steps=32)


def test_smollm2_golden_32_steps(smollm2_artifact, smollm2):
    m = smollm2_artifact.manifest
    golden = m["parity"]["golden"]
    assert golden["identical"] and golden["steps"] == 32
    assert m["source_model"] == "smollm2-135m" and m["decoder"]["num_layers"] == 30
    # the eager greedy continuation of the same prompt, computed independently without a cache
    prompt = [smollm2.model.cfg.bos_token_id] + smollm2.tokenizer.encode("The capital of France is")
    assert golden["prompt_tokens"] == len(prompt)
    with torch.no_grad():
        seq = list(prompt)
        for _ in range(4):
            seq.append(int(smollm2.model(torch.tensor([seq]))[0, -1].argmax()))
    assert golden["tokens"][:4] == seq[len(prompt):]
    # fp32 weights: ~135M params x 4 bytes, the tied embedding stored once (ExecuTorch: the head reads it as the
    # left operand of a portable mm; handed to XNNPACK as a linear weight it would be stored twice: +113 MB)
    assert 0.5e9 < smollm2_artifact.total_bytes < 0.58e9


def test_smollm2_artifact_driven_by_caller(smollm2_artifact, smollm2):
    """What an app does: load the artifact, feed tokens one by one with the cache carried across calls."""
    m = smollm2_artifact.manifest
    sess = Session(smollm2_artifact)
    ids = smollm2.tokenizer.encode("Edge devices")[:3]
    if m["decoder"]["mode"] == "explicit":
        st = ExplicitStepper(sess.run, m["decoder"]["cache_shape"])
        logits = [st.step(t, i) for i, t in enumerate(ids)]
    else:
        logits = [sess.run([np.array([[t]]), np.array([i])])[0].reshape(-1) for i, t in enumerate(ids)]
    with torch.no_grad():
        ref = smollm2.model(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(np.stack(logits), ref, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_minilm_export(tmp_path, minilm, fmt, capsys):
    """ONNX through the CLI (--json), ExecuTorch through the Python API; both checked on new sentences."""
    out = tmp_path / fmt
    if fmt == "onnx":
        assert main(["export", "minilm-l6", "--format", "onnx", "-o", str(out), "--json"]) == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["format"] == "onnx" and line["files"]["model.onnx"] > 80e6 and line["parity_max_abs"] < 1e-4
        art = edgetk.artifact.Artifact.load(out)
    else:
        art = edgetk.export(minilm, format=fmt, out=out)
    assert art.manifest["parity"]["outputs"]["output"]["max_abs"] < 1e-4
    batch = minilm.tokenizer.batch(["A phone runs this encoder.", "Compressed models fit on the edge."],
                                   max_length=16, pad_to=16)
    sess = Session(art)
    for i in range(2):
        ids, mask = batch["input_ids"][i:i + 1], batch["attention_mask"][i:i + 1]
        got = sess.run([ids, mask])[0]
        with torch.no_grad():
            ref = minilm.model(ids, mask).numpy()
        assert float(np.dot(got[0], ref[0])) > 0.9999
