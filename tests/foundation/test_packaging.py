"""The README's layout section and pyproject's package list stay true; the built wheel imports on its own."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG_DIRS = {"edgetk": "toolkit", "edgetk.exporters": "exporters", "edgetk.runtimes": "runtimes",
            "edgetk.kernels": "kernels", "edgetk.devices": "devices"}


def _layout_entries() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\s*([\w.]+/)\s+(\S.*)$", section, re.M))


def test_readme_layout_matches_tree():
    entries = _layout_entries()
    assert entries, "README has no layout entries"
    for folder in entries:
        assert (ROOT / folder).is_dir(), f"README lists {folder} but it does not exist"
    top = {p.name + "/" for p in ROOT.iterdir()
           if p.is_dir() and not p.name.startswith(".") and p.name not in {"build", "dist"}
           and not p.name.endswith(".egg-info") and not p.name.startswith("__")}
    missing = top - set(entries)
    assert not missing, f"top-level folders missing from README's layout: {sorted(missing)}"


def test_pyproject_lists_every_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"] == PKG_DIRS
    listed = set(cfg["packages"])
    found = set()
    for pkg, folder in PKG_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([pkg, *rel.parts]) if rel.parts else pkg
            if not any(part.startswith(("_", ".")) or part == "tests" for part in rel.parts):
                found.add(name)
    assert found <= listed, f"packages missing from pyproject: {sorted(found - listed)}"


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path):
    """Build the wheel and import edgetk from it (not from the source tree / editable install)."""
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(wheels)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (whl,) = wheels.glob("edgetk-*.whl")
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                        str(whl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (target / "kernels").exists() and not (target / "devices").exists()  # no generic top-level names
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import edgetk, edgetk.kernels, edgetk.runtimes, "
            "edgetk.exporters, edgetk.devices, edgetk.cli.app; "
            "from importlib.resources import files; "
            "assert edgetk.__file__.startswith(sys.argv[1]), edgetk.__file__; "
            "assert any(files('edgetk.devices').joinpath('profiles').iterdir()); print('ok')")
    r = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
