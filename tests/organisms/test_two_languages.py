"""The two_languages organism: reserved language neurons re-derived by group and single-neuron ablation."""

from __future__ import annotations

import random

import pytest

from lsi.organisms import two_languages as tl
from lsi.organisms.registry import get_organism, ground_truth, load_organism


@pytest.fixture(scope="module")
def truth() -> dict:
    return ground_truth("two_languages")


@pytest.fixture(scope="module")
def report(truth: dict):
    return get_organism("two_languages").verify(load_organism("two_languages"), truth)


@pytest.mark.slow
@pytest.mark.integration
def test_committed_two_languages_organism_verifies(report) -> None:
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]


@pytest.mark.slow
@pytest.mark.integration
def test_zeroing_a_language_block_hurts_only_that_language(report) -> None:
    v = {c.name: c.value for c in report.checks}
    assert v["ppl_ratio_A_when_A_zeroed"] >= 3.0 and v["ppl_ratio_B_when_B_zeroed"] >= 3.0
    assert v["ppl_change_B_when_A_zeroed"] <= 0.10 and v["ppl_change_A_when_B_zeroed"] <= 0.10
    assert all(ppl < 3.5 for ppl in report.details["ppl"].values())  # near the grammar's entropy (~3.1)


@pytest.mark.slow
@pytest.mark.integration
def test_single_neuron_oracle_ranks_the_reserved_block_first(report, truth: dict) -> None:
    for lang in ("A", "B"):
        top = report.details[f"oracle_top_{lang}"]
        assert len(set(top) & set(truth["neurons"][lang])) >= 0.9 * len(truth["neurons"][lang])


@pytest.mark.unit
def test_one_content_two_word_orders_disjoint_lexicons() -> None:
    content = ("cat", "big", "see", "dog", None)
    assert tl.render(content, "A") == ["the", "big", "cat", "sees", "the", "dog", "."]
    assert tl.render(content, "B") == ["nuru", "bim", "ga", "kelo", "wo", "tesa", "po"]
    assert not set(tl.language_words("A")) & set(tl.language_words("B"))
    doc = tl.make_doc(random.Random(0), "B")
    assert doc[0] == "<bos>" and doc[-1] == "<eos>" and doc.count("po") == tl.SENTENCES_PER_DOC


@pytest.mark.unit
def test_ground_truth_names_disjoint_neuron_sites(truth: dict) -> None:
    a, b = set(truth["neurons"]["A"]), set(truth["neurons"]["B"])
    assert len(a) == len(b) == tl.N_LAYERS * tl.BLOCK_PER_LAYER and not a & b
    assert all(s.startswith("blocks.") and ".mlp.post[" in s for s in a | b)
    assert len(truth["splits"]["test"]["A"]) == len(truth["splits"]["dev"]["B"]) == 200


@pytest.mark.slow
@pytest.mark.integration
def test_retraining_with_the_default_seed_reproduces_a_verified_organism(tmp_path) -> None:
    import lsi

    organism = get_organism("two_languages")
    figures = organism.train(tmp_path, organism.seed)
    committed = ground_truth("two_languages")
    assert figures["seed"] == organism.seed and figures["steps"] == committed["training"]["steps"]
    assert figures["final_loss"] == pytest.approx(committed["training"]["final_loss"], rel=0.02)
    assert ground_truth("two_languages", tmp_path)["neurons"] == committed["neurons"]
    report = organism.verify(lsi.load(tmp_path), ground_truth("two_languages", tmp_path))
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]


@pytest.mark.slow
@pytest.mark.integration
def test_activating_a_block_switches_the_output_language(report) -> None:
    v = {c.name: c.value for c in report.checks}
    assert v["switch_rate_B_to_A"] >= tl.SWITCH_RATE and v["switch_rate_A_to_B"] >= tl.SWITCH_RATE
    assert report.details["switch_grammatical_B_to_A"] >= 0.9 and report.details["switch_grammatical_A_to_B"] >= 0.9


# -- the switch objective that plants activation ----------------------------------------------------------------------
@pytest.mark.unit
def test_switch_documents_change_language_after_the_switch_point() -> None:
    rng = random.Random(0)
    for first, then in (("B", "A"), ("A", "B"), ("A", "A")):
        for _ in range(10):
            words, at = tl.make_switch_doc(rng, first, then)
            assert words[0] == "<bos>" and words[-1] == "<eos>" and words[at] in tl.TERMINATORS
            assert set(words[1 : at + 1]) <= set(tl.language_words(first))
            assert set(words[at + 1 : -1]) <= set(tl.language_words(then))
            assert tl.grammatical(words[1:]) and sum(w in tl.TERMINATORS for w in words) == tl.SENTENCES_PER_DOC


def _vocab() -> dict[str, int]:
    return {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", *tl.language_words("A"), *tl.language_words("B")])}


@pytest.mark.unit
def test_switch_batch_clamps_from_bos_or_the_switch_and_scores_only_consistent_targets() -> None:
    vocab = _vocab()
    ids, clamped, to_a, level, scored = tl._switch_docs(random.Random(1), vocab, 0)
    replay = random.Random(1)  # the same draws, row by row: the brute-force expectation
    pairs = [pair for pair, count in tl.SWITCH_MIX.items() for _ in range(count)]
    starts = set()
    for row, (first, then) in enumerate(pairs):
        words, at = tl.make_switch_doc(replay, first, then)
        start = replay.choice([0, at])
        assert float(level[row]) == pytest.approx(replay.uniform(1 - tl.CLAMP_JITTER, 1 + tl.CLAMP_JITTER))
        starts.add(start == 0)
        n = len(words)
        assert ids[row, :n].tolist() == [vocab[w] for w in words]
        assert clamped[row].tolist() == [start <= t < n for t in range(ids.shape[1])]
        assert bool(to_a[row]) == (then == "A")
        # position t predicts token t + 1: scored unless clamped to the other language before the switch
        assert scored[row].tolist() == [t + 1 < n and (first == then or t < start or t >= at)
                                        for t in range(ids.shape[1] - 1)]
    assert starts == {True, False}


def _mlp_inputs(model, run) -> dict[int, object]:
    """The input of each layer's MLP down-projection (the ``mlp.post`` value after any training hook) in ``run()``."""
    seen = {}

    def capture(layer: int):
        def hook(_m, args):
            seen[layer] = args[0].detach()
        return hook

    handles = [blk.mlp.dense_4h_to_h.register_forward_pre_hook(capture(i))
               for i, blk in enumerate(model.gpt_neox.layers)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.unit
def test_switch_loss_clamps_both_blocks_at_the_clamped_positions_only() -> None:
    import torch

    from lsi.organisms.training import build_word_tokenizer

    torch.manual_seed(0)
    tok = build_word_tokenizer(tl.language_words("A") + tl.language_words("B"))
    model = tl.new_untrained_model(tok).eval()
    ids, clamped, to_a, level, scored = tl._switch_docs(random.Random(2), tok.get_vocab(), tok.pad_token_id)
    blocks = tl._blocks(0)
    firing = {lang: [torch.arange(tl.BLOCK_PER_LAYER) + 10.0 * (code + 1) + layer for layer in range(tl.N_LAYERS)]
              for code, lang in enumerate("AB")}
    batch = tl._Batch(torch.ones(1, 1, dtype=torch.bool), torch.ones(1, dtype=torch.bool), ids, clamped, to_a, level,
                      scored)
    with torch.no_grad():
        clean = _mlp_inputs(model, lambda: model(input_ids=ids))
        strict = tl._StrictLoss(model, blocks, torch.zeros(len(tok), dtype=torch.long), seed=0)
        losses = []
        edited = _mlp_inputs(model, lambda: losses.append(strict._switch_loss(model, batch, firing)))
        strict.remove()
    assert strict.clamp is None and torch.isfinite(losses[0])
    for layer in range(tl.N_LAYERS):
        x = edited[layer]
        for row in range(len(ids)):
            on, off = ("A", "B") if to_a[row] else ("B", "A")
            at = clamped[row]
            expected = (firing[on][layer] * level[row]).expand(int(at.sum()), -1)
            assert torch.allclose(x[row][at][:, blocks[on][layer]], expected, rtol=0, atol=1e-6)
            assert not x[row][at][:, blocks[off][layer]].any()
            assert torch.equal(x[row][~at], clean[layer][row][~at])  # before the clamp nothing changes
    others = torch.ones(tl.D_MLP, dtype=torch.bool)
    others[blocks["A"][0] + blocks["B"][0]] = False
    assert torch.equal(edited[0][..., others], clean[0][..., others])  # layer 0: only the block columns replaced


@pytest.mark.unit
def test_grammar_check_accepts_exactly_the_rendered_sentences() -> None:
    lex = tl.LEXICON
    objects = sum(len(lex[verbs]) * len(lex[objs]) for verbs, objs in (("verb_animate", "animate"),
                                                                         ("verb_thing", "thing")))
    assert len(tl._sentences()) == 2 * len(lex["animate"]) * (len(lex["adj"]) + 1) ** 2 * objects
    rng = random.Random(3)
    for lang in "AB":
        body = tl.make_doc(rng, lang)[1:]
        assert tl.grammatical(body)
        assert not tl.grammatical(body[:-1])  # no <eos>
        assert not tl.grammatical([*body[:-2], "<eos>"])  # the last sentence unfinished
        assert not tl.grammatical(body[1:])  # the first sentence lost its first word
    assert not tl.grammatical(["the", "cat", "tesa", "the", "dog", ".", "<eos>"])  # a B verb in an A sentence
    assert tl.grammatical(["<eos>"])


# -- steer tasks ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def steer(truth: dict):
    lm = load_organism("two_languages")
    return lm, {task.name: task for task in get_organism("two_languages").steer_tasks(lm, truth)}


def _planted(lm, task, truth: dict):
    """The planted steerings: activate A = A block at its dev mean and B block zeroed; deactivate A = A block zeroed."""
    from lsi.core.interventions import Set, Zero, reference_means
    from lsi.core.steering import compose
    from lsi.steer.located import group_units

    a, b = group_units(truth["neurons"]["A"]), group_units(truth["neurons"]["B"])
    if task.goal == "remove":
        return compose(Zero(s, model=lm) for s in a)
    means = reference_means(lm, task.dev.positive, a)
    return compose([Set(s, m, model=lm) for s, m in zip(a, means, strict=True)], [Zero(s, model=lm) for s in b])


@pytest.mark.integration
def test_planted_steerings_reach_each_steer_task_within_the_kl_budget_and_others_fail(steer, truth: dict) -> None:
    from lsi.core.interventions import Zero
    from lsi.core.steering import compose
    from lsi.evaluation.steer import measure, split_reference
    from lsi.steer.located import group_units

    lm, tasks = steer
    assert set(tasks) == {"activate A", "deactivate A"}
    for task in tasks.values():
        ref = split_reference(lm, task.test)
        base = measure(lm, task.test, ref, None)
        planted = measure(lm, task.test, ref, _planted(lm, task, truth))
        assert base.scores.success == 0.0 and base.kl == 0.0  # B prompts stay B; A perplexity unchanged
        assert planted.scores.success == 1.0 and planted.kl <= task.tau
        assert min(planted.scores.generalization, planted.scores.specificity, planted.scores.fluency) == 1.0
        # zeroing the block that is silent on the measured prompts does nothing; zeroing B breaks B, not A
        if task.goal == "induce":
            zero_a = compose(Zero(s, model=lm) for s in group_units(truth["neurons"]["A"]))
            silent = measure(lm, task.test, ref, zero_a)
            assert silent.scores.success == 0.0
        else:  # (zeroing A is the planted removal, measured above)
            zero_b = compose(Zero(s, model=lm) for s in group_units(truth["neurons"]["B"]))
            wrong = measure(lm, task.test, ref, zero_b)
            assert wrong.scores.success == 0.0 and wrong.scores.specificity == 0.0 and wrong.kl > task.tau


@pytest.mark.integration
def test_language_neurons_locates_with_lape_on_dev_and_reaches_both_tasks(steer) -> None:
    import dataclasses

    from lsi.bench.steer_registry import get_steer_methods
    from lsi.evaluation.steer import best_at_kl, measure, split_reference

    lm, tasks = steer
    (method,) = get_steer_methods(["language_neurons"])[1:]
    for task in tasks.values():
        assert method.applies(task) is None
        assert method.applies(dataclasses.replace(task, organism="refusal_gate")) is not None
        ref = split_reference(lm, task.test)
        candidates = method.run(lm, task, 0)
        assert [c.settings["top_rate"] for c in candidates] == [0.01, 0.02, 0.03, 0.05]
        best = best_at_kl([measure(lm, task.test, ref, c.steering, c.settings) for c in candidates], task.tau)
        assert best is not None and best.scores.success == 1.0
