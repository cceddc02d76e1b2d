"""Selection under a KL budget: KL and Δloss against a hand computation, the chosen point against a brute-force
argmax over a grid on a tiny model, early stopping along the strength, no candidate within the budget, typed
errors, the report on a test split, and save / load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lsi.core.inputs import Batch
from lsi.core.interventions import Add
from lsi.core.steering import Steering
from lsi.errors import InputError
from lsi.evaluation.steer import CurvePoint, SteerScores, best_at_kl, divergence, reference
from lsi.steer.selection import Selection, grid, select

TOKEN = 7
PROMPTS = torch.randint(3, 97, (6, 5), generator=torch.Generator().manual_seed(1))
CORPUS = torch.randint(3, 97, (4, 9), generator=torch.Generator().manual_seed(2))  # no padding: every next token
LAYERS, ALPHAS = (0, 1), (0.5, 2.0, 8.0, 32.0)


# -- KL and Δloss ----------------------------------------------------------------------------------------------------
class _FixedLM:
    """Stands in for a model: a fixed batch and fixed logits."""

    def __init__(self, batch: Batch, logits: torch.Tensor) -> None:
        self.batch, self.logits = batch, logits

    def to_batch(self, inputs):
        return self.batch

    def forward(self, inputs):
        return self.logits


def _by_hand(p_logits, q_logits, ids, scored):
    """KL(p || q) and Δ cross-entropy over the (row, t) pairs in ``scored`` (t predicts ids[row][t + 1])."""
    kl, dce = 0.0, 0.0
    for row, t in scored:
        zp = [float(x) for x in p_logits[row, t]]
        zq = [float(x) for x in q_logits[row, t]]
        lp = [z - math.log(sum(math.exp(y) for y in zp)) for z in zp]
        lq = [z - math.log(sum(math.exp(y) for y in zq)) for z in zq]
        kl += sum(math.exp(a) * (a - b) for a, b in zip(lp, lq, strict=True))
        target = ids[row][t + 1]
        dce += lp[target] - lq[target]
    return kl / len(scored), dce / len(scored)


@pytest.mark.unit
def test_kl_and_delta_loss_match_a_hand_computation_on_either_padding_side():
    gen = torch.Generator().manual_seed(0)
    rows = [[1, 4, 2, 3], [2, 0, 1]]  # lengths 4 and 3
    p = torch.randn(2, 4, 5, generator=gen) * 2
    q = p + torch.randn(2, 4, 5, generator=gen)
    right = Batch(torch.tensor([[1, 4, 2, 3], [2, 0, 1, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    # every next token: (row 0: t = 0, 1, 2), (row 1: t = 0, 1); scored_from=[2, 1] keeps targets at index >= 2 / 1
    for scored_from, pairs in ((None, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]), ([2, 1], [(0, 1), (0, 2), (1, 0),
                                                                                           (1, 1)])):
        kl, dloss = divergence(q, reference(_FixedLM(right, p), rows, scored_from))
        want = _by_hand(p, q, rows, pairs)
        assert kl == pytest.approx(want[0], abs=1e-12) and dloss == pytest.approx(want[1], abs=1e-12)
        # the same sequences left-padded (row 1 shifted right by one): the same numbers
        left = Batch(torch.tensor([[1, 4, 2, 3], [0, 2, 0, 1]]), torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]))
        shift = lambda x: torch.stack([x[0], torch.cat([x[1, -1:], x[1, :-1]])])  # noqa: E731
        kl_left, dloss_left = divergence(shift(q), reference(_FixedLM(left, shift(p)), rows, scored_from))
        assert kl_left == pytest.approx(kl, abs=1e-12) and dloss_left == pytest.approx(dloss, abs=1e-12)
    assert divergence(p, reference(_FixedLM(right, p), rows)) == (0.0, 0.0)
    with pytest.raises(InputError, match="one first scored token index"):
        reference(_FixedLM(right, p), rows, [1])
    with pytest.raises(InputError, match="at least one scored next token"):
        reference(_FixedLM(right, p), rows, [5, 5])


@pytest.mark.unit
def test_best_at_kl_picks_the_most_successful_point_within_the_budget():
    curve = [CurvePoint({"name": name}, SteerScores(s), kl, 0.0) for name, s, kl in (
        ("weak", 0.2, 0.01), ("tie, more KL", 0.6, 0.05), ("tie, less KL", 0.6, 0.03), ("on the budget", 0.7, 0.1),
        ("beyond", 0.9, 0.2))]
    assert best_at_kl(curve, 0.1).settings["name"] == "on the budget"  # KL == tau counts as within
    assert best_at_kl(curve, 0.08).settings["name"] == "tie, less KL"
    assert best_at_kl(curve, 0.005) is None and best_at_kl([], 0.1) is None


# -- select on a tiny model ------------------------------------------------------------------------------------------
def _logit_of_token(lm) -> float:
    """The synthetic success: mean logit of token 7 at the prompts' last position."""
    return float(lm.forward(PROMPTS)[:, -1, TOKEN].mean())


def _vector(lm) -> torch.Tensor:
    """A direction that raises token 7's logit (its unembedding row), so success grows with the strength."""
    u = lm.weights.W_U[:, TOKEN] if lm.weights.W_U.shape[0] == lm.dims.d_model else lm.weights.W_U[TOKEN]
    return u / u.norm()


def _candidates(lm):
    v = _vector(lm)
    return grid(lambda layer, alpha: Add(f"blocks.{layer}.resid_pre", v, alpha, model=lm),
                layer=LAYERS, alpha=ALPHAS)


def _brute_force(lm):
    """(layer, alpha) -> (success, KL, Δloss), each computed directly: steered logits vs plain ones, every position."""
    base = lm.forward(CORPUS).double().log_softmax(-1)[:, :-1]
    targets = CORPUS[:, 1:, None]
    out = {}
    for layer in LAYERS:
        for alpha in ALPHAS:
            with Add(f"blocks.{layer}.resid_pre", _vector(lm), alpha).apply(lm):
                steered = lm.forward(CORPUS).double().log_softmax(-1)[:, :-1]
                success = _logit_of_token(lm)
            kl = float((base.exp() * (base - steered)).sum(-1).mean())
            dloss = float(base.gather(-1, targets).mean() - steered.gather(-1, targets).mean())
            out[layer, alpha] = (success, kl, dloss)
    return out


@pytest.fixture(scope="module")
def measured_grid(tiny_lm):
    lm = tiny_lm("llama")
    truth = _brute_force(lm)
    kls = sorted(kl for _, kl, _ in truth.values())
    tau = (kls[3] + kls[4]) / 2  # half the candidates within the budget
    return lm, truth, tau, select(lm, _candidates(lm), success=_logit_of_token, corpus=CORPUS, tau=tau)


@pytest.mark.unit
def test_the_chosen_point_is_the_brute_force_argmax_within_the_budget(measured_grid):
    _, truth, tau, sel = measured_grid
    assert [(p.settings["layer"], p.settings["alpha"]) for p in sel.curve] == list(truth)  # the whole curve, in order
    for point in sel.curve:
        success, kl, dloss = truth[point.settings["layer"], point.settings["alpha"]]
        assert point.success == pytest.approx(success, abs=1e-5)
        assert point.kl == pytest.approx(kl, abs=1e-7) and point.dloss == pytest.approx(dloss, abs=1e-7)
    within = {key: s for key, (s, kl, _) in truth.items() if kl <= tau}
    assert 0 < len(within) < len(truth)
    want = max(within, key=within.__getitem__)
    assert sel.best is not None and (sel.best.settings["layer"], sel.best.settings["alpha"]) == want
    assert max(s for s, _, _ in truth.values()) > sel.best.success  # the budget binds: a stronger one did better
    assert sel.steering.alpha == want[1] and str(sel.steering.site) == f"blocks.{want[0]}.resid_pre"
    assert sel.steering_of(sel.curve[0]).alpha == ALPHAS[0] and sel.skipped == ()
    assert "success" in str(sel) and f"<= {tau:g}" in str(sel)
    with pytest.raises(InputError, match="a point of this selection's curve"):
        sel.steering_of(CurvePoint({}, SteerScores(0.0), 0.0, 0.0))


@pytest.mark.unit
def test_early_stopping_skips_stronger_candidates_once_the_budget_is_left(measured_grid):
    lm, truth, tau, full = measured_grid
    sel = select(lm, _candidates(lm), success=_logit_of_token, corpus=reference(lm, CORPUS), tau=tau,
                 stop_along="alpha")
    kept, skipped = [], []
    for layer in LAYERS:  # by hand: walk each layer's strengths up to the first one beyond the budget
        for alpha in ALPHAS:
            beyond = any(truth[layer, a][1] > tau for a in ALPHAS if a < alpha)
            (skipped if beyond else kept).append((layer, alpha))
    assert skipped, "the grid must leave the budget for the check to mean anything"
    assert [(p.settings["layer"], p.settings["alpha"]) for p in sel.curve] == kept
    assert [(s["layer"], s["alpha"]) for s in sel.skipped] == skipped
    assert sel.best.settings == full.best.settings  # only candidates beyond the budget were left out
    with pytest.raises(InputError, match="a number for the early-stopping axis"):
        select(lm, [({"alpha": "strong"}, Add("blocks.0.resid_pre", _vector(lm), 1.0))],
               success=_logit_of_token, corpus=CORPUS, stop_along="alpha")


@pytest.mark.unit
def test_no_candidate_within_the_budget_gives_none_and_the_lowest_kl_point(measured_grid):
    lm, truth, _, _ = measured_grid
    lowest = min(kl for _, kl, _ in truth.values())
    sel = select(lm, _candidates(lm), success=_logit_of_token, corpus=CORPUS, tau=lowest / 2)
    assert sel.best is None and sel.steering is None
    assert sel.lowest_kl.kl == pytest.approx(lowest, abs=1e-7) and len(sel.curve) == len(truth)
    assert "no candidate of 8 within KL" in str(sel)
    with pytest.raises(InputError, match="within the KL budget") as err:
        sel.report(lm, success=_logit_of_token, corpus=CORPUS)
    assert "lowest KL" in err.value.found and "raise tau" in err.value.fix


@pytest.mark.unit
def test_empty_candidates_bad_axes_and_budgets_are_typed_errors(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(InputError, match="at least one candidate"):
        select(lm, [], success=_logit_of_token, corpus=CORPUS)
    with pytest.raises(InputError, match="tau > 0"):
        select(lm, _candidates(lm), success=_logit_of_token, corpus=CORPUS, tau=0.0)
    with pytest.raises(InputError, match="at least one axis"):
        grid(lambda: None)
    with pytest.raises(InputError, match=r"empty axes \['alpha'\]"):
        grid(lambda layer, alpha: None, layer=[0], alpha=[])
    with pytest.raises(InputError, match="a finite success"):
        select(lm, _candidates(lm), success=lambda m: math.nan, corpus=CORPUS)


@pytest.mark.unit
def test_report_measures_the_chosen_steering_on_another_split(measured_grid):
    lm, _, _, sel = measured_grid
    test_prompts = torch.randint(3, 97, (5, 7), generator=torch.Generator().manual_seed(5))
    test_corpus = torch.randint(3, 97, (3, 8), generator=torch.Generator().manual_seed(6))

    def test_success(model) -> float:
        return float(model.forward(test_prompts)[:, -1, TOKEN].mean())

    report = sel.report(lm, success=test_success, corpus=test_corpus)
    base = lm.forward(test_corpus).double().log_softmax(-1)[:, :-1]
    with sel.steering.apply(lm):
        want = test_success(lm)
        steered = lm.forward(test_corpus).double().log_softmax(-1)[:, :-1]
    assert report.settings == sel.best.settings and report.success == pytest.approx(want, abs=1e-6)
    assert report.kl == pytest.approx(float((base.exp() * (base - steered)).sum(-1).mean()), abs=1e-7)


@pytest.mark.unit
def test_save_and_load_round_trip(measured_grid, tmp_path):
    lm, _, _, sel = measured_grid
    path = sel.save(tmp_path / "chosen")
    assert path == tmp_path / "chosen.json" and (tmp_path / "chosen.safetensors").exists()
    loaded = Selection.load(tmp_path / "chosen", lm)
    assert loaded.curve == sel.curve and loaded.tau == sel.tau and loaded.best == sel.best
    assert loaded.steering is not None and loaded.steerings.count(None) == len(sel.curve) - 1
    with loaded.steering.apply(lm):
        got = lm.forward(PROMPTS)
    with sel.steering.apply(lm):
        torch.testing.assert_close(got, lm.forward(PROMPTS), atol=0, rtol=0)
    with pytest.raises(InputError, match="none kept"):
        loaded.steering_of(loaded.curve[1] if loaded.curve[0] is loaded.best else loaded.curve[0])
    as_steering = Steering.load(path, lm)  # the file is a plain steering too
    assert isinstance(as_steering, Add) and as_steering.alpha == sel.steering.alpha
    assert json.loads(path.read_text())["selection"]["saved"] == sel.curve.index(sel.best)
    sel.steering.save(tmp_path / "plain")
    with pytest.raises(InputError, match=r"a selection written by Selection\.save"):
        Selection.load(tmp_path / "plain", lm)


# -- recipes on a task's dev split -----------------------------------------------------------------------------------
def _token_task(lm, goal: str = "induce"):
    """A task on the tiny model: success = mean probability of TOKEN after the prompts; the positive set ends in it."""
    from lsi.evaluation.steer import SteerSplit, SteerTask

    def success(model) -> SteerScores:
        return SteerScores(float(model.forward(PROMPTS)[:, -1].softmax(-1)[:, TOKEN].mean()))

    positive = torch.cat([PROMPTS[:, :4], torch.full((6, 1), TOKEN)], 1)
    split = SteerSplit(positive=positive, negative=PROMPTS, measure=success, corpus=CORPUS)
    return SteerTask("toy", "more token 7", goal, split, split, tau=0.01)


@pytest.mark.unit
def test_choose_on_dev_takes_the_choice_with_the_best_candidate_within_the_budget(tiny_lm):
    from lsi.steer.selection import (
        ADDITION_ALPHAS,
        DevChoice,
        addition_grid,
        additions,
        choose_on_dev,
        contrast_directions,
    )

    lm = tiny_lm("llama")
    task = _token_task(lm)
    choices = contrast_directions(lm, task)
    assert [c.site for c in choices] == ["blocks.0.resid_pre", "blocks.1.resid_pre"][: len(choices)]
    chosen = choose_on_dev(lm, task, addition_grid(task), choices)
    # brute force: every choice's grid measured without early stopping, the best point within the budget
    ref = reference(lm, CORPUS)
    best = []
    for i, (site, _, v) in enumerate(choices):
        for a in ADDITION_ALPHAS:
            with Add(site, v, a).apply(lm):
                kl, _ = divergence(lm.forward(ref.batch), ref)
                best.append((task.dev.measure(lm).success, -kl, i) if kl <= task.tau else None)
    within = [b for b in best if b is not None]
    assert within and len(within) < len(best)  # the budget binds
    assert chosen is choices[max(within)[2]]
    assert isinstance(chosen, DevChoice)
    curve = additions(lm, _token_task(lm, "remove"), chosen.site, chosen.vector)
    assert [s for s, _ in curve] == [{"site": chosen.site, "alpha": -a} for a in ADDITION_ALPHAS]
