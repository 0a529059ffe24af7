"""Frozen, versioned configs that validate themselves and round-trip through JSON.

A config is a frozen dataclass deriving from `Config`, decorated with `@config("name", version=N)`.
It validates in `validate()` (called from `__post_init__`) and raises `ConfigError` naming the field.

    @config("prune", version=1)
    @dataclass(frozen=True)
    class PruneConfig(Config):
        sparsity: float = 0.5
        def validate(self):
            check(0 <= self.sparsity < 1, "sparsity", self.sparsity, "a fraction in [0, 1)")
"""
from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar, TypeVar

from .errors import ConfigError
from .registry import Registry

CONFIGS: Registry[type] = Registry("config kind")
C = TypeVar("C", bound="Config")


def check(ok: bool, field: str, value: Any, expected: str) -> None:
    """Raise ConfigError naming `field` unless `ok`."""
    if not ok:
        raise ConfigError(f"config field '{field}' = {value!r} is invalid: expected {expected}",
                          hint=f"fix '{field}'")


def config(kind: str, version: int = 1):
    """Class decorator: give a Config dataclass its JSON kind and version, and register it."""

    def deco(cls: type[C]) -> type[C]:
        cls.KIND = kind
        cls.VERSION = version
        CONFIGS.register(kind, cls)
        return cls

    return deco


@dataclasses.dataclass(frozen=True)
class Config:
    KIND: ClassVar[str] = "config"
    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # keep configs hashable and frozen all the way down
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Override: raise ConfigError naming the broken field."""

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.KIND, "version": self.VERSION}
        for f in dataclasses.fields(self):
            out[f.name] = _encode(getattr(self, f.name))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        data = dict(data)
        kind = data.pop("kind", cls.KIND)
        version = data.pop("version", cls.VERSION)
        target = cls if cls is not Config else CONFIGS.get(kind)
        if kind != target.KIND:
            raise ConfigError(f"config kind {kind!r} does not match {target.KIND!r}")
        if version > target.VERSION:
            raise ConfigError(
                f"config {kind!r} has version {version}, this edgetk reads up to {target.VERSION}",
                hint="upgrade edgetk",
            )
        names = {f.name: f for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"config {kind!r} has unknown field(s) {unknown}",
                              hint=f"known fields: {sorted(names)}")
        hints = typing.get_type_hints(target)
        kwargs = {k: _decode(v, hints.get(k)) for k, v in data.items()}
        return target(**kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def _encode(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any, hint: Any) -> Any:
    if isinstance(value, dict) and "kind" in value and value["kind"] in CONFIGS:
        return CONFIGS.get(value["kind"]).from_dict(value)
    if isinstance(value, list):
        return tuple(_decode(v, None) for v in value)
    return value
