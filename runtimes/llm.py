"""The embeddable LLM generation API: prefill + decode over a static (optionally quantized) KV cache,
greedy or sampled, with optional lossless speculative decoding, streaming and metrics.

    from edgetk.runtimes.llm import LLM
    from edgetk.runtimes.kv_cache import KVCacheConfig
    llm = LLM.load("smollm2-135m", kv_cache=KVCacheConfig(bits=4), max_seq_len=1024)
    r = llm.generate("The capital of France is", max_new_tokens=32, speculative="recycling",
                     on_token=lambda tok_id, piece: print(piece, end=""))
    r.text, r.token_ids, r.metrics.decode_tok_s

Documented behaviour for edge cases:
* empty prompt (no tokens after encoding): `DataError`.
* prompt with >= max_seq_len tokens: `DataError` naming both lengths. A prompt that fits but whose
  continuation would not: generation stops when the cache is full (`stop_reason == "cache_full"`).
* stop strings that never occur: generation runs to `max_new_tokens` (`stop_reason == "length"`);
  when one occurs, `.text` ends before it (`stop_reason == "stop"`); the EOS token ends with "eos" (not with
  `generate(..., ignore_eos=True)`, for speed measurements: always `max_new_tokens` tokens).
* non-finite logits (NaN/Inf from a broken model): `NonFiniteLogitsError`, never a garbage token.
* a tokenizer whose vocabulary does not fit the model's embedding, or that differs from the one an
  artifact was saved with: `ModelLoadError`.
`LLM.load` sets a cache up on the model it is given (pass a copy to keep yours untouched).
"""
from __future__ import annotations

import contextlib
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from edgetk.artifact import Artifact
from edgetk.errors import ArtifactError, ConfigError, DataError, EdgetkError, ModelLoadError
from edgetk.kernels import few_rows_linear as few_rows
from edgetk.models import LlamaForCausalLM, LoadedModel, Tokenizer, load
from edgetk.registry import Registry

from . import kv_cache as kvc
from .spec import SpecConfig, SpeculativeStepper

log = logging.getLogger(__name__)


class NonFiniteLogitsError(EdgetkError):
    """The model produced NaN or Inf logits."""

    exit_code = 1


@dataclass
class GenerationMetrics:
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_s: float = 0.0  # time to first token (prefill + first sampling)
    prefill_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_s: float = 0.0
    decode_tok_s: float = 0.0  # tokens after the first / decode time
    steps: int = 0  # decoder forward passes after prefill
    tokens_per_step: float = 0.0  # mean tokens emitted per decode step (1.0 without speculation)
    mean_accepted: float = 0.0  # mean accepted draft tokens per speculative step
    kv_cache_bytes: int = 0
    peak_rss_mib: float = 0.0
    backend: str = "eager"
    speculative: str | None = None
    kv_bits: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stop_reason: str  # "length" | "eos" | "stop" | "cache_full"
    metrics: GenerationMetrics = field(default_factory=GenerationMetrics)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": len(self.prompt_ids),
                "stop_reason": self.stop_reason, "metrics": self.metrics.to_dict()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# -- decoder backends ---------------------------------------------------------------------------------
class EagerDecoder:
    """edgetk's PyTorch decoder with its static cache (dense fp32 or quantized)."""

    name = "eager"
    supports_tree = True

    def __init__(self, loaded: LoadedModel, max_seq_len: int, kv_cache: kvc.KVCacheConfig | None,
                 extra_slots: int = 0, calib_text: str | None = None):
        model = loaded.model
        if not isinstance(model, LlamaForCausalLM):
            raise ModelLoadError(f"{loaded.name} is not an edgetk decoder ({type(model).__name__})",
                                 hint="load a decoder: a zoo name, HF directory, .gguf or decoder artifact")
        if max_seq_len > model.cfg.max_seq_len:
            raise ConfigError(f"max_seq_len {max_seq_len} exceeds the model's {model.cfg.max_seq_len}",
                              hint=f"use max_seq_len <= {model.cfg.max_seq_len}")
        self.model, self.max_seq_len, self.kv = model, max_seq_len, kv_cache
        factory = None
        if kv_cache is not None:
            calib = None
            if kv_cache.needs_calibration:
                calib = kvc.calibrate(model, _calib_windows(loaded, kv_cache, calib_text), kv_cache)
            factory = kvc.cache_factory(kv_cache, calib, extra_slots)
        self.linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
        warm_up(model, self.linears, extra_slots)
        model.setup_cache(1, max_seq_len, cache_factory=factory)
        self.vocab = model.cfg.vocab_size

    @torch.inference_mode()
    def forward(self, tokens, start: int, attn_mask=None, rope_pos=None, last_only: bool = False) -> torch.Tensor:
        """Logits [T, V] of `tokens` written at slots start..start+T-1 (last_only: [1, V], the last token's: a
        prompt's head then costs one row, not T -- ~1.8 G multiply-adds for 64 tokens of smollm2)."""
        t = torch.as_tensor(tokens, dtype=torch.long).flatten()
        pos = torch.arange(start, start + t.numel())
        # decode steps and draft trees: stream each weight once, on every thread (kernels/few_rows_linear.py)
        few = t.numel() <= few_rows.MAX_ROWS
        with few_rows.few_rows_linears(self.linears) if few else contextlib.nullcontext():
            if not last_only or t.numel() == 1:
                return self.model(t[None], pos, attn_mask=attn_mask, rope_pos=rope_pos)[0].float()
            h = self.model.hidden_states(t[None], pos, attn_mask=attn_mask, rope_pos=rope_pos)
        head = self.model.lm_head
        with few_rows.few_rows_linears([head] if type(head) is torch.nn.Linear else []):  # one row
            return head(h[0, -1:]).float()

    def tree_mask(self, length: int, ancestors: torch.Tensor) -> torch.Tensor:
        t = ancestors.shape[0]
        mask = torch.zeros(t, self.max_seq_len, dtype=torch.bool)
        mask[:, :length] = True
        mask[:, length: length + t] = ancestors
        return mask

    def compact(self, src: list[int], dst: int) -> None:
        """Move cache slots `src` (ascending, >= dst) to dst, dst+1, ... (accepted draft path)."""
        if src == list(range(dst, dst + len(src))):
            return
        s = torch.tensor(src)
        d = torch.arange(dst, dst + len(src))
        for layer in self.model.model.layers:
            c = layer.self_attn.kv_cache
            if hasattr(c, "move"):
                c.move(src, dst)
            else:  # DenseKVCache
                c.k[:, :, d] = c.k[:, :, s]
                c.v[:, :, d] = c.v[:, :, s]

    def kv_cache_bytes(self) -> int:
        return self.model.kv_cache_bytes()

    def depth_limit(self, length: int) -> int:
        """Deepest draft-tree depth the cache serves exactly as plain decoding would (quantized caches)."""
        limits = [l.self_attn.kv_cache.depth_limit(length) for l in self.model.model.layers
                  if hasattr(l.self_attn.kv_cache, "depth_limit")]
        return min(limits) if limits else 1 << 30


WARM_UP_ROWS = (1, 32)  # a decode step and a short prompt (past the few-input kernel's 12 rows: panel or LUT GEMM)


def warm_up_rows(tree_rows: int = 0) -> tuple[int, ...]:
    """WARM_UP_ROWS and a speculative-decoding verify step of `tree_rows` rows (0: none), ascending."""
    return tuple(sorted({*WARM_UP_ROWS, tree_rows} - {0}))


@torch.inference_mode()
def warm_up(model: LlamaForCausalLM, linears: list[torch.nn.Linear] = (), tree_rows: int = 0) -> None:
    """Run the model once per row count of `warm_up_rows(tree_rows)`, without a cache, so that the kernels its
    layers pick (codebook GEMV / few-input GEMM / prefill GEMM: JIT-compiled per shape class and packed on first
    use, ~1 s for smollm2 at 2 bits; the fp32 GEMV of the plain `linears` that decode steps route through
    `few_rows_linears`) are ready at load time rather than inside the first generation's time to first token and
    decode rate."""
    model.clear_cache()
    for rows in warm_up_rows(tree_rows):
        with few_rows.few_rows_linears(list(linears)) if rows <= few_rows.MAX_ROWS else contextlib.nullcontext():
            model(torch.zeros(1, min(rows, model.cfg.max_seq_len), dtype=torch.long))


def _calib_windows(loaded: LoadedModel, cfg: kvc.KVCacheConfig, text: str | None) -> torch.Tensor:
    from edgetk.data import calibration_windows

    return calibration_windows(loaded.tokenizer, cfg.calib_windows, cfg.calib_seq_len, seed=0, text=text)


class SessionDecoder:
    """An exported decoder-step artifact (ONNX / ExecuTorch / TVM, from `edgetk export`) run through
    `edgetk.runtimes.Session`, one token per call, dense fp cache carried as the artifact dictates
    ("explicit": cache tensors in and out; "mutable": cache inside the program). No tree attention
    (speculative decoding needs the eager backend) and no quantized cache (the graph fixes the cache)."""

    supports_tree = False

    def __init__(self, artifact, max_seq_len: int, kv_cache: kvc.KVCacheConfig | None, **_):
        import numpy as np

        from .session import Session

        meta = artifact.manifest.get("decoder")
        if not meta:
            raise ArtifactError(f"artifact {artifact.root} is not a decoder step",
                                hint="export a decoder with `edgetk export MODEL --format onnx`")
        if kv_cache is not None:
            raise ConfigError("a quantized KV cache needs the eager backend; exported steps carry a dense cache",
                              hint="drop kv_cache, or load the model (not the export) with backend='eager'")
        self.name = str(artifact.manifest.get("format"))
        self.sess, self.meta, self._np = Session(artifact), meta, np
        self.max_seq_len = min(int(meta["max_seq_len"]), max_seq_len)
        self.vocab = int(meta["vocab_size"])
        shape = list(meta["cache_shape"])
        self._zero = np.zeros(shape, np.float32)
        self.k = self.v = self._zero

    def forward(self, tokens, start: int, attn_mask=None, rope_pos=None, last_only: bool = False) -> torch.Tensor:
        np = self._np
        if start == 0:
            self.k, self.v = self._zero.copy(), self._zero.copy()
        rows = []
        for i, t in enumerate(torch.as_tensor(tokens).flatten().tolist()):
            ins = [np.array([[t]], np.int64), np.array([start + i], np.int64)]
            if self.meta["mode"] == "explicit":
                out = self.sess.run(ins + [self.k, self.v])
                self.k, self.v = np.asarray(out[1]), np.asarray(out[2])
            else:
                out = self.sess.run(ins)
            rows.append(torch.from_numpy(np.asarray(out[0], np.float32).reshape(-1)))
        return torch.stack(rows[-1:] if last_only else rows)

    def kv_cache_bytes(self) -> int:
        return 2 * self._zero.nbytes

    def depth_limit(self, length: int) -> int:
        return 0


BACKENDS: Registry[type] = Registry("LLM backend")
BACKENDS.register("eager", EagerDecoder)


# -- the API --------------------------------------------------------------------------------------------
@dataclass
class _Sampling:
    greedy: bool
    temperature: float
    top_p: float
    gen: torch.Generator | None

    def pick(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        from edgetk.kernels.tree_verify import target_probs

        p = target_probs(logits, self.temperature, self.top_p)
        return int(torch.multinomial(p, 1, generator=self.gen))


class LLM:
    def __init__(self, loaded: LoadedModel, decoder, tokenizer: Tokenizer, kv_cache: kvc.KVCacheConfig | None,
                 spec_config: SpecConfig | None = None):
        self.loaded, self.decoder, self.tokenizer, self.kv_cache = loaded, decoder, tokenizer, kv_cache
        self.spec_config = spec_config or SpecConfig()
        self._steppers: dict[str, SpeculativeStepper] = {}

    @classmethod
    def load(cls, model: str | LoadedModel | torch.nn.Module, kv_cache: kvc.KVCacheConfig | str | None = None,
             backend: str = "eager", max_seq_len: int = 2048, tokenizer: Tokenizer | str | None = None,
             spec_config: SpecConfig | None = None, calib_text: str | None = None) -> "LLM":
        exported = _exported_step(model)
        if exported is not None:
            return cls._load_exported(exported, kv_cache, max_seq_len, tokenizer, spec_config)
        loaded = load(model)
        if loaded.kind != "decoder":
            raise ModelLoadError(f"{loaded.name} is a {loaded.kind}, not a decoder",
                                 hint="LLM.load needs a causal LM (e.g. smollm2-135m)")
        if isinstance(kv_cache, str):
            kv_cache = kvc.preset(kv_cache)
        tok = _resolve_tokenizer(loaded, tokenizer)
        spec_cfg = spec_config or SpecConfig()
        extra = SpeculativeStepper.tree_size_for(spec_cfg)
        dec = BACKENDS.get(backend)(loaded, max_seq_len, kv_cache, extra_slots=extra, calib_text=calib_text)
        return cls(loaded, dec, tok, kv_cache, spec_cfg)

    @classmethod
    def _load_exported(cls, art: Artifact, kv_cache, max_seq_len: int, tokenizer, spec_config) -> "LLM":
        from edgetk.models import LlamaConfig

        dec = SessionDecoder(art, max_seq_len, kvc.preset(kv_cache) if isinstance(kv_cache, str) else kv_cache)
        if tokenizer is None:  # the artifact names its source model; its tokenizer comes from there
            src = art.manifest.get("source_model", "")
            try:
                tokenizer = load(src).tokenizer
            except EdgetkError:
                raise ModelLoadError(f"exported artifact {art.root} carries no tokenizer and its source "
                                     f"{src!r} cannot be loaded", hint="pass tokenizer='tokenizer.json'") from None
        cfg = LlamaConfig(vocab_size=dec.vocab, max_seq_len=int(dec.meta["max_seq_len"]))
        shell = LoadedModel(art.manifest.get("source_model", "exported"), "decoder", torch.nn.Identity(),
                            None, cfg, source=str(art.root))
        tok = _resolve_tokenizer(shell, tokenizer, dec.vocab)
        shell.config = cfg.replace(eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
        return cls(shell, dec, tok, None, spec_config)

    # -- generation -------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise DataError("the prompt is empty (no tokens)", hint="pass some text to continue")
        if len(ids) >= self.decoder.max_seq_len:
            raise DataError(f"the prompt has {len(ids)} tokens; the KV cache holds {self.decoder.max_seq_len}",
                            hint="shorten the prompt or load with a larger max_seq_len")
        return ids

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, greedy: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] = (), speculative: str | None = None,
                 on_token: Callable[[int, str], None] | None = None, ignore_eos: bool = False) -> GenerationResult:
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens = {max_new_tokens} is invalid", hint="ask for at least 1 token")
        if not greedy and (temperature <= 0 or not 0 < top_p <= 1):
            raise ConfigError(f"temperature {temperature} / top_p {top_p} invalid",
                              hint="temperature > 0 and top_p in (0, 1]")
        ids = self.encode(prompt)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        samp = _Sampling(greedy, temperature, top_p, gen)
        stepper = self._stepper(speculative)
        m = GenerationMetrics(prompt_tokens=len(ids), backend=self.decoder.name, speculative=speculative,
                              kv_bits=self.kv_cache.bits if self.kv_cache else None)
        run = _Run(self, ids, max_new_tokens, list(stop), on_token, ignore_eos)
        t0 = time.perf_counter()
        logits = self.decoder.forward(ids, 0, last_only=stepper is None)  # speculation primes on every row
        _check_finite(logits[-1:])
        if stepper is not None:
            stepper.prime(ids, logits)
        m.prefill_s = time.perf_counter() - t0
        first = samp.pick(logits[-1])
        m.ttft_s = time.perf_counter() - t0
        run.emit([first])
        t1 = time.perf_counter()
        accepted = []
        while not run.done:
            length = len(ids) + len(run.tokens) - 1  # committed slots; the last token is pending
            room = self.decoder.max_seq_len - length
            if room < 1:
                run.reason = "cache_full"
                break
            if stepper is not None and room >= stepper.tree_size:
                prev = (ids + run.tokens)[-2]
                out = stepper.step(length, run.tokens[-1], prev, None if greedy else
                                   (temperature, top_p, gen))
                accepted.append(out.accepted)
                run.emit(out.tokens)
            else:
                logits = self.decoder.forward([run.tokens[-1]], length)
                _check_finite(logits)
                run.emit([samp.pick(logits[-1])])
            m.steps += 1
        m.decode_s = time.perf_counter() - t1
        return self._finish(run, m, accepted)

    def _finish(self, run: "_Run", m: GenerationMetrics, accepted: list[int]) -> GenerationResult:
        m.prefill_tok_s = m.prompt_tokens / m.prefill_s if m.prefill_s else 0.0
        m.new_tokens = len(run.tokens)
        m.decode_tok_s = (m.new_tokens - 1) / m.decode_s if m.decode_s > 0 and m.new_tokens > 1 else 0.0
        m.tokens_per_step = (m.new_tokens - 1) / m.steps if m.steps else 0.0
        m.mean_accepted = sum(accepted) / len(accepted) if accepted else 0.0
        m.kv_cache_bytes = self.decoder.kv_cache_bytes()
        m.peak_rss_mib = peak_rss_mib()
        return GenerationResult(run.text(), list(run.tokens), run.prompt, run.reason, m)

    def _stepper(self, speculative: str | None) -> SpeculativeStepper | None:
        if speculative is None:
            return None
        if not getattr(self.decoder, "supports_tree", False):
            raise ConfigError(f"backend {self.decoder.name!r} cannot verify draft trees",
                              hint="use backend='eager' for speculative decoding")
        cfg = self.spec_config.replace(method=speculative)  # validates the name
        if not cfg.persist:  # a fresh drafter per generation: results independent of earlier prompts
            return SpeculativeStepper(self.decoder, cfg, self.decoder.vocab)
        if speculative not in self._steppers:
            self._steppers[speculative] = SpeculativeStepper(self.decoder, cfg, self.decoder.vocab)
        return self._steppers[speculative]


class _Run:
    """Bookkeeping of one generation: emitted tokens, streaming, stop conditions."""

    def __init__(self, llm: LLM, prompt: list[int], max_new: int, stop: list[str], on_token, ignore_eos=False):
        self.llm, self.prompt, self.max_new, self.stop, self.on_token = llm, prompt, max_new, stop, on_token
        self.tokens: list[int] = []
        self.done, self.reason = False, "length"
        self._streamed = ""
        self._cut: int | None = None
        self.eos = llm.tokenizer.eos_id if llm.tokenizer.eos_id is not None else llm.loaded.config.eos_token_id
        if ignore_eos:  # speed measurements: always max_new tokens, whatever the model emits
            self.eos = None

    def emit(self, toks: list[int]) -> None:
        for t in toks:
            if self.done:
                return
            self.tokens.append(int(t))
            if self.on_token is not None:
                full = self.llm.tokenizer.decode(self.tokens)
                piece, self._streamed = full[len(self._streamed):], full
                self.on_token(int(t), piece)
            if self.eos is not None and int(t) == self.eos:
                self.done, self.reason = True, "eos"
            elif self.stop and self._stop_hit():
                self.done, self.reason = True, "stop"
            elif len(self.tokens) >= self.max_new:
                self.done = True

    def _stop_hit(self) -> bool:
        tail = self.llm.tokenizer.decode(self.tokens[-32:])
        if not any(s in tail for s in self.stop):
            return False
        full = self.llm.tokenizer.decode(self.tokens)
        hits = [full.find(s) for s in self.stop if s in full]
        self._cut = min(hits) if hits else None
        return self._cut is not None

    def text(self) -> str:
        full = self.llm.tokenizer.decode(self.tokens)
        return full[: self._cut] if self._cut is not None else full


def _check_finite(logits: torch.Tensor) -> None:
    if not torch.isfinite(logits).all():
        raise NonFiniteLogitsError("the model produced non-finite logits (NaN or Inf)",
                                   hint="the weights are broken or overflowed; check the compression recipe "
                                        "or evaluate the model with `edgetk eval`")


def _exported_step(model) -> Artifact | None:
    """The artifact if `model` is an exported (non-eager) artifact directory, else None."""
    from pathlib import Path

    if isinstance(model, (str, Path)) and Path(model).is_dir() and Artifact.is_artifact(Path(model)):
        art = Artifact.load(model)
        if art.manifest.get("format") not in (None, "eager") and "decoder" in art.manifest:
            return art
    return None


def _resolve_tokenizer(loaded: LoadedModel, tokenizer: Tokenizer | str | None, vocab: int | None = None) -> Tokenizer:
    tok = loaded.tokenizer
    if tokenizer is not None:
        given = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(
            tokenizer, getattr(loaded.config, "bos_token_id", None), getattr(loaded.config, "eos_token_id", None))
        if tok is not None and given.sha256 != tok.sha256:
            raise ModelLoadError(f"the tokenizer passed differs from the one saved with {loaded.name} "
                                 f"({given.vocab_size} vs {tok.vocab_size} tokens)",
                                 hint="drop the tokenizer argument to use the model's own tokenizer.json")
        tok = given
    if tok is None:
        raise ModelLoadError(f"{loaded.name} has no tokenizer", hint="pass tokenizer='path/to/tokenizer.json'")
    vocab = vocab or loaded.model.cfg.vocab_size
    if tok.vocab_size > vocab:
        raise ModelLoadError(f"the tokenizer has {tok.vocab_size} tokens but the model embeds {vocab}: "
                             "they do not belong together", hint="use the tokenizer saved with the model")
    return tok
