"""Artifact directories: files plus `manifest.json`, written atomically and verified on load.

    with ArtifactWriter(out_dir, kind="onnx") as w:
        onnx.save(model, w.path("model.onnx"))
        w.manifest["parity"] = {...}
    art = Artifact.load(out_dir)          # verifies every file's SHA-256 and size

Nothing is visible at `out_dir` until the writer exits cleanly: files go to a temporary sibling
directory that is renamed into place, so a crash never leaves a half-written artifact.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _version() -> str:
    from . import __version__

    return __version__


class ArtifactWriter:
    """Collects files in a temporary directory; on clean exit hashes them, writes the manifest
    and renames the directory to `out` (replacing an existing artifact there)."""

    def __init__(self, out: str | os.PathLike, kind: str, **manifest: Any):
        self.out = Path(out)
        self.kind = kind
        self.manifest: dict[str, Any] = dict(manifest)
        self._tmp: Path | None = None

    def __enter__(self) -> "ArtifactWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        if self.out.exists() and not (self.out / MANIFEST).exists() and any(self.out.iterdir()):
            raise ArtifactError(f"{self.out} exists and is not an edgetk artifact",
                                hint="choose an empty or new output directory")
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        return self

    @property
    def root(self) -> Path:
        if self._tmp is None:
            raise ArtifactError("ArtifactWriter used outside its `with` block")
        return self._tmp

    def path(self, name: str) -> Path:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def __exit__(self, exc_type, exc, tb) -> None:
        tmp = self.root
        if exc_type is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            files = {}
            for p in sorted(tmp.rglob("*")):
                if p.is_file() and p.name != MANIFEST:
                    rel = p.relative_to(tmp).as_posix()
                    files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            manifest = {
                "edgetk_version": _version(),
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **self.manifest,
                "files": files,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_json_default))
            _swap_into_place(tmp, self.out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, Path):
        return str(obj)
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"manifest value of type {type(obj).__name__} is not JSON serializable")


@dataclass
class Artifact:
    root: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def file(self, name: str) -> Path:
        if name not in self.manifest.get("files", {}):
            raise ArtifactError(f"artifact {self.root} has no file {name!r}",
                                hint=f"files: {sorted(self.manifest.get('files', {}))}")
        return self.root / name

    @property
    def total_bytes(self) -> int:
        return sum(f["bytes"] for f in self.manifest["files"].values())

    @staticmethod
    def is_artifact(path: str | os.PathLike) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Artifact":
        root = Path(path)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise ArtifactError(f"{root} is not an edgetk artifact: no {MANIFEST}",
                                hint="pass a directory written by `edgetk compress` or `edgetk export`")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{mpath} is corrupt: {exc}", hint="re-create the artifact") from None
        for key in ("format_version", "kind", "files"):
            if key not in manifest:
                raise ArtifactError(f"{mpath} lacks '{key}'", hint="re-create the artifact")
        if manifest["format_version"] > FORMAT_VERSION:
            raise ArtifactError(f"artifact format {manifest['format_version']} is newer than this edgetk reads "
                                f"({FORMAT_VERSION})", hint="upgrade edgetk")
        art = cls(root, manifest)
        if verify:
            art.verify()
        return art

    def verify(self) -> None:
        for rel, meta in self.manifest["files"].items():
            p = self.root / rel
            if not p.is_file():
                raise ArtifactError(f"artifact file {rel} is missing from {self.root}",
                                    hint="the artifact is incomplete; re-create it")
            size = p.stat().st_size
            if size != meta["bytes"]:
                raise ArtifactError(f"artifact file {rel} has {size} bytes, manifest says {meta['bytes']} "
                                    "(truncated or modified)", hint="re-create the artifact")
            if sha256_file(p) != meta["sha256"]:
                raise ArtifactError(f"artifact file {rel} does not match its SHA-256 in the manifest (tampered or "
                                    "corrupted)", hint="re-create the artifact from its source")
