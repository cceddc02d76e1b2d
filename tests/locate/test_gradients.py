"""Gradient detection against exact references: exact patching and ablation where the metric is linear, analytic
gradients, IG completeness, parameter gradients by hand; bad input; attribution patching on the induction
organism."""

import pytest
import torch

import lsi
from lsi.core.runs import Run
from lsi.errors import InputError, ShapeMismatchError
from lsi.locate.gradients import (
    attribution_patching,
    completeness_error,
    gradient_norm,
    gradient_x_input,
    integrated_gradients,
    parameter_gradients,
)
from lsi.locate.metrics import Metric, logit_diff, target_logprob

pytestmark = pytest.mark.unit

# logit_diff at the last token is linear in ln_final's output (Llama's lm_head has no bias): first-order
# estimates at ln_final are exact.
LINEAR = logit_diff(5, 9)


@pytest.fixture
def lm(tiny_lm):
    return tiny_lm("llama")


@pytest.fixture
def ids() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, 90, (3, 6), generator=gen), torch.randint(3, 90, (3, 6), generator=gen)


def metric_of(lm, inputs, metric=LINEAR, *ops) -> float:
    with lm.intervene(*ops):
        return float(metric(lm.forward(inputs), lm.to_batch(inputs)))


# -- attribution patching ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_attribution_patching_equals_exact_patching_when_linear(lm, ids, direction) -> None:
    clean, corrupt = ids
    base, source = (clean, corrupt) if direction == "noise" else (corrupt, clean)
    cache = lm.run_with_cache(source, "ln_final")
    f_base = metric_of(lm, base)
    exact_all = metric_of(lm, base, LINEAR, lsi.Patch("ln_final", cache)) - f_base
    exact_each = [metric_of(lm, base, LINEAR, lsi.Patch("ln_final", cache, positions=lsi.Index(p))) - f_base
                  for p in range(clean.shape[1])]
    whole = attribution_patching(lm, clean, corrupt, LINEAR, "ln_final", direction=direction, normalize=False)
    each = attribution_patching(lm, clean, corrupt, LINEAR, "ln_final", positions="each", direction=direction,
                                normalize=False)
    assert whole.labels == ["ln_final"] and each.axes[1] == ("position", tuple("012345"))
    assert whole.scores.item() == pytest.approx(exact_all, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(each.scores[0], torch.tensor(exact_each), rtol=1e-4, atol=1e-5)
    assert exact_each[-1] == pytest.approx(exact_all, rel=1e-4)  # only the last position is read


@pytest.mark.parametrize(("direction", "expected"), [("noise", 0.0), ("denoise", 1.0)])
def test_normalized_attribution_patching_follows_the_patching_formula(lm, ids, direction, expected) -> None:
    clean, corrupt = ids
    f_clean, f_corrupt = metric_of(lm, clean), metric_of(lm, corrupt)
    base, source = (clean, corrupt) if direction == "noise" else (corrupt, clean)
    patched = metric_of(lm, base, LINEAR, lsi.Patch("ln_final", lm.run_with_cache(source, "ln_final")))
    r = attribution_patching(lm, clean, corrupt, LINEAR, "ln_final", direction=direction)
    assert r.settings["f_clean"] == pytest.approx(f_clean) and r.settings["f_corrupt"] == pytest.approx(f_corrupt)
    assert r.scores.item() == pytest.approx((patched - f_corrupt) / (f_clean - f_corrupt), abs=1e-4)
    assert r.scores.item() == pytest.approx(expected, abs=1e-4)  # ln_final carries all of a linear metric


def test_attribution_patching_with_a_corrupting_setting_and_per_head_objects(lm, ids) -> None:
    clean, _ = ids
    noise = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(1))
    corrupted = Run(clean, lambda: lm.intervene(lsi.Add("embed", noise)))
    with corrupted.setting():
        cache = lm.run_with_cache(clean, "ln_final")
    exact = metric_of(lm, clean, LINEAR, lsi.Patch("ln_final", cache)) - metric_of(lm, clean)
    for kwargs in ({"corrupted": corrupted}, {"corrupted": clean, "corrupted_setting": corrupted.setting}):
        r = attribution_patching(lm, clean, metric=LINEAR, sites="ln_final", direction="noise", normalize=False,
                                 **kwargs)
        assert r.scores.item() == pytest.approx(exact, rel=1e-4)
    heads = attribution_patching(lm, Run(clean), corrupted, LINEAR, "blocks.1.attn.head_out", normalize=False)
    attn = attribution_patching(lm, clean, corrupted, LINEAR, "blocks.1.attn.out", normalize=False)
    assert heads.labels == [f"blocks.1.attn.head_out[{h}]" for h in range(4)]
    assert heads.scores.sum().item() == pytest.approx(attn.scores.item(), rel=1e-4, abs=1e-6)  # o_proj: no bias


# -- gradient × input and gradient norm ---------------------------------------------------------------------------
def test_gradient_x_input_equals_exact_zero_ablation_when_linear(lm, ids) -> None:
    clean, _ = ids
    f = metric_of(lm, clean)
    each = gradient_x_input(lm, clean, LINEAR, "ln_final", positions="each")
    exact = [f - metric_of(lm, clean, LINEAR, lsi.Zero("ln_final", positions=lsi.Index(p))) for p in range(6)]
    torch.testing.assert_close(each.scores[0], torch.tensor(exact), rtol=1e-4, atol=1e-5)
    assert gradient_x_input(lm, clean, LINEAR, "ln_final").scores.item() == pytest.approx(f, rel=1e-4)


def test_gradient_x_input_abs_is_the_mean_of_each_rows_own_absolute_score(lm, ids) -> None:
    clean, _ = ids
    rows = [gradient_x_input(lm, clean[i:i + 1], LINEAR, "blocks.0.mlp.out").scores for i in range(3)]
    r = gradient_x_input(lm, clean, LINEAR, "blocks.0.mlp.out", aggregate="abs")
    assert r.scores.item() == pytest.approx(torch.stack(rows).abs().mean().item(), rel=1e-4)
    assert r.settings["aggregate"] == "abs"


def test_heads_and_neurons_split_their_sites_gradient_x_input(lm, ids) -> None:
    clean, _ = ids
    metric = target_logprob(2)  # nonlinear: the identities hold as attn.out = Σ_h z_h W_O[h] and mlp.out = W_out post
    r = gradient_x_input(lm, clean, metric, ["blocks.0.attn.head_out", "blocks.0.attn.z", "blocks.0.attn.out",
                                             "blocks.1.mlp.post", "blocks.1.mlp.out"])
    d = r.as_dict()
    neurons = sum(d[f"blocks.1.mlp.post[{j}]"] for j in range(48))
    for kind in ("head_out", "z"):
        heads = sum(d[f"blocks.0.attn.{kind}[{h}]"] for h in range(4))
        assert heads == pytest.approx(d["blocks.0.attn.out"], rel=1e-4, abs=1e-6)
    assert neurons == pytest.approx(d["blocks.1.mlp.out"], rel=1e-4, abs=1e-6)
    picked = gradient_x_input(lm, clean, metric, "blocks.1.mlp.post[3,7]").as_dict()
    assert picked == pytest.approx({k: d[k] for k in ("blocks.1.mlp.post[3]", "blocks.1.mlp.post[7]")}, rel=1e-5)


def test_positions_count_real_tokens_whatever_the_padding(lm, ids) -> None:
    clean, _ = ids
    rows = [clean[0].tolist(), clean[1, :4].tolist()]
    metric = target_logprob(2)  # averages over rows: the padded batch's score is the mean of the rows' own
    alone = [gradient_x_input(lm, [row], metric, "blocks.0.mlp.out", positions="each").scores[0] for row in rows]
    expected = (alone[0] + torch.nn.functional.pad(alone[1], (0, 2))) / 2
    batch = lm.to_batch(rows, padding_side="left")
    r = gradient_x_input(lm, batch, metric, "blocks.0.mlp.out", positions="each")
    assert r.axes[1] == ("position", tuple("012345"))
    torch.testing.assert_close(r.scores[0], expected, rtol=1e-4, atol=1e-6)


def test_gradient_norm_matches_the_analytic_gradient(lm, ids) -> None:
    clean, _ = ids
    w_u = lm.weights.W_U
    expected = (w_u[:, 5] - w_u[:, 9]).norm().item()  # per row: ||w_5 - w_9|| / 3 at the last position
    each = gradient_norm(lm, clean, LINEAR, "ln_final", positions="each")
    assert each.scores[0, -1].item() == pytest.approx(expected, rel=1e-5)
    assert each.scores[0, :-1].abs().max().item() == 0.0
    assert gradient_norm(lm, clean, LINEAR, "ln_final").scores.item() == pytest.approx(expected, rel=1e-5)


# -- integrated gradients -------------------------------------------------------------------------------------------
@pytest.fixture
def curved(tiny_lm):
    """Larger weights than the default init, so F is far from linear in a layer's output."""
    return tiny_lm("llama", initializer_range=0.2)


def test_integrated_gradients_completeness_shrinks_with_steps(curved, ids) -> None:
    lm, (clean, _) = curved, ids
    metric = target_logprob(3)
    runs = [integrated_gradients(lm, clean, metric, "blocks.0.mlp.out", steps=steps, steps_per_batch=16)
            for steps in (2, 8, 48)]
    errors = [completeness_error(r, relative=True) for r in runs]
    assert errors[0] > 0.1 and errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3
    fine = runs[2]
    f_zeroed = metric_of(lm, clean, metric, lsi.Zero("blocks.0.mlp.out"))
    assert fine.settings["f_baseline"] == pytest.approx(f_zeroed, rel=1e-5)
    assert fine.settings["rule"] == "midpoint" and fine.settings["steps"] == 48


def test_integrated_gradients_steps_per_batch_and_linear_case(lm, ids) -> None:
    clean, corrupt = ids
    one = integrated_gradients(lm, clean, LINEAR, "ln_final", steps=1)
    torch.testing.assert_close(one.scores, gradient_x_input(lm, clean, LINEAR, "ln_final").scores)
    cache = lm.run_with_cache(corrupt, "blocks.0.resid_post")
    full = integrated_gradients(lm, clean, LINEAR, "blocks.0.resid_post", baseline=cache, steps=6, positions="each")
    chunked = integrated_gradients(lm, clean, LINEAR, "blocks.0.resid_post", baseline=cache, steps=6,
                                   steps_per_batch=4, positions="each")
    torch.testing.assert_close(full.scores, chunked.scores, rtol=1e-4, atol=1e-6)
    f_corrupt_resid = metric_of(lm, clean, LINEAR, lsi.Patch("blocks.0.resid_post", cache))
    assert full.settings["f_baseline"] == pytest.approx(f_corrupt_resid, rel=1e-5)


def test_integrated_gradients_on_one_head_moves_only_that_head(curved, ids) -> None:
    lm, (clean, _) = curved, ids
    metric = target_logprob(3)
    r = integrated_gradients(lm, clean, metric, "blocks.1.attn.head_out[2]", steps=32)
    assert r.labels == ["blocks.1.attn.head_out[2]"]
    f_zeroed = metric_of(lm, clean, metric, lsi.Zero("blocks.1.attn.head_out[2]"))
    assert r.settings["f_baseline"] == pytest.approx(f_zeroed, rel=1e-5)
    assert completeness_error(r, relative=True) < 1e-3


# -- parameter gradients ------------------------------------------------------------------------------------------
def test_parameter_gradient_norms_match_autograd(fresh_lm, ids) -> None:
    clean, _ = ids
    lm = fresh_lm("gpt2")
    lm.model.requires_grad_(False)
    by_tensor = parameter_gradients(lm, clean, LINEAR, params=["*.0.mlp.*", "lm_head.weight"]).as_dict()
    rows = parameter_gradients(lm, clean, LINEAR, params="*.1.mlp.c_fc.weight", per="row")
    assert not any(p.requires_grad for p in lm.model.parameters())  # flags restored
    lm.model.requires_grad_(True)
    LINEAR(lm.model(clean).logits, lm.to_batch(clean)).backward()
    params = dict(lm.model.named_parameters())
    assert set(by_tensor) == {"transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
                              "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias"}
    for name, norm in by_tensor.items():
        assert norm == pytest.approx(params[name].grad.norm().item(), rel=1e-5)
    c_fc = params["transformer.h.1.mlp.c_fc.weight"].grad  # Conv1D: stored [in, out]; rows are output units
    assert rows.labels[:2] == ["transformer.h.1.mlp.c_fc.weight[0]", "transformer.h.1.mlp.c_fc.weight[1]"]
    torch.testing.assert_close(rows.scores, c_fc.norm(dim=0), rtol=1e-5, atol=1e-8)


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_is_refused_with_typed_errors(lm, ids) -> None:
    clean, corrupt = ids
    with pytest.raises(InputError, match="scalar"):
        gradient_x_input(lm, clean, lambda logits, batch: logits[:, -1, 0], "ln_final")
    with pytest.raises(ShapeMismatchError, match="same token length") as err:
        attribution_patching(lm, clean, corrupt[:, :4], LINEAR, "ln_final")
    assert "corrupted (3, 4)" in str(err.value)
    with pytest.raises(InputError, match="at least one input"):
        gradient_norm(lm, [], LINEAR, "ln_final")
    with pytest.raises(InputError, match="steps >= 1"):
        integrated_gradients(lm, clean, LINEAR, "ln_final", steps=0)
    with pytest.raises(InputError, match="positions in"):
        gradient_x_input(lm, clean, LINEAR, "ln_final", positions="last")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="metric differs"):
        attribution_patching(lm, clean, clean.clone(), LINEAR, "ln_final")
    with pytest.raises(InputError, match="one setting per run"):
        attribution_patching(lm, clean, Run(corrupt), LINEAR, "ln_final", corrupted_setting=lambda: lm.intervene())
    with pytest.raises(InputError, match="direction in"):
        attribution_patching(lm, clean, corrupt, LINEAR, "ln_final", direction="both")  # type: ignore[arg-type]
    with pytest.raises(ShapeMismatchError, match="baseline"):
        integrated_gradients(lm, clean, LINEAR, "ln_final", baseline=torch.zeros(5))
    with pytest.raises(InputError, match="one concrete site"):
        integrated_gradients(lm, clean, LINEAR, "blocks.*.mlp.out")
    with pytest.raises(InputError, match="integrated_gradients"):
        completeness_error(gradient_norm(lm, clean, LINEAR, "ln_final"))
    with pytest.raises(InputError, match="parameter names"):
        parameter_gradients(lm, clean, LINEAR, params="no_such_weight")


# -- the induction organism ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_attribution_patching_finds_the_induction_heads_and_ranks_like_exact_patching() -> None:
    from lsi.bench.groundtruth import run_groundtruth
    from lsi.evaluation import ranking as metrics
    from lsi.organisms.registry import get_organism, ground_truth, load_organism

    result = run_groundtruth(methods=["attribution_patching"], organisms=["induction"])
    grades = result.to_json()["tasks"][0]["methods"]["attribution_patching"]
    assert grades["auroc"] >= 0.85 and grades["r_precision"] >= 0.7  # GROUND_TRUTH.md thresholds

    lm = load_organism("induction")
    task = get_organism("induction").locate_tasks(lm, ground_truth("induction"))[0]
    split = task.test
    assert split.clean is not None and split.corrupted is not None
    metric = Metric("copy logprob", lambda logits, _: split.metric(logits))
    estimate = attribution_patching(lm, split.clean.inputs, split.corrupted.inputs, metric, list(task.universe),
                                    direction="denoise").as_dict()
    cache = lm.run_with_cache(split.clean.inputs, ["blocks.0.attn.head_out", "blocks.1.attn.head_out"])
    exact = {u: metric_of(lm, split.corrupted.inputs, metric, lsi.Patch(u, cache)) for u in task.universe}
    assert metrics.spearman(estimate, exact) >= 0.9
