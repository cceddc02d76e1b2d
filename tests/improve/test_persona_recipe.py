"""The persona recipe on binary_attribute: steering beats its baselines, monitoring and screening work, the export
folds the chosen addition; and stories260k runs through the CLI."""

import json

import pytest

from lsi.errors import InputError
from lsi.improve.recipe import load_model, run_recipe
from lsi.improve.rundir import sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def persona(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "persona"
    return out, run_recipe("persona", "binary_attribute", out)


def test_the_persona_vector_beats_the_random_direction_and_the_unsteered_model(persona):
    _, r = persona
    assert r.chosen == "persona vector"
    steered, random, unsteered = (r.row(v).values["rate"] for v in ("persona vector", "random direction",
                                                                    "unsteered"))
    assert steered.low > random.high and steered.low > unsteered.high
    assert r.value("persona vector", "kl") <= 0.1  # chosen within the budget on dev, and stays there on test


def test_monitoring_and_screening_predict_the_trait(persona):
    _, r = persona
    monitor, _, screening = r.curves[1], r.curves[0], r.curves[2]
    assert max(p.y for p in monitor.series[0].points) >= 0.8  # the projection predicts the response
    shifts = screening.series[0].points
    assert len(shifts) == 5
    ranked = sorted(shifts, key=lambda p: p.x)
    assert ranked[0].y < ranked[-1].y  # the set with the largest projection shift moves the trait most


def test_the_export_folds_the_chosen_addition(persona):
    out, r = persona
    assert r.value("persona vector", "params") > 0
    assert all(sha256_file(out / "export" / f) == h for f, h in r.export.files.items())
    record = json.loads((out / "export" / "lsi_export.json").read_text())
    assert record["max_abs_logit_error"] <= 1e-4 and "Add" in record["folded"][0]


def test_persona_needs_a_model_with_built_in_traits(tmp_path):
    with pytest.raises(InputError, match="built-in persona data"):
        run_recipe("persona", "refusal_gate", tmp_path / "run", lm=load_model("refusal_gate"))
