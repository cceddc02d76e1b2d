"""Task vectors and merging: TIES equals a brute-force loop (global trimming per task vector, sign election,
disjoint mean, restriction to a mask); one task vector reproduces the fine-tuned model through apply and fold;
mismatched models are refused; a TIES merge of two fine-tuned tasks does both."""

from __future__ import annotations

import math

import pytest
import torch

from lsi.core.model_copy import copy_model
from lsi.core.weight_edit import WeightEdit
from lsi.errors import InputError, ModelMismatchError
from lsi.steer.export import fold
from lsi.steer.finetune import masked_finetune, parameter_mask
from lsi.steer.merging import combine, task_vector, ties_merge

IDS = torch.randint(3, 97, (3, 12), generator=torch.Generator().manual_seed(0))
SMALL = {"transformer.h.0.mlp.c_fc.bias": 48, "transformer.h.1.attn.c_proj.bias": 32, "transformer.ln_f.weight": 32}


def _random_vectors(lm, seed: int = 0) -> list[WeightEdit]:
    """Three task vectors on small parameters: the last lacks one parameter, and entry 0 of the first parameter
    cancels exactly between the first two (a zero sum: the majority sign is elected)."""
    gen = torch.Generator().manual_seed(seed)
    vectors = [{n: torch.randn(size, generator=gen) for n, size in SMALL.items()} for _ in range(3)]
    first = "transformer.h.0.mlp.c_fc.bias"
    vectors[1][first][0] = -vectors[0][first][0]
    vectors[0][first][0] = vectors[1][first][0] = 9.0 * torch.sign(vectors[0][first][0])  # kept by every trim
    vectors[1][first][0] *= -1
    vectors[2][first][0] = 0.0
    del vectors[2]["transformer.ln_f.weight"]
    return [WeightEdit.of(lm, v) for v in vectors]


def _brute_ties(vectors: list[dict[str, torch.Tensor]], universe: list[tuple[str, int]], density: float,
                lam: float) -> dict[tuple[str, int], float]:
    """TIES by loops over entries: trim each vector to its ceil(density * n) largest |entries| over the whole
    universe, elect the sign of the sum (zero -> the majority of elected signs), mean of the agreeing entries."""
    values = [[float(v[n][i]) if n in v else 0.0 for n, i in universe] for v in vectors]
    keep = math.ceil(density * len(universe))
    trimmed = []
    for row in values:
        order = sorted(range(len(row)), key=lambda j: -abs(row[j]))[:keep]
        trimmed.append([row[j] if j in order else 0.0 for j in range(len(row))])
    sums = [sum(row[j] for row in trimmed) for j in range(len(universe))]
    signs = [(s > 0) - (s < 0) for s in sums]
    majority = (sum(signs) > 0) - (sum(signs) < 0)
    signs = [s if s else majority for s in signs]
    merged = {}
    for j, entry in enumerate(universe):
        agree = [row[j] for row in trimmed if row[j] != 0 and (row[j] > 0) - (row[j] < 0) == signs[j]]
        merged[entry] = lam * sum(agree) / len(agree) if agree else 0.0
    return merged


@pytest.mark.unit
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
def test_ties_merge_equals_a_brute_force_loop(tiny_lm, density):
    lm = tiny_lm("gpt2")
    vectors = _random_vectors(lm)
    merged = ties_merge(lm, vectors, density=density, lam=0.7)
    universe = [(n, i) for n, size in SMALL.items() for i in range(size)]
    expected = _brute_ties([dict(v.deltas) for v in vectors], universe, density, 0.7)
    assert set(merged.deltas) == set(SMALL) and merged.label == "ties_merge"
    got = torch.tensor([float(merged.deltas[n][i]) for n, i in universe])
    torch.testing.assert_close(got, torch.tensor([expected[e] for e in universe]), atol=1e-6, rtol=1e-6)
    assert abs(float(merged.deltas["transformer.h.0.mlp.c_fc.bias"][0])) == pytest.approx(0.7 * 9.0)


@pytest.mark.unit
def test_restricted_merge_covers_only_the_mask(tiny_lm):
    lm = tiny_lm("gpt2")
    vectors = _random_vectors(lm, seed=1)
    mask = parameter_mask(lm, ["blocks.0.mlp.post[3]", "blocks.0.mlp.post[5]", "transformer.h.1.attn.c_proj.bias[7]"])
    merged = ties_merge(lm, vectors, density=0.5, mask=mask)
    universe = [(n, i) for n, size in SMALL.items() for i in range(size)
                if n in mask.masks and bool(mask.masks[n][i])]
    assert len(universe) == 3  # c_fc bias entries 3 and 5, c_proj bias entry 7
    expected = _brute_ties([dict(v.deltas) for v in vectors], universe, 0.5, 1.0)
    for name, delta in merged.deltas.items():
        assert not delta[~mask.masks[name]].any()
    for (name, i), value in expected.items():
        assert float(merged.deltas[name][i]) == pytest.approx(value, abs=1e-6)
    assert merged.moved() == sum(1 for v in expected.values() if v != 0) > 0


@pytest.mark.unit
def test_one_task_vector_reproduces_the_finetuned_model(fresh_lm):
    base = fresh_lm("gpt2")
    tuned = copy_model(base)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in tuned.model.named_parameters():
            if ".h.1." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tau = task_vector(base, tuned.model)  # an HF model works as well as a LanguageModel
    assert all(".h.1." in n for n in tau.deltas) and tau.label == "task_vector"
    edit = combine(base, [tau], weights=[1.0])
    target = tuned.forward(IDS)
    assert float((base.forward(IDS) - target).abs().max()) > 1e-2
    with edit.apply(base):
        torch.testing.assert_close(base.forward(IDS), target, atol=0, rtol=0)  # bit-exact
    torch.testing.assert_close(fold(base, edit).forward(IDS), target, atol=0, rtol=0)
    assert task_vector(base, base).deltas == {}  # nothing differs
    halves = combine(base, [tau, tau], weights=[0.25, 0.25])
    for name, delta in halves.deltas.items():
        torch.testing.assert_close(delta, 0.5 * tau.deltas[name])


@pytest.mark.unit
def test_mismatched_models_and_vectors_are_refused(tiny_lm, fresh_lm):
    lm = tiny_lm("gpt2")
    with pytest.raises(ModelMismatchError, match="parameter names"):
        task_vector(lm, tiny_lm("llama"))
    with pytest.raises(ModelMismatchError, match="shape"):
        task_vector(lm, tiny_lm("gpt2", n_inner=64))
    tau = WeightEdit.of(lm, {"transformer.h.0.mlp.c_fc.weight": torch.ones(32, 48)})
    with pytest.raises(ModelMismatchError):  # computed on other weights
        combine(fresh_lm("gpt2", seed=1), [tau])
    with pytest.raises(InputError, match="one weight per task vector"):
        combine(lm, [tau], weights=[1.0, 2.0])
    with pytest.raises(InputError, match="density"):
        ties_merge(lm, [tau], density=0.0)
    with pytest.raises(InputError, match="WeightEdit"):
        ties_merge(lm, [parameter_mask(lm, "blocks.0")])  # type: ignore[list-item]


def _logp(lm, prompt: list[int], token: int) -> float:
    return float(lm.forward([prompt])[0, -1].log_softmax(-1)[token])


@pytest.mark.integration
def test_ties_merge_of_two_finetuned_tasks_does_both(fresh_lm):
    lm = fresh_lm("llama")
    tasks = [([5, 6], 7), ([8, 9], 10)]

    def loss(prompt: list[int], token: int):
        return lambda m: -m.logits_with_grad([prompt])[0, -1].float().log_softmax(-1)[token]

    vectors = [masked_finetune(lm, loss(p, t), None, steps=10, lr=0.02).edit for p, t in tasks]
    merged = ties_merge(lm, vectors, density=0.2)
    base = [_logp(lm, p, t) for p, t in tasks]
    with merged.apply(lm):
        after = [_logp(lm, p, t) for p, t in tasks]
    assert all(a > b + 1.0 for a, b in zip(after, base, strict=True)), (base, after)
    assert merged.moved() <= 0.4 * sum(p.numel() for p in lm.model.parameters())  # at most 2 x 20 % kept
