"""Kernel choice as data: (operator, device kind, format) -> implementation.

Every operator registers a `reference` implementation (plain PyTorch). Fast implementations register
under their own name; `select(op, device, fmt)` returns the preferred available one unless a
`force(...)` context or EDGETK_KERNEL=<name> pins a choice (tests pin "reference" to compare).

    register("codebook_gemm", "cpu", "eager", "reference", fn, priority=0)
    register("codebook_gemm", "cpu", "eager", "llvm", fn, priority=10, available=llvm_ok)
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from edgetk.errors import ConfigError


@dataclass(frozen=True)
class KernelEntry:
    op: str
    device: str
    fmt: str
    name: str
    fn: Callable
    priority: int
    available: Callable[[], bool]


_TABLE: dict[tuple[str, str, str], dict[str, KernelEntry]] = {}
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("edgetk_kernel", default=None)


_SORTED: dict[tuple[str, str, str], tuple[KernelEntry, ...]] = {}  # entries by priority (select runs per call)
# CPython's os.environ on POSIX keeps its items in this dict (bytes keys and values) and writes through it
_ENV_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def env(name: str) -> str | None:
    """os.environ.get(name) for settings read on every kernel call: ~0.07 us instead of ~1 us (os.environ.get
    encodes the key and goes through the Mapping machinery; an eager decode step calls the codebook op ~200 times).
    Reads the same dict os.environ writes, so changes made through os.environ show at once."""
    if isinstance(_ENV_DATA, dict):
        v = _ENV_DATA.get(name.encode())
        return None if v is None else os.fsdecode(v)
    return os.environ.get(name)


def register(op: str, device: str, fmt: str, name: str, fn: Callable, priority: int = 0,
             available: Callable[[], bool] = lambda: True) -> None:
    _TABLE.setdefault((op, device, fmt), {})[name] = KernelEntry(op, device, fmt, name, fn, priority, available)
    _SORTED.pop((op, device, fmt), None)


def _sorted(key: tuple[str, str, str]) -> tuple[KernelEntry, ...]:
    if key not in _SORTED:
        _SORTED[key] = tuple(sorted(_TABLE.get(key, {}).values(), key=lambda e: -e.priority))
    return _SORTED[key]


def entries(op: str, device: str = "cpu", fmt: str = "eager") -> list[KernelEntry]:
    return list(_sorted((op, device, fmt)))


def select(op: str, device: str = "cpu", fmt: str = "eager") -> KernelEntry:
    table = _TABLE.get((op, device, fmt), {})
    if "reference" not in table:
        raise ConfigError(f"operator {op!r} has no reference kernel for ({device}, {fmt})")
    forced = _forced.get() or env("EDGETK_KERNEL")
    if forced:
        if forced not in table:
            raise ConfigError(f"kernel {forced!r} is not registered for {op} on ({device}, {fmt})",
                              hint=f"registered: {sorted(table)}")
        return table[forced]
    for e in _sorted((op, device, fmt)):
        if e.available():
            return e
    return table["reference"]


@contextlib.contextmanager
def force(name: str | None) -> Iterator[None]:
    """Pin the kernel used inside the block (e.g. force("reference") in tests)."""
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)
