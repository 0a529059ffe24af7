"""`edgetk deploy [MODEL] --recipe R --target T --device D -o RUN_DIR`: compress → export → compile → bench → report."""
from __future__ import annotations

from typing import Optional

import typer

from edgetk.deploy import DeployConfig

from .common import console, emit_json, progress, table


def register(app: typer.Typer) -> None:
    @app.command("deploy")
    def deploy(model: str = typer.Argument(DeployConfig.model, help="zoo name, HF dir, .gguf or model artifact"),
               recipe: str = typer.Option(DeployConfig.recipe, "--recipe", "-r",
                                           help="compression recipe (vq2 = 2-bit VQ; 'none' to skip)"),
               target: str = typer.Option(DeployConfig.target, "--target", "-t", help="device profile"),
               device: str = typer.Option(DeployConfig.device, "--device", "-d", help="where to benchmark (see edgetk bench)"),
               fmt: Optional[str] = typer.Option(None, "--format", help="export format (default from the target)"),
               runs: int = typer.Option(DeployConfig.runs, "--runs", "-n"),
               out: Optional[str] = typer.Option(None, "--out", "-o",
                                                 help="run directory (rerun to resume); default runs/MODEL-RECIPE-TARGET"),
               json_: bool = typer.Option(False, "--json")) -> None:
        """Run the whole chain with progress per stage; rerunning resumes after the last finished stage."""
        from edgetk.deploy import deploy as _deploy

        cfg = DeployConfig(model=model, recipe=recipe, target=target, device=device, format=fmt, runs=runs)
        out = out or str(cfg.default_run_dir())

        def on_stage(st) -> None:
            if not json_:
                mark = {"done": "[green]✓[/]", "resumed": "[cyan]↺[/]", "not built yet": "[yellow]–[/]",
                        "skipped": "[yellow]–[/]"}.get(st.status, "•")
                console.print(f"{mark} {st.name}: {st.status} {st.detail}")

        with progress(json_):
            run = _deploy(cfg, out, on_stage=on_stage)
        if json_:
            emit_json(run.to_dict())
        else:
            console.print(table(f"deploy {model} → {target} @ {device}", ["stage", "status", "seconds", "detail"],
                                [[s.name, s.status, s.seconds, s.detail] for s in run.stages]))
            if run.report:
                console.print(f"report: {run.report}")
