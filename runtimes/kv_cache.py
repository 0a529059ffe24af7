"""Compressed KV cache (KVQuant / GEAR) plugging into edgetk's decoder.

    cfg = KVCacheConfig(bits=4)                                   # online per-block key statistics
    calib = calibrate(model, calibration_windows(tok, 4, 512), cfg)  # only for "calibrated"/"nuq"
    model.setup_cache(1, 2048, cache_factory=cache_factory(cfg, calib))

Keys are quantized per channel BEFORE RoPE (the decoder hands raw keys to caches with
`wants_raw_keys = True`), values per token in groups of channels. New tokens first land in an fp16
region (the most recent `fp_window` tokens plus a block being filled); whole blocks of `key_group`
tokens are then quantized ("flushed"). Statistics of a key block are either computed online from the
block ("block") or fixed per channel from calibration data ("calibrated", KVQuant's offline scaling,
which needs no per-block metadata). Optional: non-uniform levels fit on calibration data (k-means
in normalised space), dense-and-sparse outliers, a GEAR low-rank term of the quantization error,
unequal key/value code widths (`key_bits`/`value_bits`: keys are the sensitive half, so kv4 spends
5 bits on keys and 3 on values, 4 on average, the bytes of 4 + 4), a Hadamard rotation of values.
A prefill chunk longer than the fp region is attended with its own keys/values exact, then quantized
into the cache (`QuantKVCache.attend`). The packed layout and the attention over it are
`edgetk::kv_attention` (kernels/kv_attention.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edgetk.config import Config, check, config
from edgetk.errors import ConfigError
from edgetk.kernels import kv_attention as kva

KEY_SCALING = ("block", "calibrated")
LEVELS = ("uniform", "nuq")


@config("kv_cache", version=1)
@dataclass(frozen=True)
class KVCacheConfig(Config):
    bits: int = 4  # code width of keys and values (each overridable below)
    key_group: int = 64  # tokens per quantized key block (flush unit, GEAR block)
    value_group: int = 64  # channels per value group (clipped to head_dim)
    fp_window: int = 16  # most recent tokens always kept in fp16
    key_scaling: str = "block"  # "block": per-channel stats per block; "calibrated": offline per channel
    levels: str = "uniform"  # "uniform" or "nuq" (non-uniform levels fit on calibration data)
    outlier_frac: float = 0.0  # dense-and-sparse: fraction of entries kept exact
    gear_rank: int = 0  # GEAR low-rank rank of the quantization error per block (0 = off)
    sink_tokens: int = 1  # the first tokens (attention sinks) kept exact, as sparse entries
    key_bits: int = 0  # key code width (0 = bits); keys are the sensitive half (KV mixed precision)
    value_bits: int = 0  # value code width (0 = bits)
    value_rotation: bool = False  # rotate values by an orthonormal Hadamard matrix before quantizing (QuaRot)
    calib_windows: int = 4
    calib_seq_len: int = 512

    def validate(self) -> None:
        check(self.bits in (2, 3, 4), "bits", self.bits, "2, 3 or 4")
        check(self.key_bits in (0, *range(2, 9)), "key_bits", self.key_bits, "0 (= bits) or 2..8")
        check(self.value_bits in (0, *range(2, 9)), "value_bits", self.value_bits, "0 (= bits) or 2..8")
        check(self.key_group >= 1, "key_group", self.key_group, ">= 1")
        check(self.value_group >= 1, "value_group", self.value_group, ">= 1")
        check(self.fp_window >= 0, "fp_window", self.fp_window, ">= 0")
        check(self.key_scaling in KEY_SCALING, "key_scaling", self.key_scaling, f"one of {KEY_SCALING}")
        check(self.levels in LEVELS, "levels", self.levels, f"one of {LEVELS}")
        check(0.0 <= self.outlier_frac < 0.2, "outlier_frac", self.outlier_frac, "in [0, 0.2)")
        check(self.gear_rank >= 0, "gear_rank", self.gear_rank, ">= 0")
        check(0 <= self.sink_tokens <= 64, "sink_tokens", self.sink_tokens, "in [0, 64]")
        check(self.calib_windows >= 1, "calib_windows", self.calib_windows, ">= 1")

    @property
    def kbits(self) -> int:
        return self.key_bits or self.bits

    @property
    def vbits(self) -> int:
        return self.value_bits or self.bits

    @property
    def needs_calibration(self) -> bool:
        return self.key_scaling == "calibrated" or self.levels == "nuq"


# named presets the CLI shows (`--kv-bits N` picks kv{N})
PRESETS = {
    # kv4: 4 bits per cached number on average -- keys 5, values 3 (the bytes of 4 + 4). Keys carry
    # nearly all of a uniform 4/4 cache's error (fake-quant study, KL to the fp cache: keys 0.0054, values
    # 0.0004); one more key bit cuts the keys' share 4x, values pay less than that for the bit they give.
    # benchmarks/kv_quality.py, 12 windows: 4/4 +0.137, 5/3 +0.010, 5/3 with Hadamard-rotated values
    # (value_rotation) +0.084, all at 3.53x less memory than fp16 at context 2048. Non-uniform levels
    # fit on calibration data; per-channel key ranges calibrated offline (per-block ranges, kv4-block,
    # are as good but their fp16 statistics and block staging cost 3.11x); sparse outliers made it worse.
    "kv4": KVCacheConfig(bits=4, key_bits=5, value_bits=3, key_scaling="calibrated", key_group=16, fp_window=16,
                         levels="nuq"),
    "kv3": KVCacheConfig(bits=3, key_scaling="calibrated", key_group=16, fp_window=16, levels="nuq"),
    "kv2": KVCacheConfig(bits=2, key_scaling="calibrated", key_group=16, fp_window=16, levels="nuq",
                         outlier_frac=0.01),
    "kv4-block": KVCacheConfig(bits=4),
    "kv2-gear": KVCacheConfig(bits=2, gear_rank=2, outlier_frac=0.01),
}


def preset(name: str) -> KVCacheConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown KV-cache preset {name!r}", hint=f"one of {sorted(PRESETS)}")
    return PRESETS[name]


# -- calibration ------------------------------------------------------------------------------------
@dataclass
class LayerCalibration:
    key_range: torch.Tensor | None  # [H, 2, D] (scale, zero) per channel, pre-RoPE
    levels: torch.Tensor  # [2, 2**max(kbits, vbits)] float32; row 0 keys, row 1 values (padded with 1.0)


class _RecordingCache(nn.Module):
    """Dense attention that records raw (pre-RoPE) keys and values of one layer."""

    wants_raw_keys = True

    def __init__(self):
        super().__init__()
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def attend(self, q, k, v, input_pos, cos, sin, mask):
        self.keys.append(k.detach())
        self.values.append(v.detach())
        kr = k * cos[input_pos] + kva.rotate_half(k) * sin[input_pos]
        rep = q.shape[1] // k.shape[1]
        kr, vr = kr.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask[:, : k.shape[2]])


def _range(x: torch.Tensor, dim, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) so that x in [zero - scale, zero + scale], ignoring a `frac` tail (outliers)."""
    if frac > 0:
        flat = x.movedim(dim, -1) if isinstance(dim, int) else x
        lo = torch.quantile(flat.float(), frac / 2, dim=-1)
        hi = torch.quantile(flat.float(), 1 - frac / 2, dim=-1)
    else:
        lo, hi = x.amin(dim), x.amax(dim)
    scale = ((hi - lo) / 2).clamp_min(1e-4)
    return scale.half().float(), ((hi + lo) / 2).half().float()


def fit_levels(xn: torch.Tensor, n: int, iters: int = 25) -> torch.Tensor:
    """1-D k-means of normalised values xn (in [-1, 1]) into n sorted levels, endpoints pinned to +-1."""
    x = xn.flatten().float()
    if x.numel() > 200_000:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:200_000]]
    lv = torch.linspace(-1, 1, n)
    for _ in range(iters):
        idx = torch.bucketize(x, (lv[1:] + lv[:-1]) / 2)
        sums = torch.zeros(n).index_add_(0, idx, x)
        cnt = torch.zeros(n).index_add_(0, idx, torch.ones_like(x))
        lv = torch.where(cnt > 0, sums / cnt.clamp_min(1), lv)
        lv[0], lv[-1] = -1.0, 1.0
        lv = lv.sort().values
    return lv


@torch.inference_mode()
def calibrate(model, windows: torch.Tensor, cfg: KVCacheConfig) -> list[LayerCalibration]:
    """Run calibration windows through the decoder, fit per-channel key ranges and levels per layer."""
    seq = windows.shape[1]
    model.setup_cache(1, seq, cache_factory=lambda i, c, b, s: _RecordingCache())
    try:
        for w in windows:
            model(w[None], torch.arange(seq))
        out = []
        skip = cfg.sink_tokens  # sinks are kept exact: keep them out of the statistics
        for layer in model.model.layers:
            rec = layer.self_attn.kv_cache
            k = torch.cat([x[:, :, skip:] for x in rec.keys], 2)[0]  # [H, N, D]
            v = torch.cat([x[:, :, skip:] for x in rec.values], 2)[0]
            out.append(_layer_calibration(k, v, cfg))
        return out
    finally:
        model.clear_cache()


def default_levels(cfg: KVCacheConfig) -> torch.Tensor:
    """Uniform levels, [2, 2**max(kbits, vbits)] (a row past its own 2**bits entries is padding)."""
    return torch.stack([_pad_levels(torch.linspace(-1, 1, 2 ** b), cfg) for b in (cfg.kbits, cfg.vbits)])


def _pad_levels(lv: torch.Tensor, cfg: KVCacheConfig) -> torch.Tensor:
    n = 2 ** max(cfg.kbits, cfg.vbits)
    return torch.cat([lv, lv.new_ones(n - lv.numel())])


def _layer_calibration(k: torch.Tensor, v: torch.Tensor, cfg: KVCacheConfig) -> LayerCalibration:
    ks, kz = _range(k.transpose(1, 2), -1, cfg.outlier_frac)  # [H, D]
    key_range = torch.stack([ks, kz], 1) if cfg.key_scaling == "calibrated" else None
    if cfg.levels == "nuq":
        if key_range is None:  # normalise the way online blocks do
            blocks = k[:, : (k.shape[1] // cfg.key_group) * cfg.key_group].reshape(
                k.shape[0], -1, cfg.key_group, k.shape[2])
            bs, bz = _range(blocks, 2, cfg.outlier_frac)
            kn = (blocks - bz[:, :, None]) / bs[:, :, None]
        else:
            kn = (k - kz[:, None]) / ks[:, None]
        if cfg.value_rotation:
            v = v @ hadamard(v.shape[-1])
        g = min(cfg.value_group, v.shape[-1])
        vg = v.reshape(*v.shape[:-1], -1, g)
        vs, vz = _range(vg, -1, cfg.outlier_frac)
        vn = (vg - vz[..., None]) / vs[..., None]
        levels = torch.stack([_pad_levels(fit_levels(kn.clamp(-1, 1), 2 ** cfg.kbits), cfg),
                              _pad_levels(fit_levels(vn.clamp(-1, 1), 2 ** cfg.vbits), cfg)])
    else:
        levels = default_levels(cfg)
    return LayerCalibration(key_range, levels)


# -- the cache ----------------------------------------------------------------------------------------
_HADAMARD: dict[int, torch.Tensor] = {}


def hadamard(d: int) -> torch.Tensor:
    """The orthonormal, symmetric Sylvester-Hadamard matrix of size d (a power of two): H @ H = I.

    Values are rotated by it before quantization (QuaRot): the rotation spreads a token's outlier channels
    over all channels, so its per-token range shrinks. Attention is linear in the values, so the op attends
    over rotated values and the cache rotates the output back. Generated, never stored in the cache (a
    constant of the head dimension, like the RoPE tables)."""
    if d < 1 or d & (d - 1):
        raise ConfigError(f"value_rotation needs a power-of-two head dimension, not {d}",
                          hint="set value_rotation=False for this model")
    if d not in _HADAMARD:
        h = torch.ones(1, 1)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[d] = h / math.sqrt(d)
    return _HADAMARD[d]


def _quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    xn = ((x - zero) / scale).clamp(-1, 1)
    return torch.bucketize(xn, (levels[1:] + levels[:-1]) / 2)


class QuantKVCache(nn.Module):
    """One layer's quantized cache (layout: kernels/kv_attention.py). `attend` = write + attention."""

    wants_raw_keys = True

    def __init__(self, cfg: KVCacheConfig, batch: int, heads: int, max_seq: int, head_dim: int,
                 calib: LayerCalibration | None = None, extra_slots: int = 0):
        super().__init__()
        if cfg.needs_calibration and calib is None:
            raise ConfigError(f"KV cache with key_scaling={cfg.key_scaling!r}, levels={cfg.levels!r} needs "
                              "calibration data", hint="pass calibrate(model, windows, cfg) to cache_factory")
        self.cfg, self.max_seq, self.head_dim = cfg, max_seq, head_dim
        self.kbits, self.vbits, self.kg = cfg.kbits, cfg.vbits, cfg.key_group
        self.vg = min(cfg.value_group, head_dim)
        if head_dim % self.vg:
            raise ConfigError(f"value_group {cfg.value_group} does not divide head_dim {head_dim}",
                              hint="use a divisor of the head dimension")
        self.v_rot = hadamard(head_dim) if cfg.value_rotation else None
        nbk = 1 if cfg.key_scaling == "calibrated" else -(-max_seq // self.kg)
        self.capacity = cfg.fp_window + self.kg + extra_slots
        buf = self.register_buffer
        buf("k_codes", torch.zeros(batch, heads, max_seq, kva.packed_bytes(head_dim, self.kbits), dtype=torch.uint8),
            persistent=False)
        buf("v_codes", torch.zeros(batch, heads, max_seq, kva.packed_bytes(head_dim, self.vbits), dtype=torch.uint8),
            persistent=False)
        buf("k_meta", torch.zeros(batch, heads, nbk, 2, head_dim, dtype=torch.float16), persistent=False)
        buf("v_meta", torch.zeros(batch, heads, max_seq, 2, head_dim // self.vg, dtype=torch.float16),
            persistent=False)
        if calib is not None and calib.key_range is not None:
            self.k_meta[:] = calib.key_range.to(torch.float16)[None, :, None]
        levels = calib.levels if calib is not None else default_levels(cfg)
        if tuple(levels.shape) != (2, 2 ** max(self.kbits, self.vbits)):
            raise ConfigError(f"calibration levels {tuple(levels.shape)} do not match key_bits={self.kbits}, "
                              f"value_bits={self.vbits}", hint="calibrate with the same KVCacheConfig")
        buf("levels", levels.float().clone(), persistent=False)
        buf("kv_fp", torch.zeros(2, batch, heads, self.capacity, head_dim, dtype=torch.float16), persistent=False)
        n_out = math.ceil(cfg.outlier_frac * max_seq * head_dim * 1.25) + cfg.sink_tokens * head_dim
        buf("out_idx", torch.full((2, batch, heads, n_out), -1, dtype=torch.int32), persistent=False)
        buf("out_val", torch.zeros(2, batch, heads, n_out, dtype=torch.float16), persistent=False)
        r = cfg.gear_rank
        nbl = -(-max_seq // self.kg) if r else 0
        buf("lr_u", torch.zeros(2, batch, heads, max_seq if r else 0, r, dtype=torch.float16), persistent=False)
        buf("lr_v", torch.zeros(2, batch, heads, nbl, r, head_dim, dtype=torch.float16), persistent=False)
        self.n_q = 0  # quantized slots [0, n_q)
        self.n_fp = 0  # fp slots [n_q, n_q + n_fp)
        self.n_out = 0  # outlier entries used, per (k|v) (shared count, max over heads)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def reset(self) -> None:
        self.n_q = self.n_fp = self.n_out = 0
        self.out_idx.fill_(-1)

    # -- writing ----------------------------------------------------------------------------------
    def write(self, k: torch.Tensor, v: torch.Tensor, p0: int) -> None:
        """Write raw keys/values [B, H, T, D] at slots [p0, p0 + T).

        Flush schedule (depends only on p0, so plain and speculative decoding quantize the same tokens
        at the same positions): first, while the committed tokens before p0 that sit in the fp region
        number >= fp_window + key_group, the oldest block is quantized; then, if the write still does
        not fit the fp region (a long prefill), more blocks are quantized."""
        if not self._append(k, v, p0):
            self._store(self._stage(k, v, p0))

    def _append(self, k: torch.Tensor, v: torch.Tensor, p0: int) -> bool:
        """The common decode write -- no block to quantize, the new tokens fit the fp region after its
        committed part -- straight into the fp region (what `_stage` + `_store` do then, without building
        the pending copy: ~20 small tensor ops a layer and token fewer). False: take the general path."""
        i = p0 - self.n_q
        t = k.shape[2]
        if (p0 == 0 or self.v_rot is not None or not 0 <= i <= self.n_fp or i >= self.cfg.fp_window + self.kg
                or i + t > self.capacity):
            return False
        self.kv_fp[0, :, :, i:i + t] = k
        self.kv_fp[1, :, :, i:i + t] = v
        self.n_fp = i + t
        return True

    def _stage(self, k: torch.Tensor, v: torch.Tensor, p0: int) -> torch.Tensor:
        """First half of `write`: the committed-token flushes; returns every fp token from slot n_q on
        (the fp region's committed part, then the new tokens) as fp16 [2, B, H, n, D]."""
        if p0 == 0:
            self.reset()
        if p0 < self.n_q or p0 > self.n_q + self.n_fp:
            raise ConfigError(f"KV cache write at slot {p0} outside the fp region [{self.n_q}, "
                              f"{self.n_q + self.n_fp}]", hint="decode positions must be contiguous")
        if self.v_rot is not None:  # the cache holds rotated values everywhere (codes, fp region, sparse)
            v = v.float() @ self.v_rot
        kv = torch.stack([k, v]).to(torch.float16)
        pending = torch.cat([self.kv_fp[:, :, :, : p0 - self.n_q], kv], 3)  # [2, B, H, n, D]
        while p0 - self.n_q >= self.cfg.fp_window + self.kg:
            pending = self._flush_front(pending)
        over = max(0, pending.shape[3] - self.capacity)
        if over and self.n_q + -(-over // self.kg) * self.kg > self.max_seq:
            raise ConfigError(f"{pending.shape[3]} tokens do not fit the KV cache's fp region "
                              f"({self.capacity})", hint="raise extra_slots or max_seq_len")
        return pending

    def _store(self, pending: torch.Tensor) -> None:
        """Second half of `write`: quantize whole blocks until the rest fits the fp region (a long prefill: all of
        them in one `_flush`, as block-by-block would), keep the rest."""
        over = pending.shape[3] - self.capacity
        if over > 0:
            pending = self._flush_front(pending, -(-over // self.kg))
        self.kv_fp[:, :, :, : pending.shape[3]] = pending
        self.n_fp = pending.shape[3]

    def _flush_front(self, pending: torch.Tensor, blocks: int = 1) -> torch.Tensor:
        n = blocks * self.kg
        self._flush(pending[:, :, :, :n].float())
        return pending[:, :, :, n:]

    def depth_limit(self, length: int) -> int:
        """Deepest draft depth whose query would see the same quantized/fp split as plain decoding
        (a write at `length` flushes first; a plain query at length + d must not flush more)."""
        nq = self.n_q
        while length - nq >= self.cfg.fp_window + self.kg:
            nq += self.kg
        return nq + self.cfg.fp_window + self.kg - 1 - length

    def _flush(self, blk: torch.Tensor) -> None:
        """Quantize whole blocks [2, B, H, n * kg, D] into slots [n_q, n_q + n * kg) (what n one-block flushes would
        store: per-block key statistics, per-token value statistics, outliers in slot order)."""
        s0, s1 = self.n_q, self.n_q + blk.shape[3]
        nb = blk.shape[3] // self.kg
        sk = self.cfg.sink_tokens - s0  # sinks (kept exact) stay out of their block's key statistics
        if nb > 1 and self.cfg.key_scaling != "calibrated" and sk > 0:  # the sinks' block on its own
            self._flush(blk[:, :, :, : self.kg])
            self._flush(blk[:, :, :, self.kg:])
            return
        k, v = blk[0], blk[1]
        frac = self.cfg.outlier_frac
        if self.cfg.key_scaling == "calibrated":
            ks, kz = self.k_meta[:, :, 0, 0].float()[:, :, None], self.k_meta[:, :, 0, 1].float()[:, :, None]
        elif nb == 1:
            ks, kz = _range(k[:, :, sk:] if 0 < sk < k.shape[2] else k, 2, frac)  # per channel: [B, H, D]
            self.k_meta[:, :, s0 // self.kg, 0], self.k_meta[:, :, s0 // self.kg, 1] = ks, kz
            ks, kz = ks[:, :, None], kz[:, :, None]
        else:  # per block and channel: [B, H, nb, D], then per token
            ks, kz = _range(k.unflatten(2, (nb, self.kg)), 3, frac)
            j0 = s0 // self.kg
            self.k_meta[:, :, j0:j0 + nb, 0], self.k_meta[:, :, j0:j0 + nb, 1] = ks, kz
            ks, kz = ks.repeat_interleave(self.kg, 2), kz.repeat_interleave(self.kg, 2)
        b, h, t, d = v.shape
        vgs = v.view(b, h, t, -1, self.vg)
        vs, vz = _range(vgs, -1, frac)  # [B, H, t, G]
        self.v_meta[:, :, s0:s1, 0], self.v_meta[:, :, s0:s1, 1] = vs, vz
        vs_f, vz_f = vs.repeat_interleave(self.vg, -1), vz.repeat_interleave(self.vg, -1)
        kc = _quantize(k, ks, kz, self.levels[0, : 2 ** self.kbits])
        vc = _quantize(v, vs_f, vz_f, self.levels[1, : 2 ** self.vbits])
        self.k_codes[:, :, s0:s1] = kva.pack(kc, self.kbits)
        self.v_codes[:, :, s0:s1] = kva.pack(vc, self.vbits)
        kd = self.levels[0][kc] * ks + kz
        vd = self.levels[1][vc] * vs_f + vz_f
        k_out = (k - kz).abs() > ks * 1.0001  # outside the range: dense-and-sparse outliers
        v_out = (v - vz_f).abs() > vs_f * 1.0001
        if not frac:
            k_out, v_out = torch.zeros_like(k_out), torch.zeros_like(v_out)
        sink = self.cfg.sink_tokens - s0  # attention-sink slots in this block: stored exactly
        if sink > 0:
            k_out[:, :, :sink], v_out[:, :, :sink] = True, True
        frac = frac or sink > 0
        if self.cfg.gear_rank:  # GEAR: low-rank fit of the error left once outliers are exact
            self._low_rank(0, torch.where(k_out, 0.0, k - kd) if frac else k - kd, s0)
            self._low_rank(1, torch.where(v_out, 0.0, v - vd) if frac else v - vd, s0)
        if frac:
            self._outliers(((0, k, k_out), (1, v, v_out)), s0)
        self.n_q = s1

    def _low_rank(self, which: int, err: torch.Tensor, s0: int) -> None:
        """GEAR: per block of kg slots, the rank-r SVD of its error [B, H, n * kg, D]."""
        r, t = self.cfg.gear_rank, err.shape[2]
        nb = t // self.kg
        u, s, vh = torch.linalg.svd(err.unflatten(2, (nb, self.kg)), full_matrices=False)  # [B, H, nb, kg, m] ...
        r = min(r, s.shape[-1])
        self.lr_u[which, :, :, s0: s0 + t, :r] = (u[..., :r] * s[..., None, :r]).flatten(2, 3).half()
        self.lr_v[which, :, :, s0 // self.kg: s0 // self.kg + nb, :r] = vh[..., :r, :].half()

    def _outliers(self, items, s0: int) -> None:
        """Dense-and-sparse: entries outside the quantization range are stored exactly (while room lasts)."""
        for which, x, out in items:  # out: bool [B, H, t, D]
            b, h, t, d = x.shape
            cap = self.out_idx.shape[-1]
            for bi in range(b):
                for hi in range(h):
                    flat = out[bi, hi].flatten().nonzero().flatten()
                    used = int((self.out_idx[which, bi, hi] >= 0).sum())
                    flat = flat[: max(0, cap - used)]
                    if flat.numel():
                        self.out_idx[which, bi, hi, used: used + flat.numel()] = (flat + s0 * d).int()
                        self.out_val[which, bi, hi, used: used + flat.numel()] = x[bi, hi].flatten()[flat].half()

    # -- speculative decoding support ---------------------------------------------------------------
    def move(self, src: list[int], dst: int) -> None:
        """Copy fp-region slots `src` to consecutive slots from `dst` (accepted draft path compaction)."""
        s = torch.tensor(src) - self.n_q
        if len(src) and (int(s.min()) < 0 or dst < self.n_q):
            raise ConfigError("cannot move quantized KV slots", hint="only draft tokens in the fp region move")
        self.kv_fp[:, :, :, dst - self.n_q: dst - self.n_q + len(src)] = self.kv_fp[:, :, :, s]

    def truncate(self, length: int) -> None:
        """Forget slots >= length (rejected drafts)."""
        self.n_fp = max(0, min(self.n_fp, length - self.n_q))

    # -- attention ----------------------------------------------------------------------------------
    def attend(self, q, k, v, input_pos, cos, sin, mask):
        """Write, then attend. A write too long for the fp region (a prefill chunk) is attended with its
        own keys and values in fp16 -- they are at hand -- and quantized into the cache afterwards, as
        KIVI's prefill does: queries see earlier chunks as stored, their own chunk exactly. The transient
        fp16 tokens are this call's activations, not cache memory; what the cache holds afterwards is the
        same as with `write` (decoding and draft trees always fit the fp region)."""
        p0 = int(input_pos[0])
        if self._append(k, v, p0):
            fits, pending = True, None
        else:
            pending = self._stage(k, v, p0)
            fits = pending.shape[3] <= self.capacity
            if fits:
                self._store(pending)
        kv_fp, n_fp = (self.kv_fp, self.n_fp) if fits else (pending.contiguous(), pending.shape[3])
        out = kva.call(
            q, self.k_codes, self.k_meta, self.v_codes, self.v_meta, self.levels, kv_fp, self.out_idx,
            self.out_val, self.lr_u, self.lr_v, cos, sin, mask, self.n_q, n_fp, self.kg, self.vg, self.kbits,
            self.vbits)
        if not fits:
            self._store(pending)
        return out if self.v_rot is None else out @ self.v_rot  # H is symmetric: H^T = H


def cache_factory(cfg: KVCacheConfig, calib: list[LayerCalibration] | None = None, extra_slots: int = 0):
    """A `cache_factory` for `LlamaForCausalLM.setup_cache`."""

    def make(i, c, batch, max_seq):
        return QuantKVCache(cfg, batch, c.num_kv_heads, max_seq, c.head_dim,
                            calib[i] if calib is not None else None, extra_slots)

    return make


@torch.inference_mode()
def cached_perplexity(model, windows: torch.Tensor, factory=None, chunk: int = 64) -> dict:
    """Perplexity measured THROUGH the cache: each window is fed in chunks of `chunk` tokens at their
    positions, so every chunk's queries attend to the earlier chunks as stored (quantized) in the cache.
    Scores all window-1 predictions per window (edgetk.eval's "all" scoring). factory None = fp cache."""
    seq = windows.shape[1]
    model.setup_cache(1, seq, cache_factory=factory)
    total, count = 0.0, 0
    try:
        for w in windows:
            logits = torch.cat([model(w[None, s: s + chunk], torch.arange(s, min(s + chunk, seq)))
                                for s in range(0, seq, chunk)], 1)[0, :-1]
            total += torch.nn.functional.cross_entropy(logits.float(), w[1:], reduction="sum").item()
            count += seq - 1
        bytes_ = model.kv_cache_bytes()
    finally:
        model.clear_cache()
    return {"perplexity": math.exp(total / count), "windows": int(windows.shape[0]), "window": seq,
            "chunk": chunk, "tokens_scored": count, "kv_cache_bytes": bytes_}
