"""The committed fact-world organism: the facts live in the MLP of layer l* and nowhere else."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from lsi.organisms import fact_world
from lsi.organisms.fact_world_data import RELATIONS, encode_prompts
from lsi.organisms.registry import get_organism, ground_truth, load_organism


@pytest.fixture(scope="module")
def truth() -> dict:
    return ground_truth("fact_world")


@pytest.fixture(scope="module")
def lm():
    return load_organism("fact_world")


@pytest.mark.integration
def test_committed_fact_world_organism_verifies(lm, truth: dict) -> None:
    report = get_organism("fact_world").verify(lm, truth)
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]


@pytest.mark.integration
def test_swapping_the_stage1_mlp_is_undone(lm, truth: dict) -> None:
    before = fact_world.fact_accuracy(lm, truth["facts"], "train")
    with fact_world.stage1_mlp(lm, truth):
        lost = fact_world.fact_accuracy(lm, truth["facts"], "train")
    assert fact_world.fact_accuracy(lm, truth["facts"], "train") == before > lost


@pytest.mark.unit
def test_world_is_consistent(truth: dict) -> None:
    facts, stage1 = truth["facts"], truth["stage1_facts"]
    subjects = {f["subject"] for f in facts}
    assert not subjects & {f["subject"] for f in stage1}
    assert all(2 <= len(s.split()) <= 3 for s in subjects)
    assert len(facts) == len(subjects) * len(RELATIONS)
    for rel in RELATIONS.values():
        assert not set(rel["templates"]) & set(rel["heldout_templates"])
    stage1_mlp = load_file(str(fact_world.ORGANISM.weights_dir / truth["stage1_mlp_file"]))
    assert stage1_mlp and all(v.dtype.is_floating_point for v in stage1_mlp.values())


@pytest.mark.integration
def test_prompt_positions_point_at_subject_and_answer(lm, truth: dict) -> None:
    fact = truth["facts"][0]
    ids, answer, subject_last, obj = encode_prompts(lm.tokenizer, [fact], "all")
    last_subject_token = lm.tokenizer.convert_tokens_to_ids(fact["subject"].split()[-1])
    assert (ids[range(len(ids)), subject_last] == last_subject_token).all()
    assert (ids[range(len(ids)), answer] != lm.tokenizer.pad_token_id).all()
    assert (obj == lm.tokenizer.convert_tokens_to_ids(fact["object"])).all()
