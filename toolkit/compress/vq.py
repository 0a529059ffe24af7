"""Vector quantization of linear layers with learned codebooks and mappings (VPTQ, AQLM, PV-Tuning, JLCM).

Per layer W [out, in] with the calibration Hessian H = XᵀX of its inputs:

1. outliers (optional): the `outliers` input columns with the largest diag(H)·‖W[:, c]‖² stay fp16;
   they are processed last by the error feedback, so they absorb part of the other columns' error;
2. per-output-channel scale s (row RMS); the normalized rows are cut into vectors of `vec_len` input columns;
3. codebook init: k-means weighted by s_r²·diag(H) (one codebook per group of output rows; residual
   stages are initialised on the previous stage's k-means residual);
4. VPTQ/GPTQ assignment: vectors column-block by column-block, each picked in the metric of its block of
   the inverse Hessian's Cholesky factor, and its error fed back to the columns not yet quantized;
5. refinement (JLCM / PV-Tuning style), `refine_rounds` times: scales in closed form, codebooks by conjugate
   gradient on the layer output loss tr(ΔHΔᵀ), then a discrete coordinate-descent sweep that re-assigns
   a code only where it lowers that loss;
6. block stage: codebooks and scales of all the block's layers tuned by Adam on the block's output MSE
   against the fp block on the same inputs, then a discrete re-assignment accepted only if the block loss
   drops;
7. end-to-end stage (`e2e_steps`, vq_finetune.py): after all blocks, codebooks, scales, outliers and RMSNorm
   weights of the whole model tuned by Adam on the KL divergence from the fp model's next-token distribution
   (AQLM's global fine-tuning, PV-Tuning's continuous step); kept only if the held-out KL drops. With
   `e2e_code_every` > 0 the codes move too (PV-Tuning's discrete step): latent weights take the same Adam
   steps and every that many steps at most `e2e_code_frac` of each layer's codes switch to the codeword
   nearest their latent weight (`e2e_code_reset`: the latent weights then restart there). The training
   passes run in bf16 autocast where oneDNN has bf16 matmuls (`ft_precision="auto"`: AMX / AVX-512 hosts, 2-3x
   faster; float32 elsewhere; the keep/undo decision is always measured in float32), so the result of the -ft
   presets depends on the host's ISA.

Blocks are processed one at a time (`BlockRunner`): only one block and its calibration activations live.
The end-to-end stage is the exception: it needs the whole model and an fp copy (the teacher) in memory, so
it refuses blocks streamed from disk.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from edgetk.kernels.codebook_gemm import CodebookFormat

from ..config import Config, check, config
from ..errors import ConfigError
from ..progress import track
from . import CompressionReport, LayerReport, register_method, register_preset
from .calib import (QUANT_LINEARS, BlockRunner, argmin_last, block_hessians, block_loss, check_finite, chol_inv_upper,
                    kmeans, param_count, segment_sum, set_module, take_windows, weight_totals)
from .vq_finetune import PRECISIONS, SCHEDULES, finetune_vq_model, teacher_copy
from .vq_linear import VQLinear, fp16_scale


@config("vq", version=1)
@dataclass(frozen=True)
class VQConfig(Config):
    vec_len: int = 4
    codebook_size: int = 256
    stages: int = 1  # residual codebooks (each adds log2(K)/vec_len bits per weight)
    groups: int = 1  # groups of output channels sharing one codebook
    outliers: int = 0  # input columns kept in fp16
    scale: bool = True  # per-output-channel scale
    kmeans_iters: int = 12
    damp: float = 0.01
    refine_rounds: int = 2
    cg_iters: int = 8
    block_steps: int = 0  # Adam steps on the block output loss (0 = off)
    block_lr: float = 1e-3
    block_batch: int = 4
    e2e_steps: int = 0  # Adam steps of end-to-end distillation (KL to the fp model) after all blocks (0 = off)
    e2e_lr: float = 1e-4
    e2e_batch: int = 2
    e2e_norms: bool = True  # also tune the RMSNorm weights (fp, not counted in the quantized layers' bits)
    e2e_embed: bool = False  # also tune the fp token embedding / head (stored as they are: no bits change)
    e2e_code_every: int = 0  # every N end-to-end steps, re-encode codes from their latent weights (0 = off)
    e2e_code_frac: float = 0.01  # at most this fraction of a layer's codes switch per re-encoding
    e2e_code_lr: float = 1.0  # the latent weights' learning rate, relative to e2e_lr (codebook units)
    e2e_code_reset: bool = False  # after each re-encoding the latent weights restart on the chosen codewords
    e2e_schedule: str = "constant"  # learning rate after the 10 % warm-up: "constant" or "cosine" (decays to 0)
    # matmul precision of the end-to-end training passes: "auto" = bfloat16 where oneDNN has bf16 kernels
    # (x86 with AVX-512 / AMX: 2-3x faster), else float32
    ft_precision: str = "auto"
    calib_samples: int = 64  # calibration windows used (of those drawn)
    # windows the end-to-end stage trains on (compress draws as many unless told fewer; 0 = calib_samples):
    # the layer stage's Hessians need few, the distillation overfits few
    e2e_samples: int = 0
    seed: int = 0
    layers: tuple = QUANT_LINEARS
    # per-layer formats, e.g. ("self_attn.v_proj:vec_len=2,codebook_size=64",): that layer (in every block) takes
    # these fields instead (vec_len, codebook_size, stages, groups, outliers) - bits where they matter most; a
    # block index in front ("3.mlp.down_proj:...") makes the entry for that block only (it wins over the plain one)
    overrides: tuple = ()
    # per-(block, layer) format search (EvoPress, vq_search.py): with search_bpw > 0, before quantizing, every
    # layer of every block may take one of the `search_alt` formats (';' between several, e.g.
    # "vec_len=4,codebook_size=256;vec_len=2,codebook_size=256") instead of its own, chosen by an evolutionary
    # search that minimises the KL to the fp model on calibration windows with the quantized layers' bits per
    # weight at most search_bpw (the start: the config's own formats, which must fit)
    search_bpw: float = 0.0
    search_alt: str = "vec_len=2,codebook_size=64"
    search_generations: int = 120
    search_offspring: int = 8
    search_survivors: int = 2
    search_samples: int = 4  # calibration windows (the last ones) scoring the fitness
    search_tokens: int = 256
    needs_calibration = True

    @property
    def calib_windows(self) -> int:
        """Calibration windows this config reads (the layer stage's, or the end-to-end stage's if more)."""
        return max(self.calib_samples, self.e2e_samples if self.e2e_steps else 0)

    def validate(self) -> None:
        check(1 <= self.vec_len <= 32, "vec_len", self.vec_len, "in [1, 32]")
        check(2 <= self.codebook_size <= 65536, "codebook_size", self.codebook_size, "in [2, 65536]")
        check(1 <= self.stages <= 4, "stages", self.stages, "in [1, 4]")
        check(self.groups >= 1, "groups", self.groups, ">= 1")
        check(self.outliers >= 0, "outliers", self.outliers, ">= 0")
        check(self.kmeans_iters >= 1, "kmeans_iters", self.kmeans_iters, ">= 1")
        check(0 <= self.damp < 1, "damp", self.damp, "in [0, 1)")
        check(self.refine_rounds >= 0 and self.cg_iters >= 0 and self.block_steps >= 0, "refine_rounds",
              self.refine_rounds, "non-negative (also cg_iters, block_steps)")
        check(self.e2e_steps >= 0 and self.e2e_batch >= 1 and self.e2e_lr > 0, "e2e_steps", self.e2e_steps,
              "non-negative, with e2e_batch >= 1 and e2e_lr > 0")
        check(self.calib_samples >= 1, "calib_samples", self.calib_samples, ">= 1")
        check(self.e2e_samples >= 0, "e2e_samples", self.e2e_samples, ">= 0 (0 = calib_samples)")
        check(self.e2e_code_every >= 0, "e2e_code_every", self.e2e_code_every, ">= 0")
        check(0 < self.e2e_code_frac <= 1, "e2e_code_frac", self.e2e_code_frac, "in (0, 1]")
        check(self.e2e_code_lr > 0, "e2e_code_lr", self.e2e_code_lr, "> 0")
        check(self.e2e_schedule in SCHEDULES, "e2e_schedule", self.e2e_schedule, f"one of {SCHEDULES}")
        check(self.ft_precision in ("auto", *PRECISIONS), "ft_precision", self.ft_precision,
              f"one of {('auto', *PRECISIONS)}")
        unknown = [n for n in self.layers if n not in QUANT_LINEARS]
        check(not unknown, "layers", self.layers, f"names among {QUANT_LINEARS}")
        check(self.search_bpw >= 0, "search_bpw", self.search_bpw, ">= 0 (0 = no format search)")
        for name in ("search_generations", "search_offspring", "search_survivors", "search_samples",
                     "search_tokens"):
            check(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
        check(self.search_survivors <= self.search_offspring, "search_survivors", self.search_survivors,
              f"<= search_offspring={self.search_offspring}")
        if self.search_bpw:
            try:
                for fields in self.alt_formats():
                    dataclasses.replace(self, overrides=(), search_bpw=0.0, **fields)
            except ConfigError as exc:
                raise ConfigError(f"config field 'search_alt' {self.search_alt!r}: {exc.args[0]}",
                                  hint="give 'field=value,...' (';' between formats) with fields among "
                                  + ", ".join(OVERRIDABLE)) from None
        for item, fields in zip(self.overrides, self._overrides().values()):  # one parsed entry per item
            try:
                dataclasses.replace(self, overrides=(), **fields)  # validates the layer's config
            except ConfigError as exc:
                raise ConfigError(f"config field 'overrides' entry {item!r}: {exc.args[0]}",
                                  hint="fix that entry of 'overrides'") from None

    def _overrides(self) -> dict[str, dict[str, int]]:
        """{layer name or "block.layer": {field: value}} from `overrides` ("name:field=value,..."), checked."""
        out = {}
        for item in self.overrides:
            name, sep, body = str(item).partition(":")
            head, dot, rest = name.partition(".")
            layer = rest if head.isdigit() and dot else name
            check(layer in QUANT_LINEARS and sep, "overrides", item,
                  f"'layer:field=value,...' or 'block.layer:...' with a layer among {QUANT_LINEARS}")
            check(name not in out, "overrides", item, "one entry per layer (and block)")
            out[name] = _fields(body, "overrides", item)
        return out

    def alt_formats(self) -> list[dict[str, int]]:
        """The fields of each `search_alt` format (';' between formats), checked."""
        return [_fields(body, "search_alt", self.search_alt) for body in str(self.search_alt).split(";")]

    def for_layer(self, name: str, block: int | None = None) -> "VQConfig":
        """The config of layer `name` (e.g. "mlp.down_proj") in block `block`: this one with its override
        applied (an entry for that block wins over the plain one)."""
        ov = self._overrides()
        o = ov.get(f"{block}.{name}") if block is not None else None
        o = o if o is not None else ov.get(name)
        return dataclasses.replace(self, overrides=(), search_bpw=0.0, **o) if o else self

    @property
    def code_bits(self) -> int:
        return max(1, (self.codebook_size - 1).bit_length())

    def format_for(self, out_f: int, in_f: int) -> CodebookFormat:
        groups = self.groups if out_f % self.groups == 0 else 1
        n_out = min(self.outliers, in_f - 1)
        return CodebookFormat(out_features=out_f, in_features=in_f, vec_len=self.vec_len, code_bits=self.code_bits,
                              codebook_size=self.codebook_size, stages=self.stages, groups=groups,
                              n_outliers=n_out, has_scale=self.scale, has_bias=False)


OVERRIDABLE = ("vec_len", "codebook_size", "stages", "groups", "outliers")


def _fields(body: str, field: str, item) -> dict[str, int]:
    """"vec_len=2,codebook_size=64" -> {"vec_len": 2, "codebook_size": 64}, checked (config field `field`)."""
    parts = [kv for kv in str(body).split(",") if kv]
    fields = dict(kv.split("=", 1) for kv in parts if "=" in kv)
    check(parts and len(fields) == len(parts), field, item, "'field=value,...' entries")
    unknown = sorted(set(fields) - set(OVERRIDABLE))
    check(not unknown, field, item, f"fields among {OVERRIDABLE}")
    try:
        return {k: int(v) for k, v in fields.items()}
    except ValueError:
        check(False, field, item, "integer values")


# -- one layer ---------------------------------------------------------------------------------------
@dataclass
class LayerProblem:
    """A layer in "GPTQ order": quantized columns (padded to n_vec*v) first, outlier columns last."""
    w: torch.Tensor  # [out, n] original weights (W space)
    h: torch.Tensor  # [n, n] Hessian (damped), float32
    fmt: CodebookFormat
    perm: torch.Tensor  # stored input order (outliers first) or empty
    nq: int  # padded number of quantized columns
    order: torch.Tensor  # original column of each unpadded GPTQ-order column

    def dense(self, what: torch.Tensor) -> torch.Tensor:
        """GPTQ-order (padded) weights -> [out, in] in the original column order."""
        f = self.fmt
        wg = torch.cat([what[:, :f.in_q], what[:, self.nq:]], 1)
        return wg[:, torch.argsort(self.order)]

    def loss(self, what: torch.Tensor) -> float:
        d = self.w - what
        return float(((d @ self.h) * d).sum())

    def ref(self) -> float:
        return float(((self.w @ self.h) * self.w).sum())


def _problem(w: torch.Tensor, h: torch.Tensor, fmt: CodebookFormat, damp: float) -> LayerProblem:
    w, h = w.float().clone(), h.float().clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    n_out = fmt.n_outliers
    if n_out:
        imp = torch.diag(h) * w.pow(2).sum(0)
        out_cols = imp.topk(n_out).indices.sort().values
        keep = torch.ones(w.shape[1], dtype=torch.bool)
        keep[out_cols] = False
        perm = torch.cat([out_cols, keep.nonzero().flatten()])
        order = torch.cat([perm[n_out:], perm[:n_out]])
    else:
        perm = torch.zeros(0, dtype=torch.long)
        order = torch.arange(w.shape[1])
    w, h = w[:, order], h[order][:, order]
    order = order.clone()
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0])
    nq = fmt.n_vec * fmt.vec_len
    pad = nq - fmt.in_q
    if pad:  # zero columns, inputs padded with zeros by the op: no interaction, tiny weight
        n = w.shape[1]
        w = torch.cat([w[:, :fmt.in_q], w.new_zeros(w.shape[0], pad), w[:, fmt.in_q:]], 1)
        h2 = h.new_zeros(n + pad, n + pad)
        qi = torch.cat([torch.arange(fmt.in_q), torch.arange(nq, n + pad)])
        h2[qi[:, None], qi[None, :]] = h
        h2[torch.arange(fmt.in_q, nq), torch.arange(fmt.in_q, nq)] = torch.diag(h).mean() * 1e-4
        h = h2
    return LayerProblem(w, h, fmt, perm, nq, order)


@dataclass
class LayerState:
    codes: torch.Tensor  # long [S, out, n_vec]
    cbs: torch.Tensor  # float [S, G, K, v]
    s: torch.Tensor  # [out]
    outl: torch.Tensor  # [out, n_outliers] W-space values of the outlier columns

    def qn(self) -> torch.Tensor:
        """normalized quantized part [out, nq]"""
        S, out, nv = self.codes.shape
        G = self.cbs.shape[1]
        g = (torch.arange(out) // (out // G))[:, None]
        return sum(self.cbs[s][g, self.codes[s]] for s in range(S)).reshape(out, -1)

    def what(self) -> torch.Tensor:
        return torch.cat([self.s[:, None] * self.qn(), self.outl], 1)


def _nearest(t: torch.Tensor, a: torch.Tensor, cbs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual nearest codewords of rows t [out, v] in the metric of `a` [v, v]."""
    S, G, K, v = cbs.shape
    out = t.shape[0]
    r = (t @ a).view(G, out // G, v)
    q = t.new_zeros(G, out // G, v)
    idx = torch.empty(S, out, dtype=torch.long)
    for s in range(S):
        ca = cbs[s] @ a  # [G, K, v]
        rhs = torch.cat([-2 * ca, (ca * ca).sum(-1, keepdim=True)], -1).transpose(1, 2).contiguous()  # [G, v+1, K]
        k = argmin_last(torch.cat([r, torch.ones_like(r[..., :1])], -1) @ rhs)  # [G, rows]
        sel = torch.gather(cbs[s], 1, k[..., None].expand(-1, -1, v))
        q += sel
        r = r - sel @ a
        idx[s] = k.reshape(-1)
    return idx, q.reshape(out, v)


def gptq_assign(p: LayerProblem, u: torch.Tensor, cbs: torch.Tensor, s: torch.Tensor, block: int = 128):
    """VPTQ-style assignment with second-order error feedback; returns (codes, updated outlier columns)."""
    v, nq = p.fmt.vec_len, p.nq
    w = p.w / torch.cat([s[:, None].expand(-1, nq), torch.ones_like(p.w[:, nq:])], 1)
    n_vec = nq // v
    diag = u[:nq, :nq].reshape(n_vec, v, n_vec, v).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    a_all = torch.linalg.inv(diag)  # [n_vec, v, v]
    codes = torch.empty(cbs.shape[0], w.shape[0], n_vec, dtype=torch.long)
    block = max(v, block // v * v)
    for b0 in range(0, nq, block):
        b1 = min(b0 + block, nq)
        err = torch.empty(w.shape[0], b1 - b0)
        for j0 in range(b0, b1, v):
            j1, j = j0 + v, j0 // v
            idx, q = _nearest(w[:, j0:j1], a_all[j], cbs)
            codes[:, :, j] = idx
            e = (w[:, j0:j1] - q) @ a_all[j]
            err[:, j0 - b0:j1 - b0] = e
            w[:, j1:b1] -= e @ u[j0:j1, j1:b1]
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return codes, w[:, nq:].clone()


def init_layer(p: LayerProblem, cfg: VQConfig, gen: torch.Generator) -> LayerState:
    f = p.fmt
    wq = p.w[:, :p.nq]
    s = wq[:, :f.in_q].pow(2).mean(1).sqrt().clamp_min(1e-8) if f.has_scale else torch.ones(wq.shape[0])
    wn = wq / s[:, None]
    v, G, K = f.vec_len, f.groups, f.codebook_size
    elw = (s[:, None] ** 2) * torch.diag(p.h)[None, :p.nq]
    x = wn.reshape(G, -1, v)  # rows of a group are contiguous
    wt = elw.reshape(G, -1, v)
    cbs = torch.empty(f.stages, G, K, v)
    for g in range(G):
        r = x[g]
        for st in range(f.stages):
            c, a = kmeans(r, wt[g], K, cfg.kmeans_iters, gen)
            cbs[st, g] = c
            r = r - c[a]
    u = chol_inv_upper(p.h)
    codes, outl = gptq_assign(p, u, cbs, s)
    return LayerState(codes, cbs, s, outl)


# -- refinement ----------------------------------------------------------------------------------------
def _scale_step(p: LayerProblem, st: LayerState) -> None:
    qn = torch.cat([st.qn(), torch.zeros_like(st.outl)], 1)
    d = p.w - torch.cat([torch.zeros_like(p.w[:, :p.nq]), st.outl], 1)
    qh = qn @ p.h
    st.s = ((d * qh).sum(1) / (qn * qh).sum(1).clamp_min(1e-12)).clamp_min(1e-8)


def _m(st: LayerState, cbs: torch.Tensor) -> torch.Tensor:
    return st.s[:, None] * LayerState(st.codes, cbs, st.s, st.outl).qn()


def _mt(st: LayerState, y: torch.Tensor) -> torch.Tensor:
    S, out, nv = st.codes.shape
    _, G, K, v = st.cbs.shape
    ys = (y * st.s[:, None]).reshape(out, nv, v)
    g = (torch.arange(out) // (out // G))[:, None] * K
    res = torch.stack([segment_sum((g + st.codes[s]).reshape(-1), ys.reshape(-1, v), G * K) for s in range(S)])
    return res.view(S, G, K, v)


def _codebook_step(p: LayerProblem, st: LayerState, iters: int) -> None:
    """Conjugate gradient on the normal equations Mᵀ(M(C) H) = Mᵀ(R H) (quadratic in the codebooks)."""
    nq = p.nq
    hq = p.h[:nq, :nq]
    target = (p.w - torch.cat([torch.zeros_like(p.w[:, :nq]), st.outl], 1)) @ p.h
    c = st.cbs.clone()
    r = _mt(st, target[:, :nq] - _m(st, c) @ hq)
    d = r.clone()
    rs = (r * r).sum()
    for _ in range(iters):
        ad = _mt(st, _m(st, d) @ hq)
        alpha = rs / (d * ad).sum().clamp_min(1e-30)
        c += alpha * d
        r -= alpha * ad
        rs_new = (r * r).sum()
        if rs_new <= 1e-20:
            break
        d = r + (rs_new / rs) * d
        rs = rs_new
    st.cbs = c


def _codes_step(p: LayerProblem, st: LayerState) -> None:
    """Exact coordinate descent over vectors: a code changes only where the layer loss drops.

    For row r and vector j with current codeword c and gradient g = ((W - Ŵ) H)[r, j]: switching to a_k changes
    the loss by s²·a_k H_jj a_kᵀ - 2s·a_k·(g + s H_jj c) + const(r), so the best code is one small matmul."""
    S, out, nv = st.codes.shape
    _, G, K, v = st.cbs.shape
    rows = out // G
    grad = (p.w - st.what()) @ p.h  # [out, n]
    s = st.s.view(G, rows, 1)
    blk = max(1, 128 // v)
    for j0 in range(0, nv, blk):  # lazy updates as in GPTQ: eager inside a column block, the rest per block
        j1 = min(j0 + blk, nv)
        b0, b1 = j0 * v, j1 * v
        steps = torch.zeros(out, b1 - b0)
        for j in range(j0, j1):
            c0, c1 = j * v, (j + 1) * v
            step = _codes_vector(st, p.h[c0:c1, c0:c1], grad[:, c0:c1], s, j)
            steps[:, c0 - b0:c1 - b0] = step
            grad[:, c1:b1] -= step @ p.h[c0:c1, c1:b1]
        grad[:, b1:] -= steps @ p.h[b0:b1, b1:]


def _codes_vector(st: LayerState, hjj: torch.Tensor, g: torch.Tensor, s: torch.Tensor, j: int) -> torch.Tensor:
    S, out, _ = st.codes.shape
    _, G, K, v = st.cbs.shape
    rows = out // G
    total = torch.zeros(out, v)
    for stg in range(S):
        cb = st.cbs[stg]  # [G, K, v]
        quad = ((cb @ hjj) * cb).sum(-1)  # [G, K]
        old = st.codes[stg, :, j].view(G, rows)
        cur = torch.gather(cb, 1, old[..., None].expand(-1, -1, v))  # [G, rows, v]
        z = (g - total @ hjj).view(G, rows, v) + s * (cur @ hjj)
        # score/s = s·quad_k - 2 z·a_k, one matmul: [z, s] @ [-2a; quad]
        rhs = torch.cat([-2 * cb, quad[..., None]], -1).transpose(1, 2).contiguous()  # [G, v+1, K]
        score = torch.cat([z, s], -1) @ rhs  # [G, rows, K]
        k = argmin_last(score)
        keep = torch.gather(score, 2, old[..., None])[..., 0] <= torch.gather(score, 2, k[..., None])[..., 0]
        k = torch.where(keep, old, k)
        total += (s * (torch.gather(cb, 1, k[..., None].expand(-1, -1, v)) - cur)).reshape(out, v)
        st.codes[stg, :, j] = k.reshape(-1)
    return total


def refine_layer(p: LayerProblem, st: LayerState, cfg: VQConfig, loss: float) -> list[dict]:
    steps = []
    for rnd in range(cfg.refine_rounds):
        for name, fn in (("scales", lambda: _scale_step(p, st) if p.fmt.has_scale else None),
                         ("codebooks", lambda: _codebook_step(p, st, cfg.cg_iters)),
                         ("codes", lambda: _codes_step(p, st))):
            fn()
            after = p.loss(st.what())
            steps.append({"stage": f"layer.{name}", "round": rnd, "before": loss, "after": after})
            loss = after
    return steps


def to_module(p: LayerProblem, st: LayerState) -> VQLinear:
    f = p.fmt
    outlier_w = st.outl / st.s[:, None] if f.n_outliers else None
    return VQLinear.from_parts(f, st.codes, st.cbs, p.perm if f.n_outliers else None, outlier_w,
                               st.s if f.has_scale else None, None)


def quantize_layer(w: torch.Tensor, h: torch.Tensor, cfg: VQConfig, gen: torch.Generator):
    """-> (VQLinear, LayerState, LayerProblem, stage records)."""
    fmt = cfg.format_for(*w.shape)
    p = _problem(w, h, fmt, cfg.damp)
    st = init_layer(p, cfg, gen)
    stages = [{"stage": "layer.init", "round": 0, "before": p.ref(), "after": p.loss(st.what())}]
    stages += refine_layer(p, st, cfg, stages[0]["after"])
    st.cbs = st.cbs.half().float()  # what the fp16 storage holds
    st.s = fp16_scale(st.s, st.outl)
    st.outl = (st.outl / st.s[:, None]).half().float() * st.s[:, None]
    return to_module(p, st), st, p, stages


# -- one block ---------------------------------------------------------------------------------------
@dataclass
class _Layer:
    name: str
    p: LayerProblem
    st: LayerState
    seconds: float
    stages: list


def _dense_weights(layers: list[_Layer], cbs=None, s=None) -> dict[str, torch.Tensor]:
    out = {}
    for i, l in enumerate(layers):
        st = l.st if cbs is None else LayerState(l.st.codes, cbs[i], s[i], l.st.outl)
        out[f"{l.name}.weight"] = l.p.dense(st.what())
    return out


def _set_dense(block: nn.Module, layers: list[_Layer]) -> None:
    with torch.no_grad():
        for key, w in _dense_weights(layers).items():
            block.get_submodule(key[: -len(".weight")]).weight.copy_(w)


def _tune_block(runner, block, x, y, layers: list[_Layer], cfg: VQConfig, gen) -> list[dict]:
    """Adam on codebooks + scales (block output loss), then discrete re-assignment kept only if it helps."""
    n_eval = min(x.shape[0], 2 * runner.batch)
    xe, ye = x[:n_eval], y[:n_eval]
    with torch.no_grad():
        l0 = float(block_loss(runner, block, xe, ye))
    cbs = [l.st.cbs.clone().requires_grad_(True) for l in layers]
    ss = [l.st.s.clone().requires_grad_(True) for l in layers]
    opt = torch.optim.Adam(cbs + ss, lr=cfg.block_lr)
    from torch.func import functional_call

    m = runner.model
    for step in range(cfg.block_steps):
        idx = torch.randint(0, x.shape[0], (min(cfg.block_batch, x.shape[0]),), generator=gen)
        out = functional_call(block, _dense_weights(layers, cbs, ss), (x[idx], m.rope_cos, m.rope_sin), strict=False)
        loss = (out - y[idx]).pow(2).mean() / (y[idx] - x[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        old = [(l.st.cbs, l.st.s) for l in layers]
        for l, c, s in zip(layers, cbs, ss):
            l.st.cbs, l.st.s = c.detach().half().float(), fp16_scale(s.detach(), l.st.outl)
        _set_dense(block, layers)
        l1 = float(block_loss(runner, block, xe, ye))
        if l1 > l0:  # never accept a worse block
            for l, (c, s) in zip(layers, old):
                l.st.cbs, l.st.s = c, s
            _set_dense(block, layers)
            l1 = l0
        records = [{"stage": "block.continuous", "before": l0, "after": l1, "steps": cfg.block_steps}]
        records.append(_reassign_block(runner, block, xe, ye, layers, l1))
    return records


@torch.no_grad()
def _reassign_block(runner, block, xe, ye, layers: list[_Layer], l1: float) -> dict:
    saved = [l.st.codes.clone() for l in layers]
    for l in layers:
        _codes_step(l.p, l.st)
    _set_dense(block, layers)
    l2 = float(block_loss(runner, block, xe, ye))
    if l2 > l1:
        for l, c in zip(layers, saved):
            l.st.codes = c
        _set_dense(block, layers)
        l2 = l1
    return {"stage": "block.codes", "before": l1, "after": l2}


def quantize_block(i: int, block: nn.Module, x: torch.Tensor, cfg: VQConfig, runner: BlockRunner,
                   report: CompressionReport, acc: dict):
    for name in cfg.layers:
        check_finite(f"model.layers.{i}.{name}", block.get_submodule(name).weight)
    hs, y = block_hessians(runner, block, cfg.layers, x)
    gen = torch.Generator().manual_seed(cfg.seed * 1000003 + i)
    layers = []
    for name in track(cfg.layers, f"vq block {i}"):
        t0 = time.perf_counter()
        _, st, p, stages = quantize_layer(block.get_submodule(name).weight.detach(), hs[name],
                                          cfg.for_layer(name, i), gen)
        layers.append(_Layer(name, p, st, time.perf_counter() - t0, stages))
    _set_dense(block, layers)
    t0 = time.perf_counter()
    block_stages = _tune_block(runner, block, x, y, layers, cfg, gen) if cfg.block_steps else []
    t_block = (time.perf_counter() - t0) / len(layers)
    for l in layers:
        report.stages += [{"block": i, "layer": l.name, **r} for r in l.stages]
        mod = to_module(l.p, l.st)
        bits, n = mod.storage_bits(), l.p.w.shape[0] * mod.in_features
        acc["bits"] += bits
        acc["weights"] += n
        pad = l.p.fmt.n_vec * l.p.fmt.vec_len - l.p.fmt.in_q
        note = f"padded {pad} input columns to the vector length" if pad else ""
        report.layers.append(LayerReport(f"model.layers.{i}.{l.name}", "vq", tuple(l.p.dense(l.p.w).shape),
                                         rel_error=l.p.loss(l.st.what()) / max(l.p.ref(), 1e-30),
                                         bits_per_weight=bits / n, seconds=l.seconds + t_block, note=note))
        l.module = mod
    report.stages += [{"block": i, **r} for r in block_stages]

    def finish() -> None:  # swap the dense stand-ins (used to propagate activations) for the packed modules
        for l in layers:
            set_module(block, l.name, l.module)

    return finish


# -- the method ---------------------------------------------------------------------------------------
def ft_precision(setting: str) -> str:
    """Resolve `VQConfig.ft_precision`: "auto" is bfloat16 where oneDNN runs bf16 matmuls natively."""
    if setting != "auto":
        return setting
    from edgetk.kernels.llvm_dequant import host_ok

    return "bfloat16" if host_ok() else "float32"


@register_method(VQConfig)
def apply_vq(loaded, cfg: VQConfig, calib: torch.Tensor | None, runner_kw: dict | None = None) -> CompressionReport:
    model = loaded.model
    n_params = param_count(model)
    e2e_calib = None
    if calib is not None:
        if cfg.e2e_steps:
            e2e_calib = (take_windows(calib, cfg.e2e_samples, "e2e_samples", "vq") if cfg.e2e_samples
                         else calib[: cfg.calib_samples])
        calib = take_windows(calib, cfg.calib_samples, "calib_samples", "vq")
    runner = BlockRunner(model, calib, **(runner_kw or {}))
    if runner.load_block is None:  # in memory: refuse before touching any block (blocks from disk: per block)
        for i, layer in enumerate(model.model.layers):
            for name in cfg.layers:
                check_finite(f"model.layers.{i}.{name}", layer.get_submodule(name).weight)
    teacher = None
    search = None
    if cfg.search_bpw:
        if runner.load_block is not None:
            raise ConfigError("the format search (search_bpw > 0) needs the whole model in memory, but the blocks "
                              "are streamed from disk", hint="set search_bpw=0 for models larger than RAM")
        from .vq_search import search_overrides

        overrides, search = search_overrides(model, cfg, calib)
        cfg_run = dataclasses.replace(cfg, overrides=overrides, search_bpw=0.0)
    else:
        cfg_run = cfg
    if cfg.e2e_steps:
        if runner.load_block is not None:
            raise ConfigError("end-to-end fine-tuning (e2e_steps > 0) needs the whole model in memory, but the "
                              "blocks are streamed from disk", hint="use a preset without end-to-end fine-tuning "
                              "(vq2) or set e2e_steps=0 for models larger than RAM")
        teacher = teacher_copy(model)
    report = CompressionReport("vq", cfg.to_dict())
    acc = {"bits": 0, "weights": 0}

    if search is not None:
        report.stages.append(search)

    def process(i: int, block: nn.Module, x: torch.Tensor):
        return quantize_block(i, block, x, cfg_run, runner, report, acc)

    runner.run(process, track_fn=lambda it, d, n: track(it, "vq blocks", n))
    if teacher is not None:
        report.stages.append(finetune_vq_model(model, teacher, e2e_calib, cfg.e2e_steps, cfg.e2e_lr, cfg.e2e_batch,
                                               cfg.seed, tune_norms=cfg.e2e_norms, code_every=cfg.e2e_code_every,
                                               code_frac=cfg.e2e_code_frac, code_lr_scale=cfg.e2e_code_lr,
                                               code_reset=cfg.e2e_code_reset,
                                               schedule=cfg.e2e_schedule, tune_embed=cfg.e2e_embed,
                                               precision=ft_precision(cfg.ft_precision)))
        del teacher
    report.totals = weight_totals(model, n_params, acc["bits"], acc["weights"])
    report.totals["calibration"] = {"windows": int(calib.shape[0]), "tokens_per_window": int(calib.shape[1])}
    if cfg.e2e_steps:
        report.totals["calibration"]["e2e_windows"] = int(e2e_calib.shape[0])
    if search is not None:
        report.totals["format_search"] = {**search, "overrides": list(cfg_run.overrides)}
    return report


def _preset(name: str, desc: str, **kw) -> VQConfig:
    cfg = VQConfig(**kw)
    register_preset(name, cfg, description=desc)
    return cfg


_preset("vq2", "VQ v=4 K=256 (8-bit codes) + fp16 per-channel scale: Hessian k-means, GPTQ feedback, "
        "codebook/scale/code refinement (~2.06 bpw)", vec_len=4, codebook_size=256, refine_rounds=1, kmeans_iters=10)
_preset("vq2-res", "VQ v=8, 2 residual codebooks of 256 + 4 fp16 outlier columns + scale (~2.2 bpw)",
        vec_len=8, codebook_size=256, stages=2, outliers=4, refine_rounds=1, kmeans_iters=10)
_preset("vq2-r16", "VQ v=4, 2 residual codebooks of 16 (4-bit codes each) per third of the output channels + fp16 "
        "scale (~2.04 bpw): the codebooks small enough for one-instruction table lookups (AVX2 vpshufb, NEON tbl)",
        vec_len=4, codebook_size=16, stages=2, groups=3, refine_rounds=1, kmeans_iters=10)
_preset("vq2-r16-ft", "vq2-r16 + the fine-tuning stages of vq2-ft (block output, then end-to-end distillation; slower, "
        "needs the model in memory)", vec_len=4, codebook_size=16, stages=2, groups=3, refine_rounds=1, kmeans_iters=10,
        block_steps=20, block_batch=2, e2e_steps=100, e2e_lr=1e-3, e2e_batch=2)
_preset("vq3", "VQ v=2 K=64 (6-bit codes) + fp16 per-channel scale (~3.03 bpw)", vec_len=2, codebook_size=64,
        refine_rounds=1, kmeans_iters=10)
_preset("vq2-ft", "vq2 + block-output fine-tuning (20 steps per block) + end-to-end distillation of codebooks, "
        "scales and norms to the fp model (100 steps; slower, needs the model in memory)", vec_len=4,
        codebook_size=256, refine_rounds=1, kmeans_iters=10, block_steps=20, block_batch=2, e2e_steps=100,
        e2e_lr=1e-3, e2e_batch=2)
_preset("vq3-ft", "vq3 + the fine-tuning stages of vq2-ft (block output, then end-to-end distillation; slower, needs "
        "the model in memory)", vec_len=2, codebook_size=64, refine_rounds=1, kmeans_iters=10, block_steps=20,
        block_batch=2, e2e_steps=100, e2e_lr=1e-3, e2e_batch=2)
# the -kd recipes' distillation stage: the layer stage on 128 windows, the distillation on 512 (same steps, same time:
# 128 overfit, held-out KL 0.68 vs training 0.45 on rotate+vq2-evo-kd; 512 lowered the perplexity 2-4 %)
_KD = dict(calib_samples=128, e2e_steps=400, e2e_lr=1e-3, e2e_batch=2, e2e_samples=512)
_KD_COS = {**_KD, "e2e_schedule": "cosine"}  # the same on a cosine learning rate (vq2-mix-kd, vq3-k512-kd)
_MIX = tuple(f"self_attn.{n}:vec_len=2,codebook_size=64" for n in ("k_proj", "v_proj", "o_proj"))
_preset("vq2-kd", "vq2 + 400 steps of end-to-end KL distillation of codebooks, scales and norms to the fp model on "
        "512 calibration windows (the layer stage on 128; no block stage; slower, needs the model in memory; bf16 "
        "autocast where the CPU has it)", vec_len=4, codebook_size=256, refine_rounds=1, kmeans_iters=10, **_KD)
_preset("vq3-kd", "vq3 + the distillation stage of vq2-kd", vec_len=2, codebook_size=64, refine_rounds=1,
        kmeans_iters=10, **_KD)
_preset("vq2-mix", "vq2 with the attention k/v/o projections at vq3's format (v=2, K=64: 3 bits), the MLP at 2 bits "
        "(~2.20 bpw)", vec_len=4, codebook_size=256, refine_rounds=1, kmeans_iters=10, overrides=_MIX)
_MIX_KD = _preset("vq2-mix-kd", "vq2-mix + the distillation stage of vq2-kd, its learning rate on a cosine decay "
                  "(~2.20 bpw)", vec_len=4, codebook_size=256, refine_rounds=1, kmeans_iters=10, overrides=_MIX,
                  **_KD_COS)
# the 20-minute preset: 100 steps instead of 400 (measured on rotate+vq2-mix-kd, 2 threads: 13 min, perplexity +4 %),
# at 4x the learning rate (rotate+vq2-fast, session 18: e2e_lr 1e-3 / 2e-3 / 4e-3 / 8e-3 -> perplexity 63.6 / 62.4 /
# 61.6 / 63.7)
register_preset("vq2-fast", dataclasses.replace(_MIX_KD, e2e_steps=100, e2e_lr=4e-3),
                description="vq2-mix-kd with 100 distillation steps instead of 400, at 4x the learning rate: the quick "
                "preset (~2.20 bpw; ~14 min on 2 AMX cores for smollm2-135m after `rotate`, ~35 min on 2 AVX2 "
                "cores without bf16)")
_preset("vq2-evo", "vq2-mix with the layers at 3 bits chosen per block by an evolutionary search (EvoPress) on the "
        "KL to the fp model, at most 2.3 bits per weight; the search quantizes every layer in both formats first "
        "(~3x vq2-mix's time; needs the model in memory)", vec_len=4, codebook_size=256, refine_rounds=1,
        kmeans_iters=10, overrides=_MIX, search_bpw=2.3, calib_samples=128)
_preset("vq2-evo-kd", "vq2-evo + the distillation stage of vq2-mix-kd (cosine learning rate; <= 2.3 bpw)", vec_len=4,
        codebook_size=256, refine_rounds=1, kmeans_iters=10, overrides=_MIX, search_bpw=2.3, **_KD_COS)
_preset("vq3-k512", "VQ v=3 K=512 (9-bit codes) + fp16 per-channel scale (~3.07 bpw): lower error than vq3 at about "
        "the same bits; batch 1 runs the float32 kernel (the int8 / int16 LUT kernels take K <= 256)", vec_len=3,
        codebook_size=512, refine_rounds=1, kmeans_iters=10)
_preset("vq3-k512-kd", "vq3-k512 + the distillation stage of vq2-mix-kd (cosine learning rate)", vec_len=3,
        codebook_size=512, refine_rounds=1, kmeans_iters=10, **_KD_COS)
