"""Progress reporting without printing from library code.

Library code wraps long loops in `track(...)` or uses `task(...)`. By default nothing is shown;
the CLI installs a renderer (rich) with `use_renderer`. Tests can install a recording renderer.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")


class Renderer(Protocol):
    def start(self, description: str, total: int | None) -> object: ...
    def advance(self, handle: object, n: int = 1) -> None: ...
    def stop(self, handle: object) -> None: ...


_renderer: contextvars.ContextVar[Renderer | None] = contextvars.ContextVar("edgetk_progress", default=None)


@contextlib.contextmanager
def use_renderer(renderer: Renderer | None) -> Iterator[None]:
    token = _renderer.set(renderer)
    try:
        yield
    finally:
        _renderer.reset(token)


class _Task:
    def __init__(self, renderer: Renderer | None, handle: object):
        self._r, self._h = renderer, handle

    def advance(self, n: int = 1) -> None:
        if self._r is not None:
            self._r.advance(self._h, n)


@contextlib.contextmanager
def task(description: str, total: int | None = None) -> Iterator[_Task]:
    r = _renderer.get()
    handle = r.start(description, total) if r is not None else None
    try:
        yield _Task(r, handle)
    finally:
        if r is not None:
            r.stop(handle)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total) as t:
        for item in items:
            yield item
            t.advance()
