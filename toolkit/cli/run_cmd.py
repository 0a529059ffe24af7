"""`edgetk run MODEL --prompt TEXT` (one generation) and `edgetk chat MODEL` (turns read from stdin).

    edgetk run smollm2-135m --prompt "The capital of France is" --max-new-tokens 32 --kv-bits 4 \
        --speculative recycling --json
    edgetk run ARTIFACT --prompt "..." --lut q8      # VQ layers through the int8-LUT GEMV (EDGETK_LUT)
    edgetk run ARTIFACT --prompt "..." --prefill bf16  # VQ prefill as a bf16 matmul (EDGETK_PREFILL)
    printf 'Hello\\nWhat is 2+2?\\n' | edgetk chat smollm2-135m --json

Text streams to stdout as it is generated (with --json: one JSON object per generation instead);
metrics go to stderr as a table.
"""
from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import ConfigError
from .common import console, emit_json, kv_table, lut_kernels, prefill_path, progress

LUT_HELP = ("batch-1 codebook LUT kernels for VQ layers, as EDGETK_LUT: q8 (int8 table, fastest, ~40 dB SNR), q16, "
            "none (float32); default: none (float32, equal to the reference up to summation order)")

PREFILL_HELP = ("how VQ layers run the prompt (batch > 1), as EDGETK_PREFILL: auto (default: up to 12 tokens "
                "the few-input kernel, else per layer the cheapest float32 path, panel, lut or "
                "dense; bf16 under torch's 'medium' float32 matmul precision), few (codewords decoded in registers), "
                "panel (each row tile decoded once into L1, shared by tiles of 6 tokens), "
                "lut (float32 LUT GEMM), dense (dequantize to float32 + fp32 matmul), bf16 (dequantize to bf16 + "
                "bf16 matmul, "
                "~50 dB SNR: fastest where the CPU has AMX / AVX-512 BF16), int8 (int8 codewords x 7-bit activations, "
                "~37 dB SNR: fastest on AVX2 and aarch64 CPUs without bf16)")

CHAT_TURN = "<|im_start|>{role}\n{text}<|im_end|>\n"
CHAT_REPLY = "<|im_start|>assistant\n"


def _load(model: str, kv_bits, kv_preset, max_seq_len: int, backend: str):
    from edgetk.runtimes.kv_cache import preset
    from edgetk.runtimes.llm import LLM

    if kv_bits is not None and kv_preset is not None:
        raise ConfigError("pass --kv-bits or --kv-preset, not both", hint="--kv-bits 4 means --kv-preset kv4")
    kv = preset(kv_preset) if kv_preset else preset(f"kv{kv_bits}") if kv_bits is not None else None
    return LLM.load(model, kv_cache=kv, backend=backend, max_seq_len=max_seq_len)


def _stream(json_mode: bool):
    if json_mode:
        return None

    def on_token(_tok: int, piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    return on_token


def _show_metrics(result, title: str) -> None:
    m = result.metrics.to_dict()
    m["stop_reason"] = result.stop_reason
    console.print(kv_table(title, m))


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run(model: str = typer.Argument("smollm2-135m", help="zoo name, HF directory, .gguf or artifact"),
            prompt: str = typer.Option(..., "--prompt", "-p", help="text to continue"),
            max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", min=1),
            kv_bits: Optional[int] = typer.Option(
                None, "--kv-bits", help="quantize the KV cache: 2, 3 or 4 bits per number (4: keys 5, values 3)"),
            kv_preset: Optional[str] = typer.Option(None, "--kv-preset", help="kv4, kv3, kv2, kv4-block, kv2-gear"),
            speculative: Optional[str] = typer.Option(None, "--speculative", help="recycling or aded"),
            temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
            top_p: float = typer.Option(1.0, "--top-p"),
            seed: Optional[int] = typer.Option(None, "--seed"),
            stop: list[str] = typer.Option([], "--stop", help="stop sequence (repeatable)"),
            max_seq_len: int = typer.Option(2048, "--max-seq-len", min=8),
            backend: str = typer.Option("eager", "--backend"),
            lut: Optional[str] = typer.Option(None, "--lut", help=LUT_HELP),
            prefill: Optional[str] = typer.Option(None, "--prefill", help=PREFILL_HELP),
            json_: bool = typer.Option(False, "--json", help="print one JSON line")) -> None:
        """Generate a continuation of a prompt, with metrics."""
        with lut_kernels(lut), prefill_path(prefill):
            with progress(json_):
                llm = _load(model, kv_bits, kv_preset, max_seq_len, backend)
            result = llm.generate(prompt, max_new_tokens, greedy=temperature <= 0,
                                  temperature=max(temperature, 1e-6), top_p=top_p, seed=seed, stop=stop,
                                  speculative=speculative, on_token=_stream(json_))
        if json_:
            emit_json(result.to_dict())
        else:
            sys.stdout.write("\n")
            _show_metrics(result, f"run {llm.loaded.name}")

    @app.command("chat")
    def chat(model: str = typer.Argument("smollm2-135m", help="zoo name, HF directory, .gguf or artifact"),
             max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1),
             kv_bits: Optional[int] = typer.Option(None, "--kv-bits"),
             kv_preset: Optional[str] = typer.Option(None, "--kv-preset"),
             speculative: Optional[str] = typer.Option(None, "--speculative"),
             system: str = typer.Option("", "--system", help="system message"),
             max_seq_len: int = typer.Option(2048, "--max-seq-len", min=64),
             lut: Optional[str] = typer.Option(None, "--lut", help=LUT_HELP),
             prefill: Optional[str] = typer.Option(None, "--prefill", help=PREFILL_HELP),
             json_: bool = typer.Option(False, "--json", help="one JSON line per reply")) -> None:
        """Chat: each line read from stdin is a user turn; replies stream to stdout. Ends at EOF or '/exit'."""
        with lut_kernels(lut), prefill_path(prefill):
            _chat(model, max_new_tokens, kv_bits, kv_preset, speculative, system, max_seq_len, json_)


def _chat(model, max_new_tokens, kv_bits, kv_preset, speculative, system, max_seq_len, json_) -> None:
    with progress(json_):
        llm = _load(model, kv_bits, kv_preset, max_seq_len, "eager")
    history: list[tuple[str, str]] = [("system", system)] if system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            console.print("[bold]you>[/] ", end="")
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        if not line.strip():
            continue
        history.append(("user", line.rstrip("\n")))
        prompt = _chat_prompt(llm, history, max_seq_len - max_new_tokens)
        result = llm.generate(prompt, max_new_tokens, speculative=speculative, stop=["<|im_end|>"],
                              on_token=_stream(json_))
        reply = result.text.strip()
        history.append(("assistant", reply))
        if json_:
            emit_json({"user": line.rstrip("\n"), "reply": reply, "stop_reason": result.stop_reason,
                       "metrics": result.metrics.to_dict()})
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()


def _chat_prompt(llm, history: list[tuple[str, str]], budget: int) -> str:
    """The chat-template prompt; the oldest turns are dropped while it exceeds `budget` tokens."""
    turns = list(history)
    while True:
        text = "".join(CHAT_TURN.format(role=r, text=t) for r, t in turns) + CHAT_REPLY
        if len(llm.tokenizer.encode(text)) <= budget or len(turns) <= 1:
            return text
        turns.pop(1 if turns[0][0] == "system" and len(turns) > 2 else 0)
