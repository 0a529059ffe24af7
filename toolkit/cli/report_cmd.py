"""`edgetk report RESULTS... -o OUT`: render past results side by side (JSON, markdown, PNG, HTML)."""
from __future__ import annotations

from typing import List

import typer

from .common import console, emit_json


def register(app: typer.Typer) -> None:
    @app.command("report")
    def report(results: List[str] = typer.Argument(..., help="bench JSON files, JSON-lines, report.json or run dirs"),
               out: str = typer.Option(..., "--out", "-o", help="output directory"),
               title: str = typer.Option("edgetk results side by side", "--title"),
               json_: bool = typer.Option(False, "--json")) -> None:
        """Merge benchmark results and write report.json, report.md, latency.png and report.html."""
        from edgetk.report import load_results

        rep = load_results(results)
        rep.title = title
        paths = rep.write(out)
        if json_:
            emit_json({k: str(v) for k, v in paths.items()})
        else:
            console.print(rep.markdown())
            console.print(f"[green]✓[/] {paths['html']}")
