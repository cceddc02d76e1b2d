import json
from dataclasses import dataclass

import pytest

from lsi.errors import InputError
from lsi.improve.config import RecipeConfig, build_config, read_config_file
from lsi.improve.data import read_jsonl


@dataclass(frozen=True)
class Demo(RecipeConfig):
    alphas: tuple[float, ...] = (1.0,)
    prefix: str | None = None


@pytest.mark.unit
@pytest.mark.parametrize(("name", "text"), [
    ("c.yaml", "tau: 0.05\nalphas: [1, 2.5]\nprefix: Be kind.\n"),
    ("c.toml", "tau = 0.05\nalphas = [1, 2.5]\nprefix = 'Be kind.'\n"),
    ("c.json", json.dumps({"demo": {"tau": 0.05, "alphas": [1, 2.5], "prefix": "Be kind."}})),
])
def test_config_files_of_every_format_give_the_same_config(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    config = build_config(Demo, read_config_file(tmp_path / name, "demo"))
    assert config == Demo(tau=0.05, alphas=(1.0, 2.5), prefix="Be kind.")


@pytest.mark.unit
@pytest.mark.parametrize(("values", "match"), [({"tau": "small"}, "tau"), ({"seed": 1.5}, "seed"),
                                               ({"alphas": 3}, "alphas"), ({"seed": True}, "seed"),
                                               ({"nope": 1}, "unknown")])
def test_build_config_refuses_wrong_types_and_unknown_keys(values, match):
    with pytest.raises(InputError, match=match):
        build_config(Demo, values)


@pytest.mark.unit
def test_read_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="no file"):
        read_config_file(tmp_path / "missing.yaml", "demo")
    (tmp_path / "bad.toml").write_text("tau = = 1")
    with pytest.raises(InputError, match=r"bad\.toml"):
        read_config_file(tmp_path / "bad.toml", "demo")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(InputError, match=r"\.yaml"):
        read_config_file(tmp_path / "c.ini", "demo")


FIELDS = {"prompt": (str, True), "split": (str, True), "harmful": (bool, False)}


@pytest.mark.unit
@pytest.mark.parametrize(("line", "match"), [
    ('{"prompt": "a"}', r"missing \['split'\]"), ('{"prompt": 1, "split": "dev"}', r"wrong type \['prompt'\]"),
    ('{"prompt": "a", "split": "dev", "x": 1}', r"unknown \['x'\]"), ('[1]', "list"), ("{nope", "invalid JSON"),
    ('{"prompt": "a", "split": "train"}', "split in"),
])
def test_read_jsonl_points_at_the_bad_line(tmp_path, line, match):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "ok", "split": "dev"}\n' + line + "\n")
    with pytest.raises(InputError, match=match) as err:
        read_jsonl(f, FIELDS)
    assert "d.jsonl:2" in str(err.value)


@pytest.mark.unit
def test_read_jsonl_reads_rows_and_refuses_an_empty_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "a", "split": "dev", "harmful": true}\n\n{"prompt": "b", "split": "test"}\n')
    assert [r["prompt"] for r in read_jsonl(f, FIELDS)] == ["a", "b"]
    f.write_text("\n")
    with pytest.raises(InputError, match="no examples"):
        read_jsonl(f, FIELDS)
