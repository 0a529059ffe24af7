"""`edgetk eval MODEL_OR_ARTIFACT --text FILE [--max-windows N] [--prefill MODE] --json`."""
from __future__ import annotations

import typer

from .common import console, emit_json, kv_table, prefill_path, progress


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(model: str = typer.Argument("smollm2-135m", help="zoo name, HF directory, .gguf file or artifact"),
              text: str = typer.Option("eval", "--text", help="'eval' (Lee news), 'calib' (Wikipedia) or a "
                                       ".txt/.jsonl file"),
              max_windows: int = typer.Option(None, "--max-windows", min=1, help="score at most N windows"),
              window: int = typer.Option(512, "--window", min=16, help="tokens per window"),
              scoring: str = typer.Option("all", "--scoring", help="'all' predictions per window or "
                                          "'second-half' (llama.cpp's)"),
              allow_pickle: bool = typer.Option(False, "--allow-pickle"),
              prefill: str = typer.Option(None, "--prefill", help="how VQ layers run the windows, as "
                                          "EDGETK_PREFILL (auto, few, panel, lut, dense, bf16, int8): the "
                                          "perplexity cost of the reduced-precision paths"),
              json_: bool = typer.Option(False, "--json", help="print one JSON line")) -> None:
        """Perplexity of a decoder (non-overlapping windows) or embedding stats of an encoder."""
        from ..eval import evaluate
        from ..models import load

        with progress(json_), prefill_path(prefill):
            lm = load(model, allow_pickle=allow_pickle)
            result = evaluate(lm, text, max_windows=max_windows, window=window, scoring=scoring)
        if json_:
            emit_json(result)
        else:
            console.print(kv_table(f"eval {lm.name}", result))
