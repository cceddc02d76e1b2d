"""The fairness recipe on biased_occupations: causal mediation finds the planted head, ablating it halves the bias
gap at least while context accuracy and pronoun agreement stay; its generic measures equal the organism's own."""

import json

import pytest

from lsi.improve.fairness import FairnessData, _builtin, lean_metric, swap_pairs, values
from lsi.improve.recipe import load_model, run_recipe
from lsi.organisms import biased_occupations as org
from lsi.organisms.registry import ground_truth

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def lm():
    return load_model("biased_occupations")


@pytest.fixture(scope="module")
def fairness(lm, tmp_path_factory):
    return run_recipe("fairness", "biased_occupations", tmp_path_factory.mktemp("runs") / "fairness", lm=lm)


def test_the_recipe_halves_the_bias_and_keeps_context_and_pronouns(fairness):
    r = fairness
    base_gap, gap = r.value("unsteered", "bias_gap"), r.value(r.chosen, "bias_gap")
    assert base_gap >= 0.2 and gap <= base_gap / 2
    assert r.value(r.chosen, "context_accuracy") >= 0.95 * r.value("unsteered", "context_accuracy")
    assert r.value(r.chosen, "factual") >= 0.95
    assert r.value(next(v.variant for v in r.rows if v.variant.startswith("random")), "bias_gap") > gap
    assert "AUROC 1.000" in " ".join(r.notes)


def test_the_generic_measures_equal_the_organisms_own(lm):
    data: FairnessData = _builtin()[0]
    got = {k: sum(v) / len(v) for k, v in values(lm, data.test).items()}
    want = org.fairness_measures(lm, ground_truth("biased_occupations")["splits"]["test"])
    assert got["bias_gap"] == pytest.approx(want["bias_gap"], abs=1e-5)
    assert got["context_accuracy"] == pytest.approx(want["context_accuracy"])
    assert got["factual"] == pytest.approx(want["pronoun_agreement"])


def test_the_lean_flips_sign_under_a_swap(lm):
    split = _builtin()[0].dev
    clean, swapped = swap_pairs(split)
    metric = lean_metric(lm, split)
    c, s = lm.to_batch(clean), lm.to_batch(swapped)
    assert float(metric(lm.forward(c), c)) > 0.1
    assert float(metric(lm.forward(s), s)) == pytest.approx(-float(metric(lm.forward(c), c)), abs=1e-6)


def test_user_data_in_jsonl_finds_the_same_mediator(lm, tmp_path):
    data = _builtin()[0]
    lines = []
    for name, split in (("dev", data.dev), ("test", data.test)):
        lines += [{"a": p.a, "b": p.b, "targets": list(p.targets), "answer": p.answer, "split": name}
                  for p in split.pairs]
        lines += [{"prompt": f.prompt, "answer": f.answer, "split": name} for f in split.factual]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    r = run_recipe("fairness", "biased_occupations", tmp_path / "run", data=path, lm=lm,
                   config={"ks": [1], "kinds": ["zero"], "bootstrap": 100})
    assert r.chosen == "zero-ablate top 1" and "blocks.1.attn.head_out[2]" in r.row(r.chosen).description
    assert r.value(r.chosen, "bias_gap") <= r.value("unsteered", "bias_gap") / 2
