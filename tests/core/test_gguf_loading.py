"""``lsi.load`` on GGUF paths that cannot be loaded: each gives an InputError saying what was found and the fix.

The loadable case is the ``real`` tier (tests/real), on SmolLM2-135M-Instruct.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lsi
from lsi.errors import InputError

pytestmark = pytest.mark.unit
gguf = pytest.importorskip("gguf")


def _write_gguf(path: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _load_error(path: Path | str) -> InputError:
    with pytest.raises(InputError) as info:
        lsi.load(path)
    assert info.value.fix
    return info.value


def test_unsupported_architecture(tmp_path):
    err = _load_error(_write_gguf(tmp_path / "m.gguf", "rwkv6"))
    assert "'rwkv6'" in err.found and "architecture" in err.expected


def test_truncated_file(tmp_path):
    whole = _write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:-100])
    err = _load_error(cut)
    assert "truncated or corrupt" in err.found and "again" in err.fix


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "notes.gguf").write_text("hello")
    assert "GGUF" in _load_error(tmp_path / "notes.gguf").expected


def test_missing_file(tmp_path):
    assert "existing .gguf" in _load_error(tmp_path / "absent.gguf").expected


def test_directory_with_several_ggufs(tmp_path):
    for name in ("b.gguf", "a.gguf"):
        _write_gguf(tmp_path / name, "llama")
    err = _load_error(tmp_path)
    assert "a.gguf, b.gguf" in err.found and "a.gguf" in err.fix


def test_directory_with_one_gguf_is_that_file(tmp_path):
    """A directory holding one .gguf and no config.json loads that file (here: a damaged one, which says so)."""
    _write_gguf(tmp_path / "only.gguf", "rwkv6")
    assert "only.gguf" in _load_error(tmp_path).found
