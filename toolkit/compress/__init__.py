"""Compression methods: a frozen config + `apply(loaded, cfg, calib) -> CompressionReport`, registered by config type.

    @register_method(VQConfig)
    def apply_vq(loaded: LoadedModel, cfg: VQConfig, calib: torch.Tensor | None) -> CompressionReport: ...
    PRESETS.register("vq2", [VQConfig(...)])            # a recipe = list of configs applied in order

`compress(loaded, "vq2")` runs a recipe (methods modify `loaded.model` in place and append their config to
`loaded.compression`); `with_settings("rotate+vq2-mix-kd", {"e2e_samples": 512})` is a recipe with fields changed.
A config that reads calibration windows says how many (`calib_windows`); `compress` draws at least that many.
`save(loaded, out, reports)` writes a "model" artifact; `edgetk.models.load(out)` reads it back.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..config import Config
from ..errors import ConfigError, DataError
from ..registry import Registry

METHODS: Registry[Callable] = Registry("compression method")
PRESETS: Registry[tuple] = Registry("recipe")
# modules that register methods/presets when imported (one line per method file)
METHOD_MODULES = ["edgetk.compress.vq", "edgetk.compress.rtn", "edgetk.compress.prune", "edgetk.compress.token_merge",
                  "edgetk.compress.rotate"]


def register_method(cfg_type: type) -> Callable:
    def deco(fn: Callable) -> Callable:
        METHODS.register(cfg_type, fn)
        return fn

    return deco


def register_preset(name: str, *configs: Config, description: str = "") -> None:
    PRESETS.register(name, tuple(configs))
    _DESCRIPTIONS[name] = description


_DESCRIPTIONS: dict[str, str] = {}


def load_methods() -> None:
    for mod in METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # a real missing dependency inside the module
                raise


def presets() -> dict[str, str]:
    load_methods()
    return {name: _DESCRIPTIONS.get(name, "") for name in PRESETS.names()}


@dataclass
class LayerReport:
    name: str
    method: str
    shape: tuple[int, ...]
    rel_error: float | None = None  # relative output (or weight) reconstruction error
    bits_per_weight: float | None = None
    sparsity: float | None = None
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompressionReport:
    method: str
    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    totals: dict[str, Any] = field(default_factory=dict)  # e.g. bits_per_weight, bits_per_weight_model
    stages: list[dict] = field(default_factory=list)  # e.g. loss before/after each refinement stage
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config, "layers": [l.to_dict() for l in self.layers],
                "totals": self.totals, "stages": self.stages, "seconds": self.seconds}


def resolve_recipe(recipe: str | Config | list | tuple) -> tuple[Config, ...]:
    load_methods()
    if isinstance(recipe, Config):
        return (recipe,)
    if isinstance(recipe, (list, tuple)):
        return tuple(c for r in recipe for c in resolve_recipe(r))
    if recipe in PRESETS:
        return PRESETS.get(recipe)
    if recipe.strip().startswith("{"):
        return (Config.from_json(recipe),)
    names = "+".join(recipe.split("+"))
    if "+" in names:
        return resolve_recipe(names.split("+"))
    PRESETS.get(recipe)  # raises ConfigError listing the known recipes
    raise AssertionError("unreachable")


def parse_settings(settings: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["e2e_samples=512", "ft_precision=float32"]` -> {"e2e_samples": 512, "ft_precision": "float32"}: values are
    JSON where they parse as JSON (numbers, true/false, lists), else plain strings."""
    import json

    out: dict[str, Any] = {}
    for s in settings:
        key, eq, value = s.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"setting {s!r} is not FIELD=VALUE", hint="e.g. --set e2e_samples=512")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def with_settings(recipe: str | Config | list, settings: dict[str, Any] | list[str] | tuple[str, ...]
                  ) -> list[Config]:
    """The recipe's configs with `settings` applied to every config that has the field (each config validates
    the new value). A field that no config of the recipe has is refused."""
    import dataclasses

    kv = parse_settings(settings) if isinstance(settings, (list, tuple)) else dict(settings)
    configs = resolve_recipe(recipe)
    names = [{f.name for f in dataclasses.fields(c)} for c in configs]
    unknown = sorted(set(kv) - set().union(*names))
    if unknown:
        known = sorted(set().union(*names))
        name = recipe if isinstance(recipe, str) else "+".join(c.KIND for c in configs)
        raise ConfigError(f"no config of recipe {name!r} has the field(s) {unknown}",
                          hint=f"fields of this recipe: {', '.join(known)}")
    out = []
    for c, n in zip(configs, names):
        changes = {k: v for k, v in kv.items() if k in n}
        try:
            out.append(c.replace(**changes) if changes else c)
        except (TypeError, ValueError) as exc:  # a value of the wrong type (validate raises ConfigError itself)
            raise ConfigError(f"settings {changes} do not fit config {getattr(c, 'KIND', type(c).__name__)!r}: "
                              f"{exc}", hint="give each field a value of its type, e.g. e2e_samples=512") from exc
    return out


DEFAULT_CALIB_WINDOWS = 128  # drawn when the caller does not say (more if a config of the recipe reads more)


def calib_windows_needed(recipe: str | Config | list) -> int:
    """The most calibration windows any config of the recipe reads (0: the recipe needs no calibration)."""
    return max([int(getattr(c, "calib_windows", 0)) for c in resolve_recipe(recipe)
                if getattr(c, "needs_calibration", False)], default=0)


def windows_to_draw(recipe: str | Config | list, n_samples: int | None = None) -> int:
    """How many calibration windows `compress` draws for the recipe: none if it reads none, else `n_samples`, by
    default max(DEFAULT_CALIB_WINDOWS, the most any of its configs reads)."""
    needed = calib_windows_needed(recipe)
    if not needed:
        return 0
    return n_samples if n_samples is not None else max(DEFAULT_CALIB_WINDOWS, needed)


def compress(loaded, recipe: str | Config | list, calib: torch.Tensor | None = None,
             calib_text: str = "calib", n_samples: int | None = None, seq_len: int = 512, seed: int = 0
             ) -> list[CompressionReport]:
    """Apply a recipe in order. Calibration windows are drawn once (from the calibration text) if any
    method needs them and `calib` is not given: `n_samples` of them, by default max(128, the most any config of
    the recipe reads). A config given fewer windows than it reads warns and uses those."""
    from ..data import calibration_windows, load_text

    configs = resolve_recipe(recipe)
    if calib is None and any(getattr(c, "needs_calibration", False) for c in configs):
        if loaded.tokenizer is None:
            raise DataError("this recipe needs calibration text but the model has no tokenizer",
                            hint="pass calibration token windows explicitly")
        calib = calibration_windows(loaded.tokenizer, windows_to_draw(configs, n_samples), seq_len, seed,
                                    text=load_text(calib_text))
    reports = []
    for cfg in configs:
        fn = METHODS.get(type(cfg))
        t0 = time.perf_counter()
        report = fn(loaded, cfg, calib)
        report.seconds = time.perf_counter() - t0
        loaded.compression.append(cfg.to_dict())
        reports.append(report)
    return reports


__all__ = ["METHODS", "PRESETS", "register_method", "register_preset", "presets", "LayerReport",
           "CompressionReport", "compress", "resolve_recipe", "with_settings", "parse_settings",
           "calib_windows_needed", "windows_to_draw", "DEFAULT_CALIB_WINDOWS", "ConfigError"]
