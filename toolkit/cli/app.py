"""The `edgetk` command. One module per command group in edgetk.cli; each defines `register(app)`.

Exit codes: 0 ok; 1 generic edgetk error; 2 bad config/usage; 3 unsupported op; 4 parity failure;
5 missing optional dependency; 6 bad artifact; 7 model cannot be loaded; 8 bad text data;
9 device/transport/toolchain error; 130 interrupted.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

import typer

from ..errors import EdgetkError
from .common import STATE, console

# Command modules, in help order. A module that is not in the tree yet is simply not offered.
COMMAND_MODULES = ("models", "eval", "compress", "export", "compile", "run", "bench", "devices", "report",
                   "deploy")

app = typer.Typer(name="edgetk", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Compress, export, compile and measure PyTorch models for edge devices.")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show full tracebacks and debug logs"),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="show info logs")) -> None:
    STATE["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        mod = f"{__package__}.{name}_cmd"
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod).register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
        return 0
    except EdgetkError as exc:
        if STATE["debug"]:
            raise
        console.print(f"[bold red]error:[/] {exc.args[0] if exc.args else exc}")
        if exc.hint:
            console.print(f"[yellow]hint:[/] {exc.hint}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # click usage errors and the like (typer vendors click: match by class name)
        kinds = {c.__name__ for c in type(exc).__mro__}
        if "Exit" in kinds:
            sys.exit(getattr(exc, "exit_code", 0))
        if "ClickException" in kinds:
            exc.show()
            sys.exit(2)
        if "Abort" in kinds:
            sys.exit(130)
        if STATE["debug"]:
            raise
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}")
        console.print("[yellow]hint:[/] rerun with --debug for the traceback and report it")
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
