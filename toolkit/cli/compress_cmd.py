"""`edgetk compress MODEL --recipe R [--set FIELD=VALUE ...] [--calib TEXT] [--samples N] [--eval] -o OUT [--json]`
and `--list`.

Runs any registered recipe (VQ, RTN, pruning, token merging, ...), prints a per-layer table (reconstruction
error, bits per weight or sparsity, time), the totals (bits over the quantized layers and the whole model),
the refinement stages' losses, and with --eval the perplexity before and after on the same windows.
"""
from __future__ import annotations

import time

import typer

from .common import console, emit_json, kv_table, progress, table


def _layer_rows(reports) -> list[list]:
    rows = []
    for r in reports:
        for l in r.layers:
            rows.append([l.name, r.method, "x".join(map(str, l.shape)), l.rel_error, l.bits_per_weight, l.sparsity,
                         round(l.seconds, 2), l.note])
    return rows


def _stage_rows(reports) -> list[list]:
    """Loss before/after per stage kind, summed over layers/blocks."""
    agg: dict[str, list[float]] = {}
    for r in reports:
        for s in r.stages:
            if "before" not in s or "after" not in s:
                continue
            key = f"{r.method}:{s.get('stage', '?')}"
            a = agg.setdefault(key, [0.0, 0.0, 0])
            a[0] += float(s["before"])
            a[1] += float(s["after"])
            a[2] += 1
    return [[k, n, b, a, (a / b if b else None)] for k, (b, a, n) in agg.items()]


def _evaluate(lm, max_windows, text="eval"):
    from ..eval import evaluate

    return evaluate(lm, text, max_windows=max_windows) if lm.kind in ("decoder", "encoder") else None


def _render(lm, reports, totals, before, after, out_dir, seconds) -> None:
    console.print(table(f"compress {lm.name}: layers", ["layer", "method", "shape", "rel. error", "bits/weight",
                                                         "sparsity", "s", "note"], _layer_rows(reports)))
    stages = _stage_rows(reports)
    if stages:
        console.print(table("refinement stages (loss summed over layers/blocks)",
                            ["stage", "count", "before", "after", "after/before"], stages))
    summary = {k: v for k, v in totals.items() if not isinstance(v, (dict, list))}
    summary["seconds"] = round(seconds, 1)
    if before is not None and "perplexity" in before:
        summary.update({"perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
                        "perplexity_ratio": after["perplexity"] / before["perplexity"], "windows": after["windows"]})
    summary["artifact"] = str(out_dir)
    console.print(kv_table("summary", summary))


def register(app: typer.Typer) -> None:
    @app.command("compress")
    def compress_(model: str = typer.Argument("smollm2-135m", help="zoo name, HF directory, .gguf or artifact"),
                  recipe: str = typer.Option(None, "--recipe", "-r", help="preset name (see --list), 'a+b', "
                                             "or a config as JSON"),
                  calib: str = typer.Option("calib", "--calib", help="calibration text: 'calib' (Wikipedia) or a "
                                            ".txt/.jsonl file (never the evaluation text)"),
                  settings: list[str] = typer.Option(None, "--set", metavar="FIELD=VALUE",
                                                     help="change a field of every recipe config that has it "
                                                     "(repeatable; JSON values), e.g. --set e2e_samples=512"),
                  samples: int = typer.Option(None, "--samples", min=1, help="calibration windows drawn [default: "
                                              "128, or more if the recipe reads more]"),
                  seq_len: int = typer.Option(512, "--seq-len", min=8, help="tokens per calibration window"),
                  seed: int = typer.Option(0, "--seed"),
                  do_eval: bool = typer.Option(False, "--eval", help="perplexity before and after"),
                  max_windows: int = typer.Option(None, "--max-windows", min=1, help="evaluation windows"),
                  out: str = typer.Option(None, "--out", "-o", help="artifact directory to write"),
                  list_: bool = typer.Option(False, "--list", help="list the recipes and exit"),
                  json_: bool = typer.Option(False, "--json", help="print one JSON line")) -> None:
        """Compress a model with a recipe and save it as an artifact (`edgetk eval OUT` reads it back)."""
        from ..compress import presets

        if list_:
            ps = presets()
            if json_:
                emit_json({"recipes": ps})
            else:
                console.print(table("recipes", ["name", "description"], [[k, v] for k, v in ps.items()]))
            return
        _run(model, recipe, calib, samples, seq_len, seed, do_eval, max_windows, out, json_, settings or [])


def _run(model, recipe, calib, samples, seq_len, seed, do_eval, max_windows, out, json_, settings=()) -> None:
    from ..compress import compress, with_settings
    from ..compressed import save
    from ..errors import ConfigError, DataError
    from ..models import load

    if not recipe:
        raise ConfigError("no recipe given", hint="pass --recipe NAME; `edgetk compress --list` shows them")
    if not out:
        raise ConfigError("no output directory given", hint="pass -o OUT")
    if str(calib) == "eval":
        raise DataError("refusing to calibrate on the evaluation text", hint="use --calib calib or your own file")
    configs = with_settings(recipe, list(settings))  # unknown names and fields fail before the model loads
    label = recipe + "".join(f" {kv}" for kv in settings)
    t0 = time.perf_counter()
    with progress(json_):
        lm = load(model)
        before = _evaluate(lm, max_windows) if do_eval else None
        reports = compress(lm, configs, calib_text=calib, n_samples=samples, seq_len=seq_len, seed=seed)
        after = _evaluate(lm, max_windows) if do_eval else None
        extra = {"perplexity": {"before": before, "after": after}} if do_eval else {}
        art = save(lm, out, reports, recipe=label, **extra)
    seconds = time.perf_counter() - t0
    totals: dict = {}
    for r in reports:
        totals.update(r.totals)
    weights_file = art.manifest.get("files", {}).get("model.safetensors")
    if weights_file:
        totals["safetensors_bytes"] = weights_file["bytes"]
    if json_:
        emit_json({"model": lm.name, "recipe": label, "artifact": str(out), "totals": totals,
                   "reports": [r.to_dict() for r in reports], "before": before, "after": after,
                   "seconds": seconds})
    else:
        _render(lm, reports, totals, before, after, out, seconds)
