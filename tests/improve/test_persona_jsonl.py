"""The persona recipe on user data: a JSONL trait (word lists in the config) on stories260k."""

import json

import pytest

from lsi.errors import InputError
from lsi.improve import traits
from lsi.improve.recipe import run_recipe

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]


def _lines() -> list[dict]:
    people = traits._PEOPLE
    lines = []
    for split, who in (("dev", people[:4]), ("test", people[4:])):
        for kind, name, pronoun in who:
            opening = traits._OPENINGS[0].format(kind=kind, name=name)
            lines += [{"split": split, "prompt": opening, "response": r.format(p=pronoun), "expressing": happy}
                      for happy, replies in ((True, traits._HAPPY_REPLIES), (False, traits._SAD_REPLIES))
                      for r in replies[:2]]
        lines += [{"split": split, "prompt": p} for p in traits._STORY_PROMPTS[split][:4]]
        lines += [{"split": split, "text": t} for t in traits._UNRELATED[split]]
    lines += [{"split": "test", "prompt": f"{name} was very {mood}.", "invites": mood == "happy"}
              for _, name, _ in people for mood in ("happy", "sad")]
    for share in (0, 2, 4):
        lines += [{"split": "dev", "prompt": "One day, Tom went to the park.", "set": f"{share} of 4 happy",
                   "response": (traits._HAPPY_REPLIES if i < share else traits._SAD_REPLIES)[0].format(p="He")}
                  for i in range(4)]
    return lines


def test_a_jsonl_trait_runs_the_whole_recipe(stories_dir, tmp_path):
    path = tmp_path / "cheerful.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in _lines()))
    config = {"trait_words": sorted(traits.HAPPY), "opposite_words": sorted(traits.SAD), "samples": 4,
              "prompt_prefix": traits._ASK, "bootstrap": 100}
    r = run_recipe("persona", str(stories_dir), tmp_path / "run", data=path, config=config)
    variants = {row.variant for row in r.rows}
    assert {"unsteered", "random direction", "prompting"} <= variants
    assert "trait_words_per_100_words" in {m.key for m in r.metrics}
    for row in r.rows:  # the trait rate is trait minus opposite words over the same pooled word count
        v = row.values
        assert v["rate"].value == pytest.approx(v["trait_words_per_100_words"].value
                                                - v["opposite_words_per_100_words"].value, abs=1e-9)
    assert len(r.curves[2].series[0].points) == 3  # one point per candidate set


def test_a_jsonl_trait_needs_its_words_and_known_line_kinds(stories_dir, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in _lines()))
    with pytest.raises(InputError, match="trait_words"):
        run_recipe("persona", str(stories_dir), tmp_path / "a", data=path)
    path.write_text(json.dumps({"split": "dev", "prompt": "x", "response": "y"}) + "\n")
    with pytest.raises(InputError, match=r"t\.jsonl"):
        run_recipe("persona", str(stories_dir), tmp_path / "b", data=path, config={"trait_words": ["happy"]})
