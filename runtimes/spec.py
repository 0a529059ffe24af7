"""Lossless speculative decoding without a draft model: Token Recycling and ADED-style tri-gram drafts.

One step: the pending token (generated, not yet in the KV cache) is the root of a draft tree built
breadth-first from a static template; the whole tree goes through the decoder in ONE forward pass
(tree attention: each node sees the committed cache and its own ancestors, at RoPE position
L + depth, in consecutive cache slots L..L+T-1); `edgetk::tree_verify` picks the longest path the
target agrees with plus the next token; the accepted nodes' KV entries are compacted to slots
L..L+m and the rest forgotten. Greedy output equals plain greedy decoding token for token; sampling
keeps the target distribution (multi-candidate rejection sampling, see kernels/tree_verify.py).

* Token Recycling (Luo et al. 2024): an adjacency matrix [V, k] holds, for every token, the top-k
  successors the model predicted the last time it processed that token; every forward pass recycles
  its logits into the matrix. Drafts for a node = the matrix row of its token.
* ADED-style (Liu et al. 2024): a tri-gram table (previous token, token) -> top-k successors, filled
  from the model's outputs and from the accepted text (the observed continuation moves to rank 0);
  falls back to the bigram matrix when a pair has not been seen.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Callable

import torch

from edgetk.config import Config, check, config
from edgetk.kernels import tree_verify as _tv  # noqa: F401  (registers edgetk::tree_verify)

METHODS = ("recycling", "aded")
# assumed acceptance probability of the draft of rank r (used only to shape the default template)
_RANK_P = (0.55, 0.14, 0.07, 0.045, 0.03, 0.022, 0.017, 0.013)


@config("spec", version=1)
@dataclass(frozen=True)
class SpecConfig(Config):
    method: str = "recycling"
    top_k: int = 8  # successors kept per token
    # draft nodes in the tree (the root excluded). 4 on CPU: a 5-token step costs about one token's step there
    # (kernels/few_rows_linear.py) while bigger trees cost more than they add (benchmarks/spec.py; 24 suits GPUs)
    max_nodes: int = 4
    max_depth: int = 6
    template: tuple = ()  # explicit tree: rank paths like ((0,), (1,), (0, 0)); empty = built from the above
    persist: bool = True  # keep the drafter's tables across generations of one LLM (they only get better)

    def validate(self) -> None:
        check(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        check(1 <= self.top_k <= 64, "top_k", self.top_k, "in [1, 64]")
        check(1 <= self.max_nodes <= 256, "max_nodes", self.max_nodes, "in [1, 256]")
        check(1 <= self.max_depth <= 32, "max_depth", self.max_depth, "in [1, 32]")
        for path in self.template:
            check(len(path) >= 1 and all(0 <= r < self.top_k for r in path), "template", path,
                  f"rank paths with ranks < top_k={self.top_k}")


@dataclass(frozen=True)
class Tree:
    """A static tree template: node 0 is the root; nodes in breadth-first order."""

    paths: tuple  # rank path per node (root: ())
    parents: torch.Tensor  # int64 [T]
    ranks: torch.Tensor  # int64 [T] (root: 0)
    depth: torch.Tensor  # int64 [T]
    ancestors: torch.Tensor  # bool [T, T]: ancestors[i, j] = j is i or an ancestor of i
    levels: tuple  # node indices per depth >= 1

    @property
    def size(self) -> int:
        return len(self.paths)


def default_template(top_k: int, max_nodes: int, max_depth: int) -> list[tuple]:
    """The max_nodes rank paths of highest assumed acceptance, best first (prefix-closed: a path
    always scores below its prefix)."""
    p = list(_RANK_P[:top_k]) + [_RANK_P[-1] * 0.7 ** i for i in range(1, top_k - len(_RANK_P) + 1)]
    cost = [-math.log(x) for x in p]
    heap = [(cost[r], (r,)) for r in range(top_k)]
    heapq.heapify(heap)
    chosen: list[tuple] = []
    while heap and len(chosen) < max_nodes:
        c, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < max_depth:
            for r in range(top_k):
                heapq.heappush(heap, (c + cost[r], path + (r,)))
    return chosen


def build_tree(paths: list[tuple]) -> Tree:
    paths = [()] + sorted(set(paths), key=lambda q: (len(q), q))
    index = {q: i for i, q in enumerate(paths)}
    for q in paths[1:]:
        if q[:-1] not in index:
            raise ValueError(f"tree template path {q} lacks its prefix {q[:-1]}")
    t = len(paths)
    parents = torch.tensor([-1] + [index[q[:-1]] for q in paths[1:]], dtype=torch.int64)
    ranks = torch.tensor([0] + [q[-1] for q in paths[1:]], dtype=torch.int64)
    depth = torch.tensor([len(q) for q in paths], dtype=torch.int64)
    anc = torch.zeros(t, t, dtype=torch.bool)
    for i, q in enumerate(paths):
        for d in range(len(q) + 1):
            anc[i, index[q[:d]]] = True
    levels = tuple(torch.nonzero(depth == d).flatten() for d in range(1, int(depth.max()) + 1))
    return Tree(tuple(paths), parents, ranks, depth, anc, levels)


def tree_for(cfg: SpecConfig) -> Tree:
    return build_tree(list(cfg.template) or default_template(cfg.top_k, cfg.max_nodes, cfg.max_depth))


# -- drafters -------------------------------------------------------------------------------------
class RecyclingDrafter:
    """Token Recycling: adjacency matrix of top-k successors, refreshed by every forward pass."""

    def __init__(self, vocab: int, top_k: int, tree: Tree):
        self.k, self.tree = top_k, tree
        self.adj = torch.zeros(vocab, top_k, dtype=torch.int64)

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor, prev: torch.Tensor | None = None) -> None:
        """tokens [n] processed with logits [n, V] (prev [n]: the token before each, for tri-grams)."""
        self.adj[tokens] = logits.topk(self.k, -1).indices

    def accept(self, history: list[int]) -> None:
        """Tokens just committed (the text itself); the bigram matrix learns only from logits."""

    def draft(self, root: int, prev: int) -> torch.Tensor:
        tr = self.tree
        tokens = torch.empty(tr.size, dtype=torch.int64)
        tokens[0] = root
        for lv in tr.levels:  # breadth-first: parents of a level are filled already
            tokens[lv] = self.adj[tokens[tr.parents[lv]], tr.ranks[lv]]
        return tokens


class TrigramDrafter(RecyclingDrafter):
    """ADED-style: (previous token, token) -> top-k successors, bigram matrix as fallback."""

    def __init__(self, vocab: int, top_k: int, tree: Tree):
        super().__init__(vocab, top_k, tree)
        self.tri: dict[tuple[int, int], list[int]] = {}

    def observe(self, tokens, logits, prev=None):
        top = logits.topk(self.k, -1).indices
        self.adj[tokens] = top
        if prev is not None:
            for a, b, row in zip(prev.tolist(), tokens.tolist(), top.tolist()):
                self.tri[(a, b)] = row

    def accept(self, history: list[int]) -> None:
        for a, b, c in zip(history, history[1:], history[2:]):
            row = self.tri.get((a, b))
            if row is None:
                self.tri[(a, b)] = [c] + [int(x) for x in self.adj[b][: self.k - 1] if int(x) != c][: self.k - 1]
            elif row[0] != c:
                self.tri[(a, b)] = [c] + [x for x in row if x != c][: self.k - 1]

    def draft(self, root: int, prev: int) -> torch.Tensor:
        tr = self.tree
        toks = [root] + [0] * (tr.size - 1)
        before = [prev] + [0] * (tr.size - 1)
        par, rk = tr.parents.tolist(), tr.ranks.tolist()
        for i in range(1, tr.size):
            p = par[i]
            row = self.tri.get((before[p], toks[p]))
            toks[i] = row[rk[i]] if row is not None and rk[i] < len(row) else int(self.adj[toks[p], rk[i]])
            before[i] = toks[p]
        return torch.tensor(toks, dtype=torch.int64)


def _check_finite(logits: torch.Tensor) -> None:
    if not torch.isfinite(logits).all():
        from .llm import NonFiniteLogitsError

        raise NonFiniteLogitsError("the model produced non-finite logits (NaN or Inf) on a draft tree",
                                   hint="the weights are broken or overflowed; check with `edgetk eval`")


DRAFTERS: dict[str, Callable[[int, int, Tree], RecyclingDrafter]] = {
    "recycling": RecyclingDrafter, "aded": TrigramDrafter}


@dataclass
class StepOutcome:
    tokens: list[int]  # emitted this step: accepted drafts then the next token
    accepted: int  # accepted draft tokens (excluding the next token)


class SpeculativeStepper:
    """Runs speculative steps over a decoder backend (see runtimes/llm.py `Decoder`)."""

    def __init__(self, backend, cfg: SpecConfig, vocab: int):
        self.backend, self.cfg = backend, cfg
        self.tree = tree_for(cfg)
        self.drafter = DRAFTERS[cfg.method](vocab, cfg.top_k, self.tree)

    @property
    def tree_size(self) -> int:
        return self.tree.size

    @staticmethod
    def tree_size_for(cfg: SpecConfig) -> int:
        return tree_for(cfg).size

    def prime(self, prompt: list[int], logits: torch.Tensor) -> None:
        """Learn from the prefill pass: logits [n, V] of the prompt tokens."""
        ids = torch.tensor(prompt)
        prev = torch.cat([ids[:1], ids[:-1]])
        self.drafter.observe(ids, logits, prev)
        self.drafter.accept(prompt)

    def step(self, length: int, root: int, prev: int, sample) -> StepOutcome:
        """One draft-verify step; `length` committed slots, `root` the pending token. `sample` is None
        for greedy, else (temperature, top_p, generator)."""
        tr = self.tree
        tokens = self.drafter.draft(root, prev)
        mask = self.backend.tree_mask(length, tr.ancestors)
        logits = self.backend.forward(tokens, length, attn_mask=mask, rope_pos=length + tr.depth)
        _check_finite(logits)
        # nodes deeper than the cache can serve exactly (quantized-cache flush boundary) never match
        vt = torch.where(tr.depth > self.backend.depth_limit(length), -1, tokens)
        if sample is None:
            u = torch.zeros(tr.size)
            path, nxt = torch.ops.edgetk.tree_verify(logits, vt, tr.parents, u, u, 1.0, 1.0, True)
        else:
            temp, top_p, gen = sample
            ua, us = torch.rand(tr.size, generator=gen), torch.rand(tr.size, generator=gen)
            path, nxt = torch.ops.edgetk.tree_verify(logits, vt, tr.parents, ua, us, temp, top_p, False)
        path = path[path >= 0]
        prev_tok = torch.cat([torch.tensor([prev]), tokens[tr.parents[1:]]])
        self.drafter.observe(tokens, logits, prev_tok)
        self.backend.compact([length + int(i) for i in path], length)
        accepted = tokens[path].tolist()  # root first
        self.drafter.accept([prev] + accepted + [int(nxt)])
        return StepOutcome(accepted[1:] + [int(nxt)], len(path) - 1)
