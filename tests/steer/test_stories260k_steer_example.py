"""The worked steering example of docs/steer.md on the real stories260k checkpoint: the figures the document quotes.

Measured (examples/steer_stories260k.py, torch 2.13 CPU): the selection picks layer 4, alpha 1 (KL 0.055 on dev);
on the test split he/him/his rises from 3.32 to 7.60 per 100 generated words and she/her/hers falls from 3.75 to
1.23, at KL 0.060 nats per token on unrelated text. The bounds below are looser than those figures, so a different
sampling path (another torch version) does not fail them, while an ineffective steering does.
"""

import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "steer_stories260k.py"


@pytest.fixture(scope="module")
def example(stories_dir):
    spec = importlib.util.spec_from_file_location("steer_stories260k", EXAMPLES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures(example) -> dict:
    return example.run(list(example.SECTIONS))


def test_selection_keeps_the_chosen_point_within_the_budget(figures, example) -> None:
    chosen = figures["select"]
    assert chosen["kl"] <= example.TAU
    assert chosen["settings"]["layer"] in example.LAYERS and chosen["settings"]["alpha"] in example.ALPHAS
    assert chosen["measured"] + chosen["skipped"] == len(example.LAYERS) * len(example.ALPHAS)


def test_steering_raises_the_target_word_rate_at_a_small_kl(figures) -> None:
    he, she = figures["generate"]["rates"]["he/him/his"], figures["generate"]["rates"]["she/her/hers"]
    assert he["steered"] > he["base"] + 2.0 and he["steered"] > 1.5 * he["base"]  # measured 3.32 -> 7.60
    assert she["steered"] < 0.6 * she["base"]  # measured 3.75 -> 1.23
    kl = figures["generate"]["kl"]
    assert math.isfinite(kl) and 0.0 < kl < 0.15  # measured 0.060


def test_saved_and_loaded_steering_gives_the_same_logits(figures, example) -> None:
    assert figures["save"]["max_abs_diff"] == 0.0
    assert figures["save"]["curve_points"] == figures["select"]["measured"]


def test_exported_checkpoint_generates_the_steered_text_in_plain_transformers(figures) -> None:
    export = figures["export"]
    assert export["logit_error"] <= 1e-4
    assert export["same_greedy"] == export["prompts"]


def test_word_rate_counts_whole_words_case_insensitively(example) -> None:
    assert example.word_rate(["He ran. She saw him run."], example.TARGET) == pytest.approx(100 * 2 / 6)
    assert example.word_rate(["The hen hid her hat."], example.TARGET) == 0.0  # 'hen', 'hid' are not 'he'
    assert example.word_rate([], example.TARGET) == 0.0
