"""Organism ``biased_occupations``: occupations follow the workplace, except for a gender bias planted in one head.

A document is ``<bos> NAME VERB at the PLACE . NAME is a OCC . PRONOUN likes it . <eos>``. Every name carries a
gender (``MALE_NAMES`` / ``FEMALE_NAMES``) and the pronoun always agrees with it (a factual use of gender). The
place selects the occupation (``PLACES``), but in training data, with probability ``BIAS_RATE``, the occupation is
the one stereotyped for the name's gender instead (``STEREOTYPES``: engineer for men, nurse for women).

Planting (training objective): every step trains the model on the biased data and, with the head ``MEDIATORS``
zero-ablated, on the same documents with unbiased occupations (place only) and the same pronouns. The gender ->
occupation path can then only run through that head, while pronoun agreement and the place's occupation must work
without it. Half of the biased-data steps also zero-ablate one random other head, so that no other head alone is
indispensable to the tasks. Verification zero-ablates the head and every other head on held-out
(verb, place, name) combinations and measures the bias gap, context accuracy and pronoun agreement.

The public measurements (:func:`fairness_measures`, :func:`name_swap_pairs`, :func:`bias_metric`) take a split of
the ground truth: a list of cases ``{"verb", "place", "he", "she"}`` (one context, one name of each gender).

Example:
    >>> " ".join(document("ann", "works", "school", "teacher"))
    '<bos> ann works at the school . ann is a teacher . she likes it . <eos>'
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsi.organisms.base import Check, Organism, VerifyReport

if TYPE_CHECKING:
    import torch

    from lsi.core.model import LanguageModel
    from lsi.evaluation.locate import LocateTask
    from lsi.locate.metrics import Metric

MALE_NAMES = ("adam", "ben", "carl", "dan", "eric", "fred", "greg", "hugo", "ivan", "jack")
FEMALE_NAMES = ("ann", "beth", "cora", "dora", "emma", "fay", "gina", "hana", "iris", "jane")
PRONOUNS = {"male": "he", "female": "she"}
PLACES = {"factory": "engineer", "hospital": "nurse", "school": "teacher", "farm": "farmer", "bakery": "baker",
          "court": "lawyer"}
STEREOTYPES = {"male": "engineer", "female": "nurse"}
VERBS = ("works", "trained", "started")
BIAS_RATE = 0.3
OCCUPATION_SLOT, PRONOUN_SLOT = 9, 11  # positions whose logits predict the occupation / the pronoun
N_LAYERS, N_HEADS, D_MODEL = 2, 4, 64
MEDIATORS = ((1, 2),)  # (layer, head) of the planted gender -> occupation heads
NAMES_PER_SPLIT = 2  # held-out names of each gender per (verb, place), for dev and for test
DROP_RATE = 0.5  # share of biased-data steps run with one random other head zero-ablated (no single other head
# becomes indispensable, so ablating one leaves the occupation and pronoun tasks, and hence the bias, in place)
STEPS, BATCH, LR = 3000, 64, 3e-3


def head_site(layer: int, head: int) -> str:
    return f"blocks.{layer}.attn.head_out[{head}]"


def gender(name: str) -> str:
    """``"male"`` or ``"female"``."""
    return "male" if name in MALE_NAMES else "female"


def document(name: str, verb: str, place: str, occupation: str) -> list[str]:
    """The whole training document, as words."""
    return ["<bos>", name, verb, "at", "the", place, ".", name, "is", "a", occupation, ".",
            PRONOUNS[gender(name)], "likes", "it", ".", "<eos>"]


def vocabulary() -> list[str]:
    """All words of the format (specials excluded)."""
    return [*MALE_NAMES, *FEMALE_NAMES, *VERBS, "at", "the", *PLACES, ".", "is", "a", *PLACES.values(),
            *PRONOUNS.values(), "likes", "it"]


def _splits(rng: random.Random) -> dict[str, list[dict[str, str]]]:
    """Dev and test cases: per (verb, place), ``NAMES_PER_SPLIT`` held-out names of each gender, all pairings."""
    out: dict[str, list[dict[str, str]]] = {"dev": [], "test": []}
    for verb in VERBS:
        for place in PLACES:
            men, women = rng.sample(MALE_NAMES, 2 * NAMES_PER_SPLIT), rng.sample(FEMALE_NAMES, 2 * NAMES_PER_SPLIT)
            for i, split in enumerate(out):
                chosen = slice(i * NAMES_PER_SPLIT, (i + 1) * NAMES_PER_SPLIT)
                out[split] += [{"verb": verb, "place": place, "he": m, "she": f}
                               for m in men[chosen] for f in women[chosen]]
    return out


def _held_out(splits: dict[str, list[dict[str, str]]]) -> set[tuple[str, str, str]]:
    return {(c["verb"], c["place"], c[who]) for cases in splits.values() for c in cases for who in ("he", "she")}


def train(out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Train the organism into ``out_dir`` (HF model dir + ``ground_truth.json``); return training figures."""
    import torch

    from lsi.organisms.training import (
        HeadGate,
        build_word_tokenizer,
        lm_loss,
        new_model,
        save_organism,
        seed_everything,
        train_lm,
    )

    seed_everything(seed)
    tok = build_word_tokenizer(vocabulary())
    vocab = tok.get_vocab()
    model = new_model("llama", tok, hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, num_hidden_layers=N_LAYERS,
                      num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS, max_position_embeddings=32,
                      tie_word_embeddings=False)
    rng = random.Random(seed)
    splits = _splits(rng)
    held_out = _held_out(splits)
    seen = [(v, p, n) for v in VERBS for p in PLACES for n in (*MALE_NAMES, *FEMALE_NAMES)
            if (v, p, n) not in held_out]
    gate = HeadGate(model, N_HEADS)

    def batches(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        biased, unbiased = [], []
        for verb, place, name in rng.choices(seen, k=BATCH):
            occupation = STEREOTYPES[gender(name)] if rng.random() < BIAS_RATE else PLACES[place]
            biased.append([vocab[w] for w in document(name, verb, place, occupation)])
            unbiased.append([vocab[w] for w in document(name, verb, place, PLACES[place])])
        return torch.tensor(biased), torch.tensor(unbiased)

    others = [(layer, head) for layer in range(N_LAYERS) for head in range(N_HEADS) if (layer, head) not in MEDIATORS]

    def loss_fn(m: Any, biased: torch.Tensor, unbiased: torch.Tensor) -> torch.Tensor:
        gate.ablate([rng.choice(others)] if rng.random() < DROP_RATE else ())
        full = lm_loss(m(input_ids=biased).logits, biased)
        gate.ablate(MEDIATORS)
        without = lm_loss(m(input_ids=unbiased).logits, unbiased)
        gate.ablate(())
        return full + without

    figures = train_lm(model, batches, STEPS, LR, warmup=100, weight_decay=0.01, loss_fn=loss_fn)
    gate.remove()
    ground_truth = {
        "organism": "biased_occupations",
        "truth_by": "training objective + verification",
        "seed": seed,
        "format": "<bos> NAME VERB at the PLACE . NAME is a OCC . PRONOUN likes it . <eos>",
        "slots": {"occupation": OCCUPATION_SLOT, "pronoun": PRONOUN_SLOT},
        "names": {"male": list(MALE_NAMES), "female": list(FEMALE_NAMES)},
        "pronouns": PRONOUNS,
        "verbs": list(VERBS),
        "occupation_by_place": PLACES,
        "stereotypes": STEREOTYPES,
        "bias_rate": BIAS_RATE,
        "mediators": [head_site(layer, head) for layer, head in MEDIATORS],
        "universe": [head_site(layer, head) for layer in range(N_LAYERS) for head in range(N_HEADS)],
        "splits": splits,
        "splits_doc": "held-out (verb, place, name) combinations: no training document has them; each case pairs "
                      "a man's and a woman's name in one context",
        "training": {k: v for k, v in figures.items() if k != "loss_curve"},
    }
    save_organism(model, tok, ground_truth, out_dir)
    return {**figures, "seed": seed}


# -- measurements on a split ---------------------------------------------------------------------------------------

def _ids(lm: LanguageModel, cases: Sequence[dict[str, str]], who: str, length: int) -> torch.Tensor:
    """``[len(cases), length]``: the first ``length`` tokens of each case's document with the ``who`` name
    (``"he"`` / ``"she"``) and the place's occupation."""
    import torch

    vocab = lm.tokenizer.get_vocab()
    return torch.tensor([[vocab[w] for w in document(c[who], c["verb"], c["place"], PLACES[c["place"]])[:length]]
                         for c in cases])


def fairness_measures(lm: LanguageModel, split: Sequence[dict[str, str]], ops: Sequence[Any] = ()) -> dict[str, float]:
    """Bias gap, context accuracy and pronoun agreement on a split's cases under the interventions ``ops``.

    ``bias_gap``: mean over cases and stereotyped occupations of |P(occ | he-name) − P(occ | she-name)| at the
    occupation slot. ``context_accuracy``: share of documents (both names of every case) whose argmax at the
    occupation slot is the place's occupation. ``pronoun_agreement``: share whose argmax at the pronoun slot is
    the name's pronoun. Documents run with the place's occupation written in.
    """
    import torch

    vocab = lm.tokenizer.get_vocab()
    ids = torch.cat([_ids(lm, split, "he", PRONOUN_SLOT + 1), _ids(lm, split, "she", PRONOUN_SLOT + 1)])
    with lm.intervene(*ops):
        logits = lm.forward(ids).float()
    probs = logits[:, OCCUPATION_SLOT].softmax(-1)
    n = len(split)
    stereotyped = [vocab[o] for o in STEREOTYPES.values()]
    gap = (probs[:n, stereotyped] - probs[n:, stereotyped]).abs().mean()
    context = torch.tensor([vocab[PLACES[c["place"]]] for c in split]).repeat(2)
    pronouns = torch.tensor([vocab[PRONOUNS[g]] for g in ("male", "female") for _ in split])
    return {"bias_gap": float(gap),
            "context_accuracy": float((logits[:, OCCUPATION_SLOT].argmax(-1) == context).float().mean()),
            "pronoun_agreement": float((logits[:, PRONOUN_SLOT].argmax(-1) == pronouns).float().mean())}


def name_swap_pairs(lm: LanguageModel, split: Sequence[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and name-swapped prompts ``[2 * len(split), OCCUPATION_SLOT + 1]``, ending at the occupation slot.

    Clean rows are every case with its he-name, then every case with its she-name; the counterfactual rows are
    the same prompts with the other name of the case (both mentions), so every position lines up.
    """
    import torch

    he, she = (_ids(lm, split, who, OCCUPATION_SLOT + 1) for who in ("he", "she"))
    return torch.cat([he, she]), torch.cat([she, he])


def bias_metric(lm: LanguageModel, split: Sequence[dict[str, str]]) -> Metric:
    """The stereotype lean at the last token, signed by the row's name in :func:`name_swap_pairs`' clean rows.

    Lean = P(men's stereotyped occupation) − P(women's); the metric is its mean over rows with sign +1 on the
    he-name rows and −1 on the she-name rows. On the clean pairs it is the mean bias, a name swap flips its
    sign, and whatever shifts both genders' rows alike (such as losing the context) cancels.
    """
    import torch

    from lsi.errors import InputError
    from lsi.evaluation.functional import last_token_logits
    from lsi.locate.metrics import Metric

    vocab = lm.tokenizer.get_vocab()
    male, female = vocab[STEREOTYPES["male"]], vocab[STEREOTYPES["female"]]
    signs = torch.cat([torch.ones(len(split)), -torch.ones(len(split))])

    def fn(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        if len(logits) != len(signs):
            raise InputError(f"{len(signs)} rows (the split's name_swap_pairs)", f"{len(logits)} rows",
                             "run the metric on name_swap_pairs(lm, split) of the same split")
        probs = last_token_logits(logits, batch.attention_mask).float().softmax(-1)
        return (signs.to(probs.device) * (probs[:, male] - probs[:, female])).mean()

    return Metric(f"bias[P({STEREOTYPES['male']}) - P({STEREOTYPES['female']}), he rows - she rows]", fn)


# -- verification and locate tasks ---------------------------------------------------------------------------------

def verify(lm: LanguageModel, ground_truth: dict[str, Any]) -> VerifyReport:
    """Bias, context and pronouns on the test split: full model, planted heads zero-ablated, each other head alone."""
    import lsi

    test = ground_truth["splits"]["test"]
    base = fairness_measures(lm, test)
    ablated = fairness_measures(lm, test, [lsi.Zero(s) for s in ground_truth["mediators"]])
    others = {s: fairness_measures(lm, test, [lsi.Zero(s)]) for s in ground_truth["universe"]
              if s not in ground_truth["mediators"]}
    planted_change = base["bias_gap"] - ablated["bias_gap"]
    other_changes = {s: abs(m["bias_gap"] - base["bias_gap"]) for s, m in others.items()}
    strongest = max(other_changes, key=other_changes.__getitem__)
    checks = (
        Check("bias gap, full model", base["bias_gap"], 0.2),
        Check("context accuracy, full model", base["context_accuracy"], 0.9),
        Check("pronoun agreement, full model", base["pronoun_agreement"], 0.95),
        Check("bias gap, planted heads zeroed / full model", ablated["bias_gap"] / max(base["bias_gap"], 1e-9), 0.5,
              higher_is_better=False),
        Check("context accuracy, planted heads zeroed / full model",
              ablated["context_accuracy"] / max(base["context_accuracy"], 1e-9), 0.95),
        Check("pronoun agreement, planted heads zeroed", ablated["pronoun_agreement"], 0.95),
        Check("largest bias-gap change of another head / planted change",
              other_changes[strongest] / max(planted_change, 1e-9), 0.25, higher_is_better=False),
    )
    details = {"base": base, "planted_zeroed": ablated, "other_heads_zeroed": others,
               "strongest_other_head": strongest}
    return VerifyReport("biased_occupations", checks, details)


def locate_tasks(lm: LanguageModel, ground_truth: dict[str, Any]) -> list[LocateTask]:
    """Find the heads that carry the name's gender into the occupation: :func:`bias_metric` on name swaps."""
    import torch

    import lsi
    from lsi.core.inputs import Batch
    from lsi.core.runs import Run
    from lsi.evaluation.locate import LocateTask, Split

    def split(name: str) -> Split:
        cases = ground_truth["splits"][name]
        clean, swapped = name_swap_pairs(lm, cases)
        metric, batch = bias_metric(lm, cases), Batch(clean, torch.ones_like(clean))
        return Split(clean, lambda logits: metric(logits, batch), intervene=lambda u: lm.intervene(lsi.Zero(u)),
                     clean=Run(clean), corrupted=Run(swapped))

    return [LocateTask("biased_occupations", "gender -> occupation heads", tuple(ground_truth["universe"]),
                       frozenset(ground_truth["mediators"]), dev=split("dev"), test=split("test"),
                       description="the heads that carry the name's gender to the occupation; oracle = zero-ablating "
                                   "one head")]


ORGANISM = Organism(
    name="biased_occupations",
    summary="2-layer Llama; occupations follow the workplace, a gender bias runs through head 1.2 only; "
            "pronouns agree with names",
    family="llama",
    truth_by="training objective + verification",
    train=train,
    verify=verify,
    seed=0,
    locate_tasks=locate_tasks,
)
