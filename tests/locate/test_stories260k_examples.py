"""The worked examples of docs/locate.md on the real stories260k checkpoint: the figures the document quotes."""

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "locate_stories260k.py"


@pytest.fixture(scope="module")
def figures(stories_dir) -> dict:
    spec = importlib.util.spec_from_file_location("locate_stories260k", EXAMPLES)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.run(list(module.SECTIONS))


def test_lens_and_direct_logit_attribution(figures) -> None:
    lens = figures["lens"]
    assert lens["dla_total"] == pytest.approx(lens["logit_diff"], abs=1e-3)
    assert lens["logit_diff"] == pytest.approx(6.317, abs=1e-2)
    assert all(t <= g + 1e-6 for t, g in zip(lens["tuned_kl"], lens["logit_kl"], strict=True))


def test_patching_moves_the_name_from_its_token_to_the_last_position(figures) -> None:
    patching = figures["patching"]
    assert patching["name_layer0"] > 0.5 and patching["last_layer4"] > 0.5
    assert patching["top_head"] == "blocks.2.attn.head_out[6]"


def test_attribution_patching_agrees_with_exact_patching(figures) -> None:
    assert figures["gradients"]["spearman"] > 0.8
    assert figures["gradients"]["ig_completeness"] < 1e-2


def test_magnitude_probing_and_circuits(figures) -> None:
    bi = figures["magnitude"]["block_influence"]
    assert len(bi) == 5 and max(bi) == bi[0]
    assert figures["probing"]["accuracy"]["blocks.4.resid_post"] > 0.9
    assert figures["circuits"]["faithfulness"][100] > 0.9
    assert figures["circuits"]["top_node"] == "blocks.2.attn.head_out[6]"
