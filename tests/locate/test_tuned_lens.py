"""The tuned lens: identity = logit lens, trained lens beats the logit lens on held-out text, save/load guards."""

import pytest
import torch

from lsi.errors import InputError
from lsi.locate.tuned_lens import TunedLens, lens_kl
from lsi.locate.vocab import logit_lens

IDS = [[3, 14, 15, 9, 26, 5], [7, 8, 9]]
PROMPTS = ["Once upon a time", "One day, a little", "Tom and Lily", "The cat", "There was a big", "Mom said",
           "The sun was", "A little bird"]


@pytest.mark.unit
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_identity_lens_reads_like_the_logit_lens_and_its_last_row_is_the_model(tiny_lm, family):
    lm = tiny_lm(family)
    lens = TunedLens.identity(lm)
    tuned, plain = lens.logits(lm, IDS, positions=0), logit_lens(lm, IDS, positions=0)
    assert tuned.labels == plain.labels
    torch.testing.assert_close(tuned.logits, plain.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(lens.logits(lm, [IDS[0]], positions="all").logits[-1], lm.forward([IDS[0]]),
                               atol=1e-5, rtol=1e-5)
    kl = lens_kl(lm, IDS, lens)
    assert kl.axes[0] == ("lens", ("logit", "tuned"))
    torch.testing.assert_close(kl.scores[0], kl.scores[1], atol=1e-6, rtol=0)
    assert float(kl.scores[:, -1].abs().max()) == 0.0 and bool((kl.scores[:, :-1] > 0).all())


@pytest.mark.unit
def test_training_is_deterministic_and_leaves_the_model_alone(fresh_lm):
    lm = fresh_lm("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    a = TunedLens.train(lm, IDS, steps=4, seed=3)
    b = TunedLens.train(lm, IDS, steps=4, seed=3)
    torch.testing.assert_close(a.weight, b.weight, atol=0, rtol=0)
    assert not torch.equal(a.weight[0], torch.eye(lm.dims.d_model))
    torch.testing.assert_close(a.weight[-1], torch.eye(lm.dims.d_model), atol=0, rtol=0)  # the model's own row
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    assert all(p.grad is None for p in lm.model.parameters())
    with pytest.raises(InputError, match="steps"):
        TunedLens.train(lm, IDS, steps=0)


@pytest.mark.unit
def test_save_load_round_trip_and_refusal_for_another_model(tiny_lm, tmp_path):
    lm, other = tiny_lm("llama"), tiny_lm("llama", seed=1)
    lens = TunedLens.train(lm, IDS, steps=3)
    lens.save(tmp_path / "lens")
    loaded = TunedLens.load(tmp_path / "lens.json", lm)
    torch.testing.assert_close(loaded.logits(lm, IDS).logits, lens.logits(lm, IDS).logits, atol=0, rtol=0)
    assert loaded.settings["steps"] == 3
    with pytest.raises(InputError, match="fingerprint"):
        TunedLens.load(tmp_path / "lens", other)
    with pytest.raises(InputError, match="fingerprint"):
        lens_kl(other, IDS, lens)
    with pytest.raises(InputError, match="missing"):
        TunedLens.load(tmp_path / "nothing", lm)


def _samples(lm, seed: int, per_prompt: int) -> list[list[int]]:
    """The model's own stories (sampled), padding removed."""
    torch.manual_seed(seed)
    ids = lm.generate([p for p in PROMPTS for _ in range(per_prompt)], max_new_tokens=64, do_sample=True)
    return [[t for t in row.tolist() if t != lm.pad_id] for row in ids]


@pytest.mark.acceptance
@pytest.mark.slow
def test_tuned_lens_beats_the_logit_lens_on_held_out_stories(stories_lm):
    lm = stories_lm
    lens = TunedLens.train(lm, _samples(lm, 0, 4), steps=60, lr=1e-2, batch_tokens=512)
    kl = lens_kl(lm, _samples(lm, 1, 2), lens)
    logit, tuned = kl.scores
    assert bool((tuned[:-1] < logit[:-1]).all()), kl.scores
    assert float(tuned[0]) < 0.25 * float(logit[0])  # the embedding row gains most
    assert float(logit[-1]) == float(tuned[-1]) == 0.0
