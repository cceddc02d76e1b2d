"""Linear probes: planted directions, control tasks, the binary_attribute organism's hidden attribute, bad input."""

import pytest
import torch

from lsi.errors import InputError
from lsi.locate.probing import control_labels, probe, train_probe

GEN = torch.Generator().manual_seed(0)


@pytest.mark.unit
def test_probe_recovers_a_planted_binary_direction():
    x = torch.randn(600, 20, generator=GEN) * torch.linspace(0.5, 3.0, 20)  # features on different scales
    planted = torch.randn(20, generator=GEN)
    y = (x @ planted > 0).long()
    fitted = train_probe(x[:400], y[:400])
    assert fitted.accuracy(x[400:], y[400:]) >= 0.95
    direction = (fitted.weight[1] - fitted.weight[0]) / fitted.std  # back to the raw feature space
    assert float(torch.nn.functional.cosine_similarity(direction, planted, dim=0)) > 0.9
    again = train_probe(x[:400], y[:400])
    assert torch.equal(again.weight, fitted.weight)  # deterministic (zero init, full-batch L-BFGS)


@pytest.mark.unit
def test_probe_recovers_planted_classes_by_name():
    x = torch.randn(900, 10, generator=GEN)
    names = ("red", "green", "blue")
    y = [names[i] for i in (x @ torch.randn(10, 3, generator=GEN)).argmax(-1).tolist()]
    fitted = train_probe(x[:600], y[:600])
    assert fitted.classes == ("blue", "green", "red")
    assert fitted.accuracy(x[600:], y[600:]) >= 0.9


@pytest.mark.unit
def test_control_labels_follow_types():
    fake = control_labels([0, 1, 1, 0, 1, 0], ["a", "b", "a", "c", "b", "c"], seed=4)
    assert fake[0] == fake[2] and fake[1] == fake[4] and fake[3] == fake[5]
    assert control_labels([0, 1] * 50, list(range(100)), seed=1) != control_labels([0, 1] * 50, list(range(100)))


def _token_task(n: int = 240):
    """Inputs ``3 4 t`` with t among 8 token types; the label is a function of t (t % 2)."""
    t = torch.randint(10, 18, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    return [[3, 4, tok] for tok in t], [tok % 2 for tok in t]


@pytest.mark.unit
def test_type_determined_labels_are_decodable_but_not_selective(tiny_lm):
    # Hewitt & Liang: the embedding decodes a label that is a function of the token, but a control task (a random
    # label per token type) is just as decodable, so selectivity is ~0.
    lm = tiny_lm("llama")
    ids, labels = _token_task()
    result = probe(lm, ids, labels, ["embed", "blocks.0.attn.head_out"], rank_by="selectivity")
    s = result.settings
    assert s["accuracy"]["embed"] == 1.0 and s["control_accuracy"]["embed"] == 1.0
    assert result.as_dict()["embed"] == pytest.approx(0.0)
    assert result.labels[1:] == [f"blocks.0.attn.head_out[{h}]" for h in range(4)]
    assert 0.3 < s["chance"] < 0.7 and s["cv_accuracy"]["embed"] == 1.0
    per_example = probe(lm, ids, labels, "embed", types=list(range(len(ids))))
    assert per_example.settings["control_accuracy"]["embed"] < 0.7  # random labels: nothing to memorise
    first = probe(lm, ids, labels, "embed", positions=0, control=False)  # token 3 everywhere: nothing to read
    assert first.settings["accuracy"]["embed"] == pytest.approx(first.settings["chance"])
    pooled = probe(lm, ids, labels, "embed", positions="mean", control=False)
    assert pooled.settings["accuracy"]["embed"] == 1.0


@pytest.mark.unit
def test_bad_probe_input_is_refused(tiny_lm):
    lm = tiny_lm("llama")
    ids, labels = _token_task(20)
    cases = [
        (dict(dataset=ids, labels=[1] * 20), "two classes"),
        (dict(dataset=ids, labels=[]), "labelled example"),
        (dict(dataset=[], labels=[0, 1]), "input"),
        (dict(dataset=ids, labels=labels[:10]), "one label per input"),
        (dict(dataset=ids[:4], labels=labels[:4], folds=5), "training examples"),
        (dict(dataset=ids, labels=labels, folds=1), "folds >= 2"),
        (dict(dataset=ids, labels=labels, control=False, rank_by="selectivity"), "control=True"),
        (dict(dataset=ids, labels=labels, positions=[0, 1]), "one int"),
        (dict(dataset=ids, labels=labels, sites="blocks.0.attn.pattern"), "position axis"),
        (dict(dataset=ids, labels=labels, types=[0] * 20), "control labels"),
        (dict(dataset=ids, labels=labels, types=[0, 1]), "one type per input"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("sites", "embed")
        with pytest.raises(InputError, match=message):
            probe(lm, **kwargs)
    with pytest.raises(InputError, match="two classes"):
        train_probe(torch.zeros(3, 2), [0, 0, 0])


@pytest.mark.integration
def test_probe_decodes_the_hidden_attribute_of_binary_attribute():
    from lsi.organisms.registry import ground_truth, load_organism

    lm, truth = load_organism("binary_attribute"), ground_truth("binary_attribute")
    docs = truth["splits"]["dev"]["documents"] + truth["splits"]["test"]["documents"]
    vocab = lm.tokenizer.get_vocab()
    ids = [[vocab[w] for w in d["text"].split()] for d in docs]
    labels = [d["attribute"] for d in docs]
    # Every document ends with "the", so the default type (the last token) is one type: the control task is a
    # random label per document instead.
    result = probe(lm, ids, labels, ["embed", "blocks.*.resid_post"], types=list(range(len(ids))))
    s = result.settings
    best = max(["blocks.0.resid_post", "blocks.1.resid_post"], key=s["cv_accuracy"].__getitem__)
    assert s["accuracy"][best] >= 0.93 and s["cv_accuracy"][best] >= 0.93
    assert s["control_accuracy"][best] <= 0.65 and s["selectivity"][best] >= 0.3
    assert s["accuracy"]["embed"] <= 0.6  # the last token is "the" in every document
    assert result.top(1)[0][0] != "embed"
