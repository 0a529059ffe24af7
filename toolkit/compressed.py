"""Saving and loading compressed models as "model" artifacts (format "eager").

A compressed model = its base architecture config + the modules that compression replaced. Each replaced
module type registers in `MODULE_TYPES` with `to_spec(module) -> dict` and `from_spec(spec) -> nn.Module`
(empty, right shapes; weights come from the state dict). Saving writes `model.safetensors` (the state dict,
compressed tensors stay compressed), `tokenizer.json` and a manifest with the base config, the module specs,
the compression configs, their reports and totals (e.g. `bits_per_weight`). Loading rebuilds the base
model, swaps in the recorded modules, and loads the state dict.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .artifact import Artifact, ArtifactWriter
from .config import Config
from .errors import ArtifactError
from .models import ARTIFACT_LOADERS, LoadedModel
from .models.bert import BertEncoder
from .models.llama import LlamaForCausalLM
from .models.tokenizer import Tokenizer
from .registry import Registry

KIND = "model"


@dataclass(frozen=True)
class ModuleType:
    cls: type
    to_spec: Callable[[nn.Module], dict]
    from_spec: Callable[[dict], nn.Module]


MODULE_TYPES: Registry[ModuleType] = Registry("module type")
MODULE_TYPES.register("Linear", ModuleType(
    nn.Linear, lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    lambda s: nn.Linear(s["in_features"], s["out_features"], bias=s["bias"])))

_ARCH = {"llama": LlamaForCausalLM, "bert": BertEncoder}


def _type_name(m: nn.Module) -> str | None:
    for name, mt in MODULE_TYPES.items():
        if type(m) is mt.cls:
            return name
    return None


def module_specs(model: nn.Module, base: nn.Module | None = None) -> dict[str, dict]:
    """Specs of every registered-type module whose type or shape differs from a fresh base model."""
    ref = dict(base.named_modules()) if base is not None else {}
    specs = {}
    for name, m in model.named_modules():
        t = _type_name(m)
        if t is None:
            continue
        spec = {"type": t, **MODULE_TYPES.get(t).to_spec(m)}
        r = ref.get(name)
        if r is not None and _type_name(r) == t and MODULE_TYPES.get(t).to_spec(r) == MODULE_TYPES.get(t).to_spec(m):
            continue
        specs[name] = spec
    return specs


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def save(loaded: LoadedModel, out: str | os.PathLike, reports: list | None = None, **manifest: Any) -> Artifact:
    from safetensors.torch import save_file

    cfg = loaded.config
    if not isinstance(cfg, Config) or cfg.KIND not in _ARCH:
        raise ArtifactError(f"cannot save a compressed {type(loaded.model).__name__}",
                            hint="compressed-model artifacts hold edgetk decoders/encoders; export other modules")
    base = _ARCH[cfg.KIND](cfg)
    specs = module_specs(loaded.model, base)
    state = {k: v.detach().contiguous() for k, v in loaded.model.state_dict().items()}
    if getattr(cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    reports = [r.to_dict() if hasattr(r, "to_dict") else r for r in (reports or [])]
    totals: dict[str, Any] = {}
    for r in reports:
        totals.update(r.get("totals", {}))
    with ArtifactWriter(out, kind=KIND, format="eager", model_kind=loaded.kind, name=loaded.name,
                        base_config=cfg.to_dict(), modules=specs, compression=loaded.compression,
                        reports=reports, source_model={"source": loaded.source, "sha256": loaded.source_sha256},
                        **totals, **manifest) as w:
        save_file(state, str(w.path("model.safetensors")))
        if loaded.tokenizer is not None:
            w.path("tokenizer.json").write_text(loaded.tokenizer.json_text)
    return Artifact.load(out)


def load_artifact(art: Artifact) -> LoadedModel:
    from safetensors.torch import load_file

    m = art.manifest
    cfg = Config.from_dict(m["base_config"])
    model = _ARCH[cfg.KIND](cfg)
    for name, spec in m.get("modules", {}).items():
        spec = dict(spec)
        _set_module(model, name, MODULE_TYPES.get(spec.pop("type")).from_spec(spec))
    state = load_file(str(art.file("model.safetensors")))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(cfg, "tie_embeddings", False))]
    if missing or unexpected:
        raise ArtifactError(f"artifact {art.root} state does not match its module specs: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}", hint="re-create the artifact")
    if getattr(cfg, "tie_embeddings", False) and isinstance(model, LlamaForCausalLM):
        model.lm_head.weight = model.model.embed_tokens.weight
    tok = None
    if "tokenizer.json" in m["files"]:
        tok = Tokenizer.from_file(art.file("tokenizer.json"), getattr(cfg, "bos_token_id", None),
                                  getattr(cfg, "eos_token_id", None))
    src = m.get("source_model", {})
    return LoadedModel(name=m.get("name", art.root.name), kind=m.get("model_kind", "decoder"), model=model.eval(),
                       tokenizer=tok, config=cfg, source=str(art.root), source_sha256=src.get("sha256", ""),
                       compression=list(m.get("compression", [])), extra={"artifact": art})


ARTIFACT_LOADERS.register(KIND, load_artifact)


def ensure_registered() -> None:
    """Import the modules that register module types (compression methods) so artifacts can load."""
    from .compress import load_methods

    load_methods()
