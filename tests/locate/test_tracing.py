"""Causal tracing: the corruption touches only subject tokens, IE against one forward per restoration, fact_world."""

from __future__ import annotations

import pytest
import torch
from core_helpers import PrintableTokenizer

import lsi
from lsi.errors import InputError
from lsi.locate.tracing import causal_tracing, noise_setting, subject_noise, trace_effects

pytestmark = pytest.mark.integration

ATOL = 1e-5  # batched restorations vs one forward each: float round-off only
PROMPTS = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(0))
SPANS = [(1, 3), (2, 3), (0, 2)]  # real-token [start, stop) of each prompt's subject
TARGETS = [4, 9, 17]


def subject_mask(shape=(3, 6), spans=SPANS):
    cols = torch.arange(shape[1])
    return torch.stack([(cols >= a) & (cols < b) for a, b in spans])


def target_probs(logits, targets=TARGETS):
    return logits[:, -1].float().softmax(-1)[torch.arange(len(logits)), torch.tensor(targets)]


def test_noise_perturbs_only_subject_embeddings(tiny_lm):
    lm = tiny_lm("gpt2", n_layer=3)
    mask = subject_mask()
    noise = subject_noise(mask, 32, samples=2, std=0.5, seed=1)
    assert noise.shape == (6, 6, 32)
    sites = ["embed", "blocks.2.resid_post"]
    clean = lm.run_with_cache(PROMPTS.repeat(2, 1), sites)
    with noise_setting(lm, noise)():
        corrupt = lm.run_with_cache(PROMPTS.repeat(2, 1), sites)
    changed = (corrupt["embed"] - clean["embed"]).abs().amax(-1) > 0
    assert torch.equal(changed, mask.repeat(2, 1))
    assert (corrupt["embed"] - clean["embed"])[changed].std().item() == pytest.approx(0.5, rel=0.15)
    # causal attention: states before each prompt's first subject token are untouched
    before = torch.arange(6)[None] < torch.tensor([a for a, _ in SPANS]).repeat(2)[:, None]
    assert torch.equal(corrupt["blocks.2.resid_post"][before], clean["blocks.2.resid_post"][before])
    assert not torch.equal(corrupt["blocks.2.resid_post"][~before], clean["blocks.2.resid_post"][~before])


@pytest.mark.parametrize(("kind", "window"), [("mlp", 1), ("resid", 1), ("attn", 3)])
def test_indirect_effects_equal_one_forward_per_restoration(tiny_lm, kind, window):
    lm = tiny_lm("gpt2", n_layer=4)
    samples, seed = 2, 5
    effects = trace_effects(lm, PROMPTS, SPANS, TARGETS, kind=kind, window=window, noise_samples=samples,
                            seed=seed, batch_size=40)
    site = {"mlp": "mlp.out", "resid": "resid_post", "attn": "attn.out"}[kind]
    clean = lm.run_with_cache(PROMPTS, ["embed", f"blocks.*.{site}"])
    std = 3.0 * clean["embed"].std().item()
    noise = subject_noise(subject_mask(), 32, samples=samples, std=std, seed=seed).view(samples, 3, 6, 32)
    assert effects.settings["noise_std"] == pytest.approx(std)
    expected = torch.zeros(3, 4, 6)
    p_corrupt = torch.zeros(3)
    for s in range(samples):
        noised = lsi.Apply("embed", lambda x, s=s: x + noise[s])
        with lm.intervene(noised):
            base = target_probs(lm.forward(PROMPTS))
        p_corrupt += base / samples
        for layer in range(4):
            restored = range(max(0, layer - window // 2), min(4, layer + (window - 1) // 2 + 1))
            for pos in range(6):
                ops = [noised, *(lsi.Patch(f"blocks.{m}.{site}", clean, positions=pos) for m in restored)]
                with lm.intervene(*ops):
                    expected[:, layer, pos] += (target_probs(lm.forward(PROMPTS)) - base) / samples
    torch.testing.assert_close(effects.ie, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(effects.p_corrupt, p_corrupt, atol=ATOL, rtol=0)
    torch.testing.assert_close(effects.p_clean, target_probs(clean.logits), atol=ATOL, rtol=0)
    result = effects.result()
    assert result.axes == (("site", tuple(f"blocks.{i}.{site}" for i in range(4))), ("position", tuple("012345")))
    torch.testing.assert_close(result.scores, expected.mean(0), atol=ATOL, rtol=0)
    assert result.settings["te"] == pytest.approx(float((effects.p_clean - p_corrupt).mean()), abs=ATOL)


def test_restoring_the_last_layer_resid_at_the_last_token_recovers_everything(tiny_lm):
    lm = tiny_lm("llama")
    effects = trace_effects(lm, PROMPTS, subject_mask(), TARGETS, kind="resid", positions=[-1], noise_samples=3)
    torch.testing.assert_close(effects.ie[:, -1, 0], effects.te, atol=ATOL, rtol=0)


def test_subject_last_column_and_argmax(tiny_lm):
    lm = tiny_lm("gpt2", n_layer=4)
    each = trace_effects(lm, PROMPTS, SPANS, TARGETS, kind="mlp", noise_samples=2, seed=3)
    last = trace_effects(lm, PROMPTS, SPANS, TARGETS, kind="mlp", positions="subject_last", noise_samples=2, seed=3)
    at_last_subject = each.ie[torch.arange(3), :, torch.tensor([b - 1 for _, b in SPANS])]
    torch.testing.assert_close(last.ie[:, :, 0], at_last_subject, atol=ATOL, rtol=0)
    assert torch.equal(last.argmax_layer("subject_last"), at_last_subject.argmax(1))
    with pytest.raises(InputError, match="traced position"):
        each.argmax_layer("subject_last")


def test_padded_prompts_mark_missing_positions(tiny_lm):
    lm = tiny_lm("gpt2")
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    effects = trace_effects(lm, prompts, [(0, 2), (0, 1)], 4, noise_samples=2)
    assert torch.isnan(effects.ie[1, :, 3:]).all() and not torch.isnan(effects.ie[0]).any()
    assert not torch.isnan(causal_tracing(lm, prompts, [(0, 2), (0, 1)], 4, noise_samples=2).scores).any()


def test_bad_tracing_input(tiny_lm):
    lm = tiny_lm("gpt2")
    with pytest.raises(InputError, match="subject token"):
        trace_effects(lm, PROMPTS, [(1, 3), (4, 4), (0, 1)], TARGETS)
    with pytest.raises(InputError, match="subject mask"):
        trace_effects(lm, PROMPTS, torch.ones(3, 5, dtype=torch.bool), TARGETS)
    with pytest.raises(InputError, match="one target"):
        trace_effects(lm, PROMPTS, SPANS, [1, 2])
    with pytest.raises(InputError, match="kind"):
        trace_effects(lm, PROMPTS, SPANS, TARGETS, kind="heads")
    with pytest.raises(InputError, match="window"):
        trace_effects(lm, PROMPTS, SPANS, TARGETS, window=0)
    with pytest.raises(InputError, match="positions"):
        trace_effects(lm, PROMPTS, SPANS, TARGETS, positions="first")
    with pytest.raises(InputError, match="at least one input"):
        trace_effects(lm, [], [], 4)


@pytest.mark.slow
def test_fact_world_tracing_finds_the_planted_layer_per_fact():
    from lsi.organisms.fact_world_data import encode_prompts, templates_for
    from lsi.organisms.registry import ground_truth, load_organism

    lm, truth = load_organism("fact_world"), ground_truth("fact_world")
    facts = truth["facts"]
    ids, _, subject_pos, objects = encode_prompts(lm.tokenizer, facts, "train")
    row_fact = torch.tensor([i for i, fact in enumerate(facts) for _ in templates_for(fact["relation"], "train")])
    spans = [(int(p) - len(facts[i]["subject"].split()) + 1, int(p) + 1)
             for p, i in zip(subject_pos, row_fact.tolist(), strict=True)]
    batch = lsi.Batch(ids, (ids != lm.tokenizer.pad_token_id).long())
    effects = trace_effects(lm, batch, spans, objects, kind="mlp", positions="subject_last", noise_samples=3)
    per_fact = torch.zeros(len(facts), lm.dims.n_layers).index_add_(0, row_fact, effects.ie[:, :, 0])
    fraction = (per_fact.argmax(1) == truth["layer"]).float().mean().item()
    assert fraction >= 0.9, f"argmax MLP layer = planted layer {truth['layer']} for {fraction:.3f} of facts"


def test_subject_and_target_as_text(tiny_lm):
    """A subject string is found in each prompt's tokens: the same effects as its token spans."""
    tokenizer = PrintableTokenizer()
    lm = lsi.LanguageModel(tiny_lm("gpt2", n_layer=2).model, tokenizer)
    prompts = ["xParis is in", "in Paris it"]
    target = tokenizer("e")["input_ids"][0]
    by_text = trace_effects(lm, prompts, "Paris", "e", noise_samples=2)
    by_span = trace_effects(lm, prompts, [(1, 6), (3, 8)], target, noise_samples=2)
    torch.testing.assert_close(by_text.ie, by_span.ie, equal_nan=True, atol=0, rtol=0)
    per_prompt = trace_effects(lm, prompts, ["xP", "it"], ["e", "e"], noise_samples=2)
    torch.testing.assert_close(per_prompt.ie, trace_effects(lm, prompts, [(0, 2), (9, 11)], target,
                                                            noise_samples=2).ie, equal_nan=True, atol=0, rtol=0)
    with pytest.raises(InputError, match="prompt 1") as info:
        trace_effects(lm, prompts, "xP", target)
    assert "not in" in info.value.found
    with pytest.raises(InputError, match="once"):
        trace_effects(lm, ["in in"], "in", target)
    with pytest.raises(InputError, match="one token"):
        trace_effects(lm, prompts, "Paris", "ee")
