"""The organism registry: names, unknown names, and clear errors for missing or corrupt weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lsi.cli.organisms import organisms
from lsi.errors import InputError
from lsi.organisms.registry import ORGANISMS, get_organism, load_organism

MINE = ("induction", "layer_redundancy", "toy_superposition", "fact_world")


@pytest.mark.unit
def test_my_organisms_are_registered_with_a_complete_contract() -> None:
    for name in MINE:
        org = get_organism(name)
        assert org.name == name and callable(org.train) and callable(org.verify)
        assert org.family in {"gpt2", "llama", "gpt_neox"}
    assert {get_organism(n).family for n in MINE} == {"gpt2", "llama", "gpt_neox"}


@pytest.mark.unit
def test_unknown_organism_name_lists_the_valid_names() -> None:
    with pytest.raises(InputError) as info:
        get_organism("inductoin")
    assert "'inductoin'" in info.value.found
    assert all(name in info.value.expected for name in ORGANISMS)


@pytest.mark.unit
def test_committed_weights_are_small_float32_safetensors() -> None:
    for name in MINE:
        files = sorted(p.name for p in get_organism(name).weights_dir.iterdir())
        assert {"config.json", "model.safetensors", "tokenizer.json", "ground_truth.json"} <= set(files)
        assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
        size = sum(p.stat().st_size for p in get_organism(name).weights_dir.iterdir())
        assert size < 2_000_000, (name, size)


def _copy(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(get_organism(name).weights_dir, tmp_path / name))


@pytest.mark.integration
def test_corrupt_weight_file_gives_a_clear_error(tmp_path: Path) -> None:
    directory = _copy("layer_redundancy", tmp_path)
    (directory / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file")
    with pytest.raises(InputError) as info:
        load_organism("layer_redundancy", directory)
    assert "model.safetensors" in str(info.value)
    assert "lsi organisms train layer_redundancy --out" in info.value.fix


@pytest.mark.unit
def test_missing_files_are_named(tmp_path: Path) -> None:
    directory = _copy("layer_redundancy", tmp_path)
    (directory / "tokenizer.json").unlink()
    (directory / "ground_truth.json").unlink()
    with pytest.raises(InputError) as info:
        load_organism("layer_redundancy", directory)
    assert "tokenizer.json" in info.value.found and "ground_truth.json" in info.value.found
    assert "lsi organisms train layer_redundancy" in info.value.fix


@pytest.mark.unit
def test_corrupt_ground_truth_is_named(tmp_path: Path) -> None:
    directory = _copy("layer_redundancy", tmp_path)
    (directory / "ground_truth.json").write_text('{"organism": ')
    with pytest.raises(InputError) as info:
        load_organism("layer_redundancy", directory)
    assert "ground_truth.json" in info.value.expected and "corrupt" in info.value.found


@pytest.mark.unit
def test_cli_list_and_unknown_name() -> None:
    runner = CliRunner()
    listed = runner.invoke(organisms, ["list"])
    assert listed.exit_code == 0 and all(name in listed.output for name in MINE)
    unknown = runner.invoke(organisms, ["verify", "nope"])
    assert unknown.exit_code == 2 and "induction" in unknown.output


@pytest.mark.integration
def test_cli_verify_passes_and_fails(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(organisms, ["verify", "layer_redundancy"])
    assert ok.exit_code == 0, ok.output
    assert "PASS layer_redundancy" in ok.output and "removal" in ok.output
    directory = _copy("layer_redundancy", tmp_path)
    (directory / "model.safetensors").write_bytes(b"garbage")
    bad = runner.invoke(organisms, ["verify", "layer_redundancy", "--dir", str(directory)])
    assert bad.exit_code == 1 and "FAIL layer_redundancy" in bad.output
