"""Interventions that break the numbers raise instead of returning NaN or collapsed logits; so do NaN metrics."""

from __future__ import annotations

import pytest
import torch
from badinput_checks import refuse
from core_helpers import IDS

import lsi
from lsi.errors import NonFiniteMetricError, NonFiniteSteeringError
from lsi.locate.gradients import attribution_patching
from lsi.locate.patching import activation_patching

pytestmark = pytest.mark.unit
D = 32  # d_model of the tiny models


def _nan(x: torch.Tensor) -> torch.Tensor:
    return x * float("nan")


def _inf_logits(x: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(torch.ones_like(x, dtype=torch.bool), float("inf"))


BREAKING = {
    "add-1e19": (lambda: lsi.Add("blocks.0.resid_pre", torch.ones(D), 1e19), "Add\\(blocks.0.resid_pre"),
    "add-1e30-last": (lambda: lsi.Add("blocks.1.resid_post", torch.ones(D), 1e30, positions="last"),
                      "collapse"),
    "add-every-layer": (lambda: lsi.Add("blocks.*.resid_pre", torch.ones(D), 1e19), "blocks.\\*.resid_pre"),
    "scale-1e30": (lambda: lsi.Scale("blocks.0.mlp.out", 1e30), "Scale\\(blocks.0.mlp.out"),
    "scale-head": (lambda: lsi.Scale("blocks.0.attn.head_out[1]", 1e36), "head_out\\[1\\]"),
    "set-huge": (lambda: lsi.Set("blocks.1.resid_pre", torch.full((D,), 3e19)), "Set\\(blocks.1.resid_pre"),
    "apply-nan": (lambda: lsi.Apply("blocks.0.mlp.out", _nan), "NaN/inf at"),
    "apply-inf-logits": (lambda: lsi.Apply("logits", _inf_logits), "NaN/inf logits"),
    "composition": (lambda: lsi.compose(lsi.Zero("blocks.0.attn.out"), lsi.Add("embed", torch.ones(D), 1e20)),
                    "Zero\\(blocks.0.attn.out.*Add\\(embed"),
}


@pytest.mark.parametrize("name", list(BREAKING))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_under_a_breaking_intervention(fresh_lm, name, family):
    lm = fresh_lm(family)
    build, phrase = BREAKING[name]
    with refuse(NonFiniteSteeringError, model=lm.model, match=phrase), lm.intervene(build()):
        lm.forward(IDS)


@pytest.mark.parametrize("call", ["generate", "generate_text", "run_with_cache", "padded-forward"])
def test_every_path_under_a_huge_addition(fresh_lm, call):
    from core_helpers import PrintableTokenizer

    lm = fresh_lm("llama", tokenizer=PrintableTokenizer())
    run = {"generate": lambda: lm.generate(IDS, max_new_tokens=3),
           "generate_text": lambda: lm.generate_text("abc", max_new_tokens=3),
           "run_with_cache": lambda: lm.run_with_cache(IDS, "blocks.1.resid_post"),
           "padded-forward": lambda: lm.forward([[5, 6, 7], [8]])}[call]
    with refuse(NonFiniteSteeringError, model=lm.model, match="alpha=1e\\+19"), lm.intervene(
            lsi.Add("blocks.0.resid_pre", torch.ones(D), 1e19, scope="generated" if call == "generate" else "all")):
        run()


def test_a_weight_edit_that_overflows(fresh_lm):
    lm = fresh_lm("llama")
    name = "model.embed_tokens.weight"
    edit = lsi.WeightEdit.of(lm, {name: torch.full_like(dict(lm.model.named_parameters())[name], 1e20)})
    with refuse(NonFiniteSteeringError, model=lm.model, match="WeightEdit"), lm.intervene(edit):
        lm.forward(IDS)


@pytest.mark.parametrize("build", [
    lambda: lsi.Zero("ln_final"),  # all-zero logits on purpose: a real ablation, not an overflow
    lambda: lsi.Zero("blocks.1.resid_post"),
    lambda: lsi.Add("blocks.0.resid_pre", torch.ones(D), 1e17),  # large, but the norms still work
    lambda: lsi.Scale("blocks.0.mlp.out", 0.0),
], ids=["zero-ln-final", "zero-last-resid", "add-1e17", "scale-0"])
def test_strong_but_sound_interventions_pass(tiny_lm, build):
    lm = tiny_lm("llama")
    with lm.intervene(build()):
        logits = lm.forward(IDS)
    assert torch.isfinite(logits).all()


def nan_metric(logits: torch.Tensor, batch: lsi.Batch) -> torch.Tensor:
    return logits[:, -1, 5].mean() * float("nan")


def log_zero(logits: torch.Tensor, batch: lsi.Batch) -> torch.Tensor:
    return torch.log(logits[:, -1, 5].mean() * 0.0)


@pytest.mark.parametrize("metric", [nan_metric, log_zero], ids=["nan", "log-zero"])
@pytest.mark.parametrize("method", ["run_with_grads", "activation_patching", "attribution_patching"])
def test_a_metric_that_returns_nan(tiny_lm, metric, method):
    lm = tiny_lm("llama")
    clean, corrupt = [[5, 6, 7, 8]], [[5, 9, 7, 8]]
    run = {"run_with_grads": lambda: lm.run_with_grads(clean, metric, "blocks.0.resid_post"),
           "activation_patching": lambda: activation_patching(lm, clean, corrupt, metric, "blocks.*.resid_post"),
           "attribution_patching": lambda: attribution_patching(lm, clean, corrupt, metric, "blocks.*.resid_post")}
    with refuse(NonFiniteMetricError, model=lm.model, match=metric.__name__):
        run[method]()
