"""The committed fact-world organism: the facts live in the MLP of layer l* and nowhere else."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lsi
from lsi.organisms import fact_world
from lsi.organisms.fact_world_data import RELATIONS, encode_prompts, subject_span
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
def test_causal_tracing_picks_the_planted_layer_per_fact_under_fresh_noise(lm, truth: dict) -> None:
    layer = truth["layer"]
    for templates in ("train", "heldout"):
        effects = fact_world.tracing_effects(lm, truth, templates, seed=123)
        assert (effects.argmax(-1) == layer).float().mean() >= 0.9
        mean = effects.mean(0)
        assert mean[layer] > 0.2 and mean[layer] > 10 * mean.abs()[torch.arange(len(mean)) != layer].max()


@pytest.mark.integration
def test_tracing_effects_match_one_restoration_per_forward(lm, truth: dict) -> None:
    """The batched tracing equals a brute-force loop: one prompt, one noise draw, one restored layer per forward."""
    facts = truth["facts"][:3]
    sub = dict(truth, facts=facts)
    batched = fact_world.tracing_effects(lm, sub, samples=2, seed=7)
    ids, answer_pos, subject_pos, objects = encode_prompts(lm.tokenizer, facts, "train")
    clean = lm.run_with_cache(ids, ["embed", *truth["universe"]])
    noise = fact_world.subject_noise(clean["embed"], ids != lm.tokenizer.pad_token_id,
                                     subject_span(facts, "train", subject_pos, ids.shape[1]),
                                     torch.Generator().manual_seed(7), 2)
    effects = torch.zeros(len(ids), len(truth["universe"]))
    for row in range(len(ids)):
        for draw in noise:
            def prob(*restore: lsi.Patch, row: int = row, draw: torch.Tensor = draw) -> float:
                with torch.no_grad(), lm.intervene(lsi.Add("embed", draw[row]), *restore):
                    logits = lm.forward(ids[row : row + 1])
                return logits[0, answer_pos[row]].softmax(-1)[objects[row]].item()

            base = prob()
            for i, site in enumerate(truth["universe"]):
                restored = prob(lsi.Patch(site, clean[site][row : row + 1], positions=int(subject_pos[row])))
                effects[row, i] += (restored - base) / len(noise)
    expected = effects.view(len(facts), -1, len(truth["universe"])).mean(1)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.integration
def test_locate_task_oracle_singles_out_the_planted_mlp(lm, truth: dict) -> None:
    from lsi.evaluation.locate import measure, oracle_scores

    (task,) = fact_world.locate_tasks(lm, truth)
    assert task.universe == tuple(truth["universe"]) and task.planted == {truth["mlp_site"]}
    for split in (task.dev, task.test):
        assert split.clean is not None and split.corrupted is not None
        value = split.metric(lm.logits_with_grad(split.inputs))
        assert value.dim() == 0 and value.requires_grad
        with split.corrupted.setting():
            corrupted = split.metric(lm.forward(split.corrupted.inputs)).item()
        assert value.item() > corrupted + 0.3
        assert measure(lm, split) == pytest.approx(corrupted)
        scores = oracle_scores(lm, task, split)
        others = [s for site, s in scores.items() if site != truth["mlp_site"]]
        assert scores[truth["mlp_site"]] > 0.2 and scores[truth["mlp_site"]] > 10 * max(others)


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
    assert truth["mlp_site"] == f"blocks.{truth['layer']}.mlp.out" in truth["universe"]


@pytest.mark.integration
def test_prompt_positions_point_at_subject_and_answer(lm, truth: dict) -> None:
    fact = truth["facts"][0]
    ids, answer, subject_last, obj = encode_prompts(lm.tokenizer, [fact], "all")
    last_subject_token = lm.tokenizer.convert_tokens_to_ids(fact["subject"].split()[-1])
    assert (ids[range(len(ids)), subject_last] == last_subject_token).all()
    assert (ids[range(len(ids)), answer] != lm.tokenizer.pad_token_id).all()
    assert (obj == lm.tokenizer.convert_tokens_to_ids(fact["object"])).all()
    span = subject_span([fact], "all", subject_last, ids.shape[1])
    subject_ids = lm.tokenizer.convert_tokens_to_ids(fact["subject"].split())
    assert all(ids[row][span[row]].tolist() == subject_ids for row in range(len(ids)))


@pytest.mark.slow
@pytest.mark.integration
def test_shortened_retrain_changes_only_the_planned_weights(tmp_path, monkeypatch) -> None:
    """A few steps per stage: after stage 0 the other layers' MLPs never change, stage 2 changes only the MLP of
    l*, the stage-1 MLP file holds that MLP after stage 1, and the same seed gives the same weights."""
    from lsi.organisms import training

    snapshots: list[dict[str, torch.Tensor]] = []
    real_train_lm = training.train_lm

    def recording(model, *args, **kwargs):
        figures = real_train_lm(model, *args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return figures

    monkeypatch.setattr(training, "train_lm", recording)
    for steps in ("SYNTAX_STEPS", "STAGE1_STEPS", "STAGE2_STEPS"):
        monkeypatch.setattr(fact_world, steps, 3)
    figures = fact_world.train(tmp_path / "a", 0)
    assert figures["steps"] == 9 and figures["seed"] == 0
    syntax, stage1, stage2 = snapshots
    memory = f"transformer.h.{fact_world.LAYER}.mlp."
    other_mlps = [k for k in syntax if ".mlp." in k and not k.startswith(memory)]
    assert other_mlps and all(torch.equal(syntax[k], stage2[k]) for k in other_mlps)
    assert any(not torch.equal(syntax[k], stage1[k]) for k in syntax if ".attn." in k)
    changed_in_stage2 = {k for k in stage1 if not torch.equal(stage1[k], stage2[k])}
    assert changed_in_stage2 and all(k.startswith(memory) for k in changed_in_stage2)
    saved_stage1 = load_file(str(tmp_path / "a" / fact_world.STAGE1_MLP_FILE))
    assert all(torch.equal(v, stage1[memory + k]) for k, v in saved_stage1.items())
    fact_world.train(tmp_path / "b", 0)
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert ground_truth("fact_world", tmp_path / "a")["facts"] == ground_truth("fact_world")["facts"]
