"""`edgetk::tree_verify`: accept the longest draft-tree path the target model agrees with (Token Recycling,
ADED, Medusa-style tree attention).

Inputs (one draft tree of T nodes, node 0 = the root = the last token already generated, whose logits
predict the first new token; nodes are in breadth-first order so parents[i] < i):
* `logits`   float [T, V]: the target model's logits at every node (computed with a tree attention mask).
* `tokens`   int64 [T]: the draft token of each node (tokens[0] is the root's token, not a draft);
             a negative token disables the node (never accepted).
* `parents`  int64 [T]: parent node index, -1 for the root.
* `u_accept` float [T]: uniforms in [0, 1) (sampling only): node i's acceptance test uses u_accept[i].
* `u_sample` float [T]: uniforms (sampling only): the residual draw after the last accepted node j uses u_sample[j].
* `temperature`, `top_p`, `greedy`.

Greedy: at the current node (start at the root) the target token is argmax(logits); if a child carries
that token the walk moves to the first such child, else it stops; `next` = argmax at the last node.
Sampling (lossless for deterministic drafts, SpecInfer's multi-candidate rejection): p = the target
distribution at the node (temperature, then top-p); children c_1..c_n in index order are tried in turn,
child c accepted if u_accept[c] < p(token_c) / sum(p); a rejected token's probability is set to 0 (the
residual). With no child accepted, `next` is drawn from the residual by inverse CDF with u_sample.
Every emitted token is then distributed exactly as the target model's sampling distribution.

Returns (path int64 [T]: accepted node indices starting with 0 (the root), padded with -1;
         next int64 [1]: the token that follows the accepted path).
"""
from __future__ import annotations

import torch

from . import table

OP = "tree_verify"


def target_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The target sampling distribution over the last dim (temperature, then nucleus top-p)."""
    p = torch.softmax(logits.float() / max(temperature, 1e-6), -1)
    if top_p < 1.0:
        sp, idx = p.sort(-1, descending=True)
        keep = (sp.cumsum(-1) - sp) < top_p  # smallest prefix whose mass reaches top_p
        p = torch.zeros_like(p).scatter(-1, idx, sp * keep)
        p = p / p.sum(-1, keepdim=True)
    return p


def _children(parents: list[int]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in parents]
    for i, par in enumerate(parents):
        if par >= 0:
            kids[par].append(i)
    return kids


def tree_verify_reference(logits, tokens, parents, u_accept, u_sample, temperature: float, top_p: float,
                          greedy: bool):
    t = logits.shape[0]
    par = parents.tolist()
    tok = tokens.tolist()
    kids = _children(par)
    path = [0]
    node = 0
    while True:
        if greedy:
            target = int(logits[node].argmax())
            nxt = next((c for c in kids[node] if tok[c] == target and tok[c] >= 0), None)
            if nxt is None:
                out_next = target
                break
        else:
            p = target_probs(logits[node], temperature, top_p)
            nxt = None
            for c in kids[node]:
                if tok[c] < 0:  # a disabled node
                    continue
                mass = float(p.sum())
                if mass > 0 and float(u_accept[c]) < float(p[tok[c]]) / mass:
                    nxt = c
                    break
                p[tok[c]] = 0.0
            if nxt is None:
                cdf = p.cumsum(0)
                total = float(cdf[-1])
                if total <= 0:  # every candidate took all the mass (cannot happen for exact probs)
                    out_next = int(logits[node].argmax())
                else:
                    u = float(u_sample[node]) * total
                    out_next = int(torch.searchsorted(cdf, torch.tensor([u]), right=True).clamp(max=p.numel() - 1))
                break
        path.append(nxt)
        node = nxt
    out = torch.full((t,), -1, dtype=torch.int64)
    out[: len(path)] = torch.tensor(path)
    return out, torch.tensor([out_next], dtype=torch.int64)


table.register(OP, "cpu", "eager", "reference", tree_verify_reference, priority=0)


@torch.library.custom_op("edgetk::tree_verify", mutates_args=())
def tree_verify(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor, u_accept: torch.Tensor,
                u_sample: torch.Tensor, temperature: float, top_p: float,
                greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    impl = table.select(OP, "cpu", "eager").fn
    return impl(logits, tokens, parents, u_accept, u_sample, temperature, top_p, greedy)


@tree_verify.register_fake
def _(logits, tokens, parents, u_accept, u_sample, temperature, top_p, greedy):
    t = logits.shape[0]
    return tokens.new_empty((t,), dtype=torch.int64), tokens.new_empty((1,), dtype=torch.int64)
