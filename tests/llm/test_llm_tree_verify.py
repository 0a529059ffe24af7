"""edgetk::tree_verify: greedy longest path, and sampling that keeps the target distribution (statistical)."""
from __future__ import annotations

import torch

from edgetk.kernels import table
from edgetk.kernels.tree_verify import target_probs

# tree: 0 root; 1 (tok 0), 2 (tok 1) children of root; 3 (tok 2) child of 1; 4 (tok 3) child of 3
PARENTS = torch.tensor([-1, 0, 0, 1, 3])
TOKENS = torch.tensor([9, 0, 1, 2, 3])


def _verify(logits, tokens, ua, us, greedy, temperature=1.0, top_p=1.0):
    return torch.ops.edgetk.tree_verify(logits, tokens, PARENTS, ua, us, temperature, top_p, greedy)


def _logits(v=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, v, generator=g) * 1.5


def test_greedy_walks_longest_agreeing_path():
    lg = torch.full((5, 5), -5.0)
    lg[0, 0] = lg[1, 2] = lg[3, 4] = 5.0  # root predicts 0 (node 1), node 1 predicts 2 (node 3), node 3 -> 4
    z = torch.zeros(5)
    path, nxt = _verify(lg, TOKENS, z, z, True)
    assert path.tolist() == [0, 1, 3, -1, -1] and nxt.item() == 4  # node 4 drafts 3, target said 4
    lg[0, 0], lg[0, 1] = -5.0, 5.0  # now the root wants token 1 (node 2, a leaf)
    path, nxt = _verify(lg, TOKENS, z, z, True)
    assert path.tolist()[:2] == [0, 2] and nxt.item() == int(lg[2].argmax())
    disabled = TOKENS.clone()
    disabled[2] = -1  # a disabled node is never accepted
    path, nxt = _verify(lg, disabled, z, z, True)
    assert path.tolist()[:2] == [0, -1] and nxt.item() == 1


def test_sampling_keeps_the_target_distribution():
    """Small vocabulary (5), 20k verifications: the first emitted token ~ p(root), and the second given an
    accepted first draft 0 ~ p(node 1). Total-variation distance must stay at sampling-noise level."""
    lg = _logits()
    temp, top_p = 0.9, 0.95
    gen = torch.Generator().manual_seed(0)
    n = 20000
    first = torch.zeros(5)
    second = torch.zeros(5)
    for _ in range(n):
        ua, us = torch.rand(5, generator=gen), torch.rand(5, generator=gen)
        path, nxt = _verify(lg, TOKENS, ua, us, False, temp, top_p)
        p = path[path >= 0].tolist()
        emitted = [int(TOKENS[i]) for i in p[1:]] + [int(nxt)]
        first[emitted[0]] += 1
        if len(p) >= 2 and p[1] == 1:
            second[emitted[1]] += 1
    p1 = target_probs(lg[0], temp, top_p)
    p2 = target_probs(lg[1], temp, top_p)
    tv1 = 0.5 * (first / n - p1).abs().sum().item()
    tv2 = 0.5 * (second / second.sum() - p2).abs().sum().item()
    assert tv1 < 0.015, (first / n, p1)
    # draft 0 is accepted about p(root)[0] (~4.7%) of the time: ~950 conditional samples
    assert second.sum() > 500 and tv2 < 0.03, (second / second.sum(), p2)
    assert first[p1 == 0].sum() == 0  # top-p excluded tokens never come out


def test_reference_registered():
    assert "reference" in {e.name for e in table.entries("tree_verify")}
