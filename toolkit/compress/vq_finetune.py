"""End-to-end fine-tuning of a VQ model's continuous parameters (AQLM global fine-tuning / PV-Tuning's P step).

After every block was quantized on its own (vq.py), the errors of the blocks compound. This stage trains what
is continuous — codebooks, per-channel scales, outlier columns and the RMSNorm weights — on the KL divergence
of the quantized model's next-token distribution from the fp model's, over the calibration windows. The codes
(the discrete mapping) stay fixed unless `code_every` > 0: then latent weights follow the same gradients and,
every `code_every` steps, a bounded fraction of the codes switch to the codeword nearest their latent weight
(PV-Tuning's V step). The code width, hence the bits per weight, never changes.

Each `VQLinear` is swapped for a `_TrainableVQ` stand-in holding float32 copies of its parameters and the
unpacked codes; its forward builds the dense weight (training only; the inference path never does) and the
stand-ins are swapped back for packed modules (fp16 storage) at the end. The result is kept only if the KL,
measured on held-out calibration windows after the fp16 rounding, went down.

Needs the whole model (and the fp teacher) in memory: blocks streamed from disk cannot take this stage.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..progress import track
from .calib import set_module
from .distill import kl_rows, soft_targets
from .vq_linear import VQLinear, fp16_scale

log = logging.getLogger(__name__)


class _TrainableVQ(nn.Module):
    """Differentiable stand-in of a `VQLinear`: same format, float32 codebooks / scale / outliers, fixed codes."""

    def __init__(self, m: VQLinear):
        super().__init__()
        f = self.fmt = m.fmt
        self.in_features, self.out_features = f.in_features, f.out_features
        self.register_buffer("codes", m.unpacked_codes().long())  # [S, out, n_vec]
        self.register_buffer("perm", m.perm.to(torch.int64))
        g_of_row = torch.arange(f.out_features) // (f.out_features // f.groups)
        self.register_buffer("g_of_row", g_of_row)
        self._flat = None  # row-of-codebook index per code (g * K + code), rebuilt when the codes move
        self.codebooks = nn.Parameter(m.codebooks.float().clone())
        # scales are tuned relative to their start (one learning rate fits codebooks, outliers and scales)
        self.register_buffer("scale0", m.scale.float().clone() if f.has_scale else torch.zeros(0))
        self.scale_rel = nn.Parameter(torch.ones(f.out_features)) if f.has_scale else None
        self.outlier_w = nn.Parameter(m.outlier_w.float().clone()) if f.n_outliers else None
        self.bias = m.bias.float().clone() if f.has_bias else None
        if f.n_outliers:  # stored order (outliers first) -> original column order
            self.register_buffer("inv_perm", torch.argsort(self.perm))

    def weight(self) -> torch.Tensor:
        f = self.fmt
        if self._flat is None:
            self._flat = (self.g_of_row[:, None] * self.codebooks.shape[2] + self.codes).reshape(f.stages, -1)
        # index_select (its backward an index_add) is ~2x faster on CPU than the equivalent advanced indexing
        wq = sum(self.codebooks[s].reshape(-1, f.vec_len).index_select(0, self._flat[s]) for s in range(f.stages))
        wq = wq.reshape(f.out_features, -1)[:, :f.in_q]
        if f.n_outliers:
            wq = torch.cat([self.outlier_w, wq], 1)[:, self.inv_perm]
        return wq * self.scale()[:, None] if f.has_scale else wq

    def scale(self) -> torch.Tensor:
        return self.scale0 * self.scale_rel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight()
        if self.track_codes and w.requires_grad:
            w.register_hook(self._accumulate)
        return F.linear(x, w, self.bias)

    # -- discrete step (PV-Tuning's V step over latent weights) -----------------------------------------
    track_codes = False
    BETAS = (0.9, 0.999)

    def _accumulate(self, g: torch.Tensor) -> None:
        self._grad = g if getattr(self, "_grad", None) is None else self._grad + g

    def _latent_grad(self, g: torch.Tensor) -> torch.Tensor:
        """A gradient w.r.t. the dense weight [out, in] as one w.r.t. the quantized part, in codebook units
        [out, n_vec, v]."""
        f = self.fmt
        g = g * self.scale().detach()[:, None] if f.has_scale else g
        if f.n_outliers:
            g = g[:, self.perm]  # stored order: outliers first
        g = F.pad(g[:, f.n_outliers:], (0, f.n_vec * f.vec_len - f.in_q))
        return g.reshape(f.out_features, f.n_vec, f.vec_len)

    @torch.no_grad()
    def latent_step(self, lr: float) -> None:
        """One Adam step of the latent weights (codebook units) on the last backward's gradient.

        The latent weight of a code vector is its codeword plus a residual `resid` (so it follows codebook
        updates); the forward never reads it: it only accumulates where the loss wants each weight to go."""
        if getattr(self, "_grad", None) is None:
            return
        g, self._grad = self._latent_grad(self._grad), None
        if getattr(self, "resid", None) is None:
            self.resid, self._m, self._v, self._t = torch.zeros_like(g), torch.zeros_like(g), torch.zeros_like(g), 0
        b1, b2 = self.BETAS
        self._t += 1
        self._m.mul_(b1).add_(g, alpha=1 - b1)
        self._v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat, v_hat = self._m / (1 - b1 ** self._t), self._v / (1 - b2 ** self._t)
        self.resid.sub_(lr * m_hat / (v_hat.sqrt() + 1e-12))

    @torch.no_grad()
    def code_step(self, frac: float, reset: bool = False) -> int:
        """Re-encode the latent weights: each code vector may take the codeword nearest to its latent weight
        (stage by stage, the other stages held), weighted by the row scale²; of the vectors that would change,
        only the `frac` of all vectors that gain the most switch (PV-Tuning's trust region). The latent weights
        stay where they are (their residual is re-expressed from the new codeword), or with `reset` restart on
        the codewords now chosen, so that the next step's latent weights move from the current point only (the
        forward never reads them: nothing else stops them drifting). Returns the codes changed."""
        if getattr(self, "resid", None) is None:
            return 0
        f = self.fmt
        cb = self.codebooks.detach()  # [S, G, K, v]
        cur = [cb[s][self.g_of_row[:, None], self.codes[s]] for s in range(f.stages)]  # each [out, n_vec, v]
        latent = sum(cur) + self.resid
        w2 = (self.scale().detach() ** 2 if f.has_scale else torch.ones(f.out_features))[:, None]
        budget = max(1, int(frac * f.out_features * f.n_vec))
        changed = 0
        for s in range(f.stages):
            target = latent - (sum(cur) - cur[s])
            best, gain = self._nearest(cb[s], target, cur[s])
            move = (best != self.codes[s]) & (gain * w2 > 0)
            left = budget - changed
            if int(move.sum()) > left:
                if left <= 0:
                    break
                thr = (gain * w2)[move].topk(left).values[-1]
                move &= gain * w2 >= thr
            self.codes[s] = torch.where(move, best, self.codes[s])
            cur[s] = cb[s][self.g_of_row[:, None], self.codes[s]]
            changed += int(move.sum())
        self.resid = torch.zeros_like(latent) if reset else latent - sum(cur)
        self._flat = None
        return changed

    def _nearest(self, cb: torch.Tensor, target: torch.Tensor, cur: torch.Tensor):
        """Nearest codeword of each target vector in its row group's codebook, and the squared distance gained."""
        f = self.fmt
        best = torch.empty(target.shape[:2], dtype=torch.long)
        gain = torch.empty(target.shape[:2])
        for g0 in range(cb.shape[0]):
            rows = (self.g_of_row == g0).nonzero().flatten()
            t = target[rows].reshape(-1, f.vec_len)
            d = (t * t).sum(1, keepdim=True) - 2 * t @ cb[g0].T + (cb[g0] * cb[g0]).sum(1)[None]
            dk, k = d.min(1)
            d_cur = ((t - cur[rows].reshape(-1, f.vec_len)) ** 2).sum(1)
            best[rows] = k.view(len(rows), -1)
            gain[rows] = (d_cur - dk).view(len(rows), -1)
        return best, gain

    def to_vq(self) -> VQLinear:
        return VQLinear.from_parts(self.fmt, self.codes, self.codebooks.detach(), self.perm,
                                   None if self.outlier_w is None else self.outlier_w.detach(),
                                   self.scale().detach() if self.fmt.has_scale else None, self.bias)

    @torch.no_grad()
    def round_fp16(self) -> None:
        """Make the float32 copies hold exactly what the fp16 buffers will."""
        for p in (self.codebooks, self.outlier_w):
            if p is not None:
                p.copy_(p.half().float())
        if self.fmt.has_scale:
            # outlier_w is trained as stored (already divided by the scale): only keep the scale from rounding to 0
            self.scale0.copy_(fp16_scale(self.scale(), torch.empty(0)))
            self.scale_rel.fill_(1.0)


PRECISIONS = ("float32", "bfloat16")
_EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")  # (a tied head is the embedding's parameter)
SCHEDULES = ("constant", "cosine")  # learning rate after the warm-up


def _compute(precision: str):
    """The matmul precision of the training forward/backward passes: bfloat16 runs them under CPU autocast
    (oneDNN bf16, AMX where the CPU has it; the trained parameters, the loss and the optimizer stay float32)."""
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _kl(student: nn.Module, targets: tuple[torch.Tensor, torch.Tensor], tokens: torch.Tensor,
        precision: str = "float32") -> torch.Tensor:
    """Mean per-token KL(teacher ‖ student), the teacher given as its `_teacher_targets` on the same tokens."""
    with _compute(precision):
        out = student(tokens)
    return kl_rows(out, targets).mean()


@torch.no_grad()
def _teacher_targets(teacher: nn.Module, tokens: torch.Tensor, precision: str = "float32"):
    with _compute(precision):
        out = teacher(tokens)
    return soft_targets(out)


@torch.no_grad()
def _eval_kl(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch: int) -> float:
    tot = 0.0
    for i in range(0, windows.shape[0], batch):
        w = windows[i:i + batch]
        tot += float(_kl(model, _teacher_targets(teacher, w), w)) * w.shape[0]
    return tot / windows.shape[0]


def lr_factor(step: int, steps: int, schedule: str) -> float:
    """The learning-rate multiplier at `step` of `steps`: linear warm-up over the first tenth, then 1
    ("constant") or a cosine from 1 towards 0 at the end ("cosine")."""
    warm = max(1, steps // 10)
    if step < warm or schedule == "constant":
        return min(1.0, (step + 1) / warm)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def finetune_vq_model(model: nn.Module, teacher: nn.Module, calib: torch.Tensor, steps: int, lr: float,
                      batch: int, seed: int, tune_norms: bool = True, n_eval: int = 4, code_every: int = 0,
                      code_lr_scale: float = 1.0, code_frac: float = 0.01, precision: str = "float32",
                      schedule: str = "constant", tune_embed: bool = False, code_reset: bool = False) -> dict:
    """Fine-tune `model` (its `VQLinear`s and, optionally, RMSNorm weights) in place towards `teacher`.

    With `code_every` > 0 the codes move too (PV-Tuning's V step): every step, latent weights (codeword + residual,
    in codebook units) take an Adam step on the same gradient at `code_lr_scale` times the learning rate, and
    every `code_every` steps at most `code_frac` of each layer's code vectors switch to the codeword nearest
    their latent weight (`_TrainableVQ.latent_step` / `code_step`; `code_reset` restarts the latent weights on
    the codewords after each code step). The last `n_eval` calibration windows are held out to decide whether
    the result is kept (when there are more than n_eval windows; otherwise all windows serve both). Returns the
    stage record {"stage": "model.e2e", "before": KL, "after": KL, "steps": ..., "kept": bool, "codes_changed": the code
    switches the code steps made during training (reported also when the result is not kept and they are undone),
    "precision": the training passes' matmul precision, "train_kl": [[step, mean training KL of the eighth of the
    steps ending there], ...]}. `precision` "bfloat16" runs the training forward and
    backward passes (student and teacher) under bf16 autocast, ~2-3x faster on CPUs with AMX / AVX-512 BF16; the
    held-out KL that decides whether the result is kept is always measured in float32. The learning rate warms up
    linearly over the first tenth of the steps, then stays (`schedule` "constant") or follows a cosine to 0
    ("cosine"). `tune_embed` also trains the fp token embedding (and an untied head), at a learning rate scaled by
    its RMS, so that its steps are as large relative to it as the codebooks' are."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    n = calib.shape[0]
    hold = n_eval if n > n_eval else 0
    train, held = (calib[:n - hold], calib[n - hold:]) if hold else (calib, calib)
    names = [name for name, m in model.named_modules() if isinstance(m, VQLinear)]
    originals = {name: model.get_submodule(name) for name in names}
    stand_ins = {name: _TrainableVQ(m) for name, m in originals.items()}
    norms = [p for name, p in model.named_parameters() if tune_norms and "norm" in name]
    embeds = [p for name, p in model.named_parameters() if tune_embed and name in _EMBEDDINGS]
    saved_fp = [p.detach().clone() for p in norms + embeds]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for name, m in stand_ins.items():
        m.track_codes = code_every > 0
        set_module(model, name, m)
    params = [p for m in stand_ins.values() for p in m.parameters()] + norms
    groups = [{"params": params}] + [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt())}
                                     for p in embeds]
    for p in norms + embeds:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    try:
        before = _eval_kl(model, teacher, held, batch)
        opt = torch.optim.Adam(groups, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, schedule))
        model.train(False)
        codes_changed = 0
        curve, chunk = [], []  # mean training KL over each eighth of the steps (free: the loss is computed anyway)
        for step in track(range(steps), "vq fine-tune (end to end)", steps):
            idx = torch.randint(0, train.shape[0], (min(batch, train.shape[0]),), generator=gen)
            w = train[idx]
            loss = _kl(model, _teacher_targets(teacher, w, precision), w, precision)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            chunk.append(float(loss.detach()))
            if len(chunk) >= max(1, steps // 8) or step + 1 == steps:
                curve.append([step + 1, sum(chunk) / len(chunk)])
                chunk = []
            opt.step()
            if code_every:
                for m in stand_ins.values():
                    m.latent_step(sched.get_last_lr()[0] * code_lr_scale)
                if (step + 1) % code_every == 0 and step + 1 < steps:
                    codes_changed += sum(m.code_step(code_frac, code_reset) for m in stand_ins.values())
            sched.step()
        for m in stand_ins.values():
            m.round_fp16()
        after = _eval_kl(model, teacher, held, batch)
        kept = after < before
        if kept:
            for name, m in stand_ins.items():
                set_module(model, name, m.to_vq())
        else:
            log.info("end-to-end fine-tuning did not lower the held-out KL (%.4f -> %.4f): kept the block result",
                     before, after)
            for name, m in originals.items():
                set_module(model, name, m)
            with torch.no_grad():
                for p, old in zip(norms + embeds, saved_fp):
                    p.copy_(old)
    except BaseException:
        for name, m in originals.items():  # never leave stand-ins in the model
            set_module(model, name, m)
        with torch.no_grad():
            for p, old in zip(norms + embeds, saved_fp):
                p.copy_(old)
        raise
    finally:
        for p, req in frozen:
            p.requires_grad_(req)
    return {"stage": "model.e2e", "before": before, "after": after if kept else before, "steps": steps,
            "kept": kept, "held_out_windows": int(held.shape[0]) if hold else 0,
            "codes_changed": codes_changed, "precision": precision, "train_kl": curve}


def teacher_copy(model: nn.Module) -> nn.Module:
    """A frozen fp copy of the model before quantization (the distillation teacher)."""
    t = copy.deepcopy(model)
    for p in t.parameters():
        p.requires_grad_(False)
    return t.eval()
