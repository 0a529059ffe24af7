"""Config, registry and artifact contracts."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from edgetk.artifact import Artifact, ArtifactWriter
from edgetk.config import Config, check, config
from edgetk.errors import ArtifactError, ConfigError
from edgetk.registry import Registry


@config("test-demo", version=2)
@dataclass(frozen=True)
class DemoConfig(Config):
    sparsity: float = 0.5
    layers: tuple = (1, 2)
    name: str = "x"

    def validate(self):
        check(0 <= self.sparsity < 1, "sparsity", self.sparsity, "a fraction in [0, 1)")


def test_config_json_round_trip_and_frozen():
    c = DemoConfig(sparsity=0.25, layers=[3, 4])
    assert c.layers == (3, 4)  # lists frozen into tuples
    again = Config.from_json(c.to_json())  # dispatch on "kind"
    assert again == c and type(again) is DemoConfig
    assert json.loads(c.to_json())["version"] == 2
    with pytest.raises(Exception):
        c.sparsity = 0.1  # frozen


def test_config_names_broken_field():
    with pytest.raises(ConfigError, match="sparsity"):
        DemoConfig(sparsity=1.5)
    with pytest.raises(ConfigError, match="unknown field"):
        DemoConfig.from_dict({"kind": "test-demo", "bogus": 1})
    with pytest.raises(ConfigError, match="version 9"):
        DemoConfig.from_dict({"kind": "test-demo", "version": 9})
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_json("{nope")


def test_registry_errors_list_known_names():
    r: Registry[int] = Registry("widget")
    r.register("a", 1)
    r.register("b")(2)
    assert r.get("b") == 2 and "a" in r and r.names() == ["a", "b"]
    with pytest.raises(ConfigError, match="unknown widget 'c'") as e:
        r.get("c")
    assert "a, b" in e.value.hint
    with pytest.raises(ConfigError, match="twice"):
        r.register("a", 3)


def _write(tmp_path, name="art"):
    out = tmp_path / name
    with ArtifactWriter(out, kind="demo", format="eager", configs=[DemoConfig().to_dict()]) as w:
        w.path("weights.bin").write_bytes(b"\x01" * 1000)
        w.path("sub/meta.txt").write_text("hello")
    return out


def test_artifact_manifest_hashes_and_load(tmp_path):
    out = _write(tmp_path)
    art = Artifact.load(out)
    m = art.manifest
    assert m["kind"] == "demo" and m["format_version"] == 1 and m["edgetk_version"]
    assert set(m["files"]) == {"weights.bin", "sub/meta.txt"}
    assert m["files"]["weights.bin"]["bytes"] == 1000 and len(m["files"]["weights.bin"]["sha256"]) == 64
    assert art.total_bytes == 1005
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("damage", ["tamper", "truncate", "delete", "manifest"])
def test_artifact_refuses_damage(tmp_path, damage):
    out = _write(tmp_path)
    f = out / "weights.bin"
    if damage == "tamper":
        f.write_bytes(b"\x02" * 1000)
        match = "SHA-256"
    elif damage == "truncate":
        f.write_bytes(b"\x01" * 10)
        match = "truncated"
    elif damage == "delete":
        f.unlink()
        match = "missing"
    else:
        (out / "manifest.json").write_text("{broken")
        match = "corrupt"
    with pytest.raises(ArtifactError, match=match):
        Artifact.load(out)


def test_artifact_writer_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, kind="demo") as w:
            w.path("a.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_artifact_writer_replaces_existing_artifact_only(tmp_path):
    out = _write(tmp_path)
    _write(tmp_path)  # replacing an artifact is fine
    other = tmp_path / "notart"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="not an edgetk artifact"):
        with ArtifactWriter(other, kind="demo"):
            pass
    assert (other / "precious.txt").read_text() == "keep" and Artifact.load(out)
