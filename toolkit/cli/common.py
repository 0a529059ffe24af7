"""Shared CLI plumbing: rich console, --json output, progress renderer, error rendering."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import ConfigError

console = Console(stderr=True)  # human output and progress go to stderr; stdout is for --json
out = Console()
STATE = {"debug": False}


def emit_json(obj: dict[str, Any]) -> None:
    """Print one JSON object on one line to stdout (the machine contract of every --json flag)."""
    sys.stdout.write(json.dumps(obj, default=_default, sort_keys=True) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


class RichRenderer:
    """edgetk.progress renderer drawing rich progress bars on stderr."""

    def __init__(self, enabled: bool = True):
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                                 transient=True, disable=not enabled)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def start(self, description: str, total: int | None):
        return self.progress.add_task(description, total=total)

    def advance(self, handle, n: int = 1) -> None:
        self.progress.advance(handle, n)

    def stop(self, handle) -> None:
        self.progress.remove_task(handle)


def progress(json_mode: bool = False):
    """Context manager: show progress bars for library work (hidden with --json or when not a TTY)."""
    import contextlib

    from ..progress import use_renderer

    @contextlib.contextmanager
    def _cm():
        r = RichRenderer(enabled=not json_mode and console.is_terminal)
        with r, use_renderer(r):
            yield r

    return _cm()


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def kv_table(title: str, data: dict[str, Any]) -> Table:
    return table(title, ["field", "value"], [[k, v] for k, v in data.items()])


@contextlib.contextmanager
def _env_scope(name: str, value: str | None):
    """os.environ[name] = value for the block, restored after; None leaves the environment as it is."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def lut_kernels(lut: str | None):
    """Context manager: EDGETK_LUT=`lut` (the batch-1 codebook LUT kernels, e.g. "q8") for the command's duration,
    validated first; None leaves the environment as it is."""
    value = None
    if lut is not None:
        from edgetk.kernels.llvm_codebook import LUT_KERNELS, parse_lut

        if not lut.strip(", "):
            raise ConfigError(f"--lut {lut!r} names no LUT kernel",
                              hint=f"use a comma-separated list among {LUT_KERNELS}, or none (float32 only)")
        value = ",".join(parse_lut(lut, "--lut") or ("none",))
    with _env_scope("EDGETK_LUT", value):
        yield


@contextlib.contextmanager
def prefill_path(prefill: str | None):
    """Context manager: EDGETK_PREFILL=`prefill` (how VQ layers run batch > 1: auto, lut, dense, bf16, int8) for the
    command's duration, validated first; None leaves the environment as it is."""
    if prefill is not None:
        from edgetk.kernels.llvm_codebook import PREFILL_MODES

        if prefill not in PREFILL_MODES:
            raise ConfigError(f"--prefill {prefill!r} is not a prefill mode", hint=f"use one of {PREFILL_MODES}")
    with _env_scope("EDGETK_PREFILL", prefill):
        yield
