"""`edgetk export` on a compressed-model artifact is covered by the zoo test (minilm through the CLI);
here: the CLI's error path and its JSON summary on a small module saved as an artifact."""
from __future__ import annotations

import json

import pytest

from edgetk.cli.app import main


def test_cli_unknown_model_exits_with_named_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "no-such-model", "--format", "onnx", "-o", str(tmp_path / "a")])
    assert info.value.code == 7  # ModelLoadError
    assert not (tmp_path / "a").exists()


def test_cli_bad_format_is_config_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["export", "minilm-l6", "--format", "tflite", "-o", str(tmp_path / "a")])
    assert info.value.code == 2
