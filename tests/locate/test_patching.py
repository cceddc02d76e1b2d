"""Activation patching and ablation: batched runs against one forward per patch, normalization, bad input."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import pytest
import torch

import lsi
from lsi.core.runs import Run
from lsi.errors import InputError, ShapeMismatchError
from lsi.locate.metrics import logit_diff
from lsi.locate.patching import ablation, activation_patching

pytestmark = pytest.mark.integration

# Batched and looped runs differ only by float round-off of different batch shapes (measured 0 to ~1e-7 here).
ATOL = 1e-5
GEN = torch.Generator().manual_seed(0)
CLEAN = torch.randint(3, 97, (3, 7), generator=GEN)
CORRUPT = CLEAN.clone()
CORRUPT[:, 2] = (CLEAN[:, 2] + 11) % 90 + 3  # one changed token per row: positions 0-1 are identical
METRIC = logit_diff(5, 6)


def f(lm, inputs, *ops):
    with lm.intervene(*ops):
        return float(METRIC(lm.forward(inputs), lm.to_batch(inputs)))


def patch_loop(lm, sites, positions, *, source=CLEAN, base=CORRUPT):
    """The reference: one forward per (site, position) with lsi.Patch, normalized like activation_patching."""
    cache = lm.run_with_cache(source, [lsi.Site.parse(s).without_index() for s in sites])
    f_clean, f_corrupt = f(lm, CLEAN), f(lm, CORRUPT)
    return torch.tensor([[(f(lm, base, lsi.Patch(s, cache, positions=p)) - f_corrupt) / (f_clean - f_corrupt)
                          for p in positions] for s in sites])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_resid_sweep_equals_one_forward_per_patch(tiny_lm, family):
    lm = tiny_lm(family)
    result = activation_patching(lm, CLEAN, CORRUPT, METRIC, "blocks.*.resid_pre", positions="each", batch_size=8)
    assert result.axes == (("site", ("blocks.0.resid_pre", "blocks.1.resid_pre")),
                           ("position", tuple(str(i) for i in range(7))))
    expected = patch_loop(lm, ["blocks.0.resid_pre", "blocks.1.resid_pre"], range(7))
    torch.testing.assert_close(result.scores, expected, atol=ATOL, rtol=0)
    assert result.settings["direction"] == "denoise" and len(result.settings["f_patched"]) == 2


def test_every_head_and_grouped_neurons_equal_the_loop_in_any_chunking(tiny_lm):
    lm = tiny_lm("llama")
    sites = ["blocks.*.attn.head_out", "blocks.0.mlp.post[3,7]", "blocks.1.mlp.post[5]"]
    labels = [f"blocks.{layer}.attn.head_out[{h}]" for layer in range(2) for h in range(4)]
    labels += ["blocks.0.mlp.post[3,7]", "blocks.1.mlp.post[5]"]
    expected = patch_loop(lm, labels, [None]).flatten()
    for batch_size in (1, 7, 1000):  # one copy per forward, 2 copies with a remainder, everything in one forward
        result = activation_patching(lm, CLEAN, CORRUPT, METRIC, sites, batch_size=batch_size)
        assert result.labels == labels
        torch.testing.assert_close(result.scores, expected, atol=ATOL, rtol=0)


def test_normalized_scores_are_one_for_the_whole_stream_and_zero_for_no_ops(tiny_lm):
    lm = tiny_lm("qwen2")
    last = activation_patching(lm, CLEAN, CORRUPT, METRIC, ["blocks.1.resid_post", "ln_final"])
    torch.testing.assert_close(last.scores, torch.ones(2), atol=ATOL, rtol=0)
    sweep = activation_patching(lm, CLEAN, CORRUPT, METRIC, "blocks.*.resid_pre", positions=[0, 1, 2])
    # before the changed token both runs hold the same values: patching them changes nothing (and is not run)
    assert sweep.scores[:, :2].abs().max() == 0 and sweep.settings["patched_runs"] == 2
    expected = patch_loop(lm, ["blocks.0.resid_pre", "blocks.1.resid_pre"], [0, 1])
    torch.testing.assert_close(sweep.scores[:, :2], expected, atol=ATOL, rtol=0)
    # at the changed token the layer-0 input is the whole difference
    assert sweep.scores[0, 2] == pytest.approx(1.0, abs=ATOL)


def test_noising_mirrors_denoising(tiny_lm):
    lm = tiny_lm("llama")
    sites = ["blocks.0.resid_pre", "blocks.1.resid_post"]
    noise = activation_patching(lm, CLEAN, CORRUPT, METRIC, sites, positions=[0, 2], direction="noise")
    denoise = activation_patching(lm, CLEAN, CORRUPT, METRIC, sites, positions=[0, 2], direction="denoise")
    # a no-op patch keeps the clean run (noising score 1) or the corrupted run (denoising score 0)
    torch.testing.assert_close(noise.scores[:, 0], torch.ones(2), atol=ATOL, rtol=0)
    torch.testing.assert_close(denoise.scores[:, 0], torch.zeros(2), atol=ATOL, rtol=0)
    # the whole changed embedding: noising turns the clean run into the corrupted one (score 0)
    assert noise.scores[0, 1] == pytest.approx(0.0, abs=ATOL)
    expected = patch_loop(lm, sites, [0, 2], source=CORRUPT, base=CLEAN)
    torch.testing.assert_close(noise.scores, expected, atol=ATOL, rtol=0)
    assert noise.settings["f_clean"] == denoise.settings["f_clean"]


def test_position_options_label_columns(tiny_lm):
    lm = tiny_lm("llama")
    picked = activation_patching(lm, CLEAN, CORRUPT, METRIC, "blocks.1.resid_pre", positions=[2, "last", lsi.Match(5)])
    assert picked.axes[1] == ("position", ("2", "last", "match(5)"))
    once = activation_patching(lm, CLEAN, CORRUPT, METRIC, "blocks.1.resid_pre", positions=(2, -1))
    assert once.axes == (("site", ("blocks.1.resid_pre",)),)
    expected = patch_loop(lm, ["blocks.1.resid_pre"], [(2, -1)])
    torch.testing.assert_close(once.scores, expected.flatten(), atol=ATOL, rtol=0)


def test_padded_rows_of_different_lengths(tiny_lm):
    lm = tiny_lm("llama")
    clean = [[7, 8, 9, 10, 11], [12, 13, 14]]
    corrupt = [[7, 8, 40, 10, 11], [12, 41, 14]]
    batch = {"clean": lm.to_batch(clean, padding_side="left"), "corrupt": lm.to_batch(corrupt, padding_side="left")}
    result = activation_patching(lm, batch["clean"], batch["corrupt"], METRIC, "blocks.*.resid_pre",
                                 positions=[0, -1])
    cache = lm.run_with_cache(batch["clean"], "blocks.*.resid_pre")

    def run(b, *ops):
        with lm.intervene(*ops):
            return float(METRIC(lm.forward(b), b))

    f_clean, f_corrupt = run(batch["clean"]), run(batch["corrupt"])
    expected = [[(run(batch["corrupt"], lsi.Patch(f"blocks.{layer}.resid_pre", cache, positions=p)) - f_corrupt)
                 / (f_clean - f_corrupt) for p in (0, -1)] for layer in range(2)]
    torch.testing.assert_close(result.scores, torch.tensor(expected), atol=ATOL, rtol=0)


def test_corruption_by_setting_with_and_without_batch_agnostic_noise(tiny_lm):
    lm = tiny_lm("gpt2")
    rows = torch.Generator().manual_seed(1)
    noise = torch.randn(3, 7, 32, generator=rows) * (torch.arange(7) == 2)[None, :, None]

    def shaped(x):  # only fits the original three rows
        return x + noise

    def agnostic(x):
        return x + noise.repeat(x.shape[0] // 3, 1, 1)

    results = []
    for fn in (shaped, agnostic):
        run = Run(CLEAN, lambda fn=fn: lm.intervene(lsi.Apply("embed", fn)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(activation_patching(lm, CLEAN, run, METRIC, "blocks.*.attn.head_out"))
        assert any("one patched copy per forward" in str(w.message) for w in caught) == (fn is shaped)
    torch.testing.assert_close(results[0].scores, results[1].scores, atol=ATOL, rtol=0)
    with lm.intervene(lsi.Apply("embed", shaped)):
        f_corrupt = f(lm, CLEAN)
    assert results[1].settings["f_corrupt"] == pytest.approx(f_corrupt)


# --- ablation ------------------------------------------------------------------------------------------------------

def ablation_loop(lm, sites, make_op):
    base = f(lm, CLEAN)
    return torch.tensor([f(lm, CLEAN, make_op(s)) - base for s in sites])


def test_zero_and_mean_ablation_equal_hand_computed(tiny_lm):
    lm = tiny_lm("llama")
    sites = ["blocks.0.attn.head_out[1]", "blocks.1.mlp.post[2]", "blocks.1.mlp.out"]
    zero = ablation(lm, CLEAN, METRIC, sites, kind="zero", batch_size=5)
    torch.testing.assert_close(zero.scores, ablation_loop(lm, sites, lsi.Zero), atol=ATOL, rtol=0)
    reference = torch.randint(3, 97, (5, 4), generator=torch.Generator().manual_seed(2))
    stats = lm.run_with_cache(reference, sites)
    mean = ablation(lm, CLEAN, METRIC, sites, kind="mean", reference=reference)
    expected = ablation_loop(lm, sites, lambda s: lsi.Mean(s, stats[s].mean(dim=(0, 1))))
    torch.testing.assert_close(mean.scores, expected, atol=ATOL, rtol=0)
    assert mean.method == "mean_ablation" and mean.settings["f_clean"] == pytest.approx(f(lm, CLEAN))


def test_resample_ablation_takes_another_inputs_values(tiny_lm):
    lm = tiny_lm("llama")
    two = CLEAN[:2]
    sites = ["blocks.0.attn.head_out[2]", "blocks.1.resid_pre"]
    result = ablation(lm, two, METRIC, sites, kind="resample", positions="each")
    # with two inputs each row's only donor is the other row
    swapped = lm.run_with_cache(two.flip(0), [lsi.Site.parse(s).without_index() for s in sites])
    base = float(METRIC(lm.forward(two), lm.to_batch(two)))
    expected = []
    for s in sites:
        row = []
        for p in range(7):
            with lm.intervene(lsi.Patch(s, swapped, positions=p)):
                row.append(float(METRIC(lm.forward(two), lm.to_batch(two))) - base)
        expected.append(row)
    torch.testing.assert_close(result.scores, torch.tensor(expected), atol=ATOL, rtol=0)


def test_resample_donors_are_other_and_long_enough(tiny_lm):
    lm = tiny_lm("llama")
    inputs = [[5, 6, 7], [8, 9, 10, 11]]
    reference = [[12, 13, 14, 15, 16], [17, 18], [19, 20, 21, 22]]
    a = ablation(lm, inputs, METRIC, "blocks.1.resid_pre", kind="resample", reference=reference, seed=3)
    b = ablation(lm, inputs, METRIC, "blocks.1.resid_pre", kind="resample", reference=reference, seed=3)
    assert a.scores.tolist() == b.scores.tolist()
    with pytest.raises(InputError, match="at least as long") as err:
        ablation(lm, inputs, METRIC, "blocks.1.resid_pre", kind="resample", reference=[[1, 2]])
    assert "reference=" in err.value.fix
    with pytest.raises(InputError, match="at least as long"):  # the longest input has no other donor
        ablation(lm, inputs, METRIC, "blocks.1.resid_pre", kind="resample")


# --- bad input -----------------------------------------------------------------------------------------------------

def test_length_mismatch_says_how_to_align(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(ShapeMismatchError) as err:
        activation_patching(lm, CLEAN, CORRUPT[:, :6], METRIC, "blocks.0.resid_pre")
    assert "same token length" in err.value.expected
    assert "pad / truncate" in err.value.fix and "aligned part" in err.value.fix
    with pytest.raises(ShapeMismatchError):  # same width, different real lengths
        activation_patching(lm, [[5, 6, 7], [8, 9]], [[5, 6, 7], [8, 9, 9]], METRIC, "blocks.0.resid_pre")


def test_bad_metric_inputs_and_options(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(InputError, match="scalar"):
        activation_patching(lm, CLEAN, CORRUPT, lambda logits, batch: logits[:, -1, 5], "blocks.0.resid_pre")
    with pytest.raises(InputError, match="scalar"):
        ablation(lm, CLEAN, lambda logits, batch: logits[:, -1, :2].sum(0), "blocks.0.resid_pre")
    with pytest.raises(InputError, match="at least one input"):
        activation_patching(lm, [], [], METRIC, "blocks.0.resid_pre")
    with pytest.raises(InputError, match="at least one site"):
        ablation(lm, CLEAN, METRIC, [])
    with pytest.raises(InputError, match="direction"):
        activation_patching(lm, CLEAN, CORRUPT, METRIC, "blocks.0.resid_pre", direction="forward")
    with pytest.raises(InputError, match="metric differs"):
        activation_patching(lm, CLEAN, CLEAN, METRIC, "blocks.0.resid_pre")
    with pytest.raises(InputError, match="kind"):
        ablation(lm, CLEAN, METRIC, "blocks.0.resid_pre", kind="noise")
    with pytest.raises(InputError, match="batch_size"):
        ablation(lm, CLEAN, METRIC, "blocks.0.resid_pre", batch_size=0)
    with pytest.raises(InputError, match="one setting per run"):
        activation_patching(lm, Run(CLEAN), CORRUPT, METRIC, "blocks.0.resid_pre",
                            clean_setting=nullcontext)


# --- benchmark -----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_patching_finds_the_induction_heads():
    from lsi.bench.groundtruth import run_groundtruth

    result = run_groundtruth(methods=["activation_patching", "activation_patching_noising", "mean_ablation",
                                      "resample_ablation"], organisms=["induction"])
    grades = result.to_json()["tasks"][0]["methods"]
    assert grades["activation_patching"]["auroc"] >= 0.95
    assert grades["activation_patching_noising"]["auroc"] >= 0.95
    assert grades["mean_ablation"]["auroc"] >= 0.95 and grades["resample_ablation"]["auroc"] >= 0.95
