"""Edit tasks: counterfactual knowledge edits an organism asks for, and how one edit is measured (CounterFact-style).

A task holds :class:`EditCase` s. Each case is one request: a subject whose fact ``(subject, relation) -> o`` is
to become ``o*`` (another object of the relation), given to a method as a :class:`Request` (e.g.
:class:`lsi.steer.rome.EditRequest`)
on the training-template prompts; the method returns one steering per row it reports (e.g. one per layer).
With a steering applied, :func:`measure_case` compares the next-token probabilities after each prompt:

* efficacy ``ES = mean 1[P(o*) > P(o)]`` on the request's (training-template) prompts;
* paraphrase ``PS``: the same on held-out paraphrase templates of the fact;
* neighbourhood ``NS = mean 1[P(o) > P(o*)]`` on other subjects with the same relation (and true object ``o``,
  as in CounterFact);
* preservation: top-1 accuracy of the subject's other facts (other relations, their own objects);
* ``KL(base ‖ edited)`` and Δ cross-entropy on the task's held-out text (:func:`lsi.evaluation.steer.divergence`).

Rows are graded by their means over the cases and ``S = harmonic mean(ES, PS, NS)``.

Example:
    >>> harmonic_score(1.0, 0.5, 1.0)
    0.75
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lsi.errors import InputError
from lsi.evaluation.functional import last_token_logits
from lsi.evaluation.steer import Applicable, Reference, measured

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

Ids = tuple[int, ...]


class Request(Protocol):
    """A counterfactual request: prompts (token ids; the object follows the last token), the new object's id and
    a label."""

    @property
    def prompts(self) -> tuple[Ids, ...]: ...

    @property
    def target_id(self) -> int: ...

    @property
    def subject(self) -> str: ...


@dataclass(frozen=True, eq=False)  # hashed by identity: methods may memoize per case
class EditCase:
    """One request: the :class:`Request` (training templates, ``target_id`` = ``o*``), the true object ``o``,
    the subject's token span ``(start, stop)`` in each request prompt, and the probe prompts (token ids; the
    answer follows the last token): paraphrases, neighbours and the subject's other facts with their objects."""

    request: Request
    relation: str
    true_id: int
    subject_spans: tuple[tuple[int, int], ...]
    paraphrases: tuple[Ids, ...]
    neighbours: tuple[Ids, ...]
    other_facts: tuple[Ids, ...]
    other_objects: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.subject_spans) != len(self.request.prompts) or len(self.other_facts) != len(self.other_objects):
            raise InputError("one subject span per request prompt and one object per other-fact prompt",
                             f"{len(self.subject_spans)} spans for {len(self.request.prompts)} prompts, "
                             f"{len(self.other_objects)} objects for {len(self.other_facts)} prompts",
                             "build the case from the same prompt lists")
        if not (self.paraphrases and self.neighbours and self.other_facts):
            raise InputError("paraphrase, neighbour and other-fact prompts", f"{len(self.paraphrases)} paraphrases, "
                             f"{len(self.neighbours)} neighbours, {len(self.other_facts)} other facts",
                             "choose requests whose fact has neighbours and whose subject has other facts")

    @property
    def new_id(self) -> int:
        return self.request.target_id


@dataclass(frozen=True, eq=False)  # hashed by identity: methods may memoize per task
class EditTask:
    """Cases; a ``corpus`` methods may use (key statistics, preservation terms, prefixes) and the ``heldout`` text
    KL / Δloss are measured on (inputs ``lm.to_batch`` takes; never given to methods); the planted layer where the
    organism has one; ``metrics``: what each grade measures on this task."""

    organism: str
    name: str
    cases: tuple[EditCase, ...]
    corpus: Any
    heldout: Any
    planted_layer: int | None = None
    metrics: Mapping[str, str] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class CaseScores:
    """One case under one steering: the rates of the module docstring, KL and Δloss on the corpus."""

    efficacy: float
    paraphrase: float
    neighbourhood: float
    preservation: float
    kl: float
    dloss: float


def harmonic_score(efficacy: float, paraphrase: float, neighbourhood: float) -> float:
    """``S``: the harmonic mean of ES, PS and NS (0 when any of them is 0)."""
    return float(statistics.harmonic_mean([efficacy, paraphrase, neighbourhood]))


def measure_case(lm: LanguageModel, case: EditCase, ref: Reference, steering: Applicable | None) -> CaseScores:
    """The scores of ``case`` with ``steering`` applied (``None``: the unedited model); ``ref`` is
    :func:`~lsi.evaluation.steer.reference` of the task's held-out text."""
    groups = (case.request.prompts, case.paraphrases, case.neighbours, case.other_facts)
    rows = [list(p) for g in groups for p in g]
    batch = lm.to_batch(rows, padding_side="right")

    def next_token_probs(model: LanguageModel) -> torch.Tensor:
        return last_token_logits(model.forward(batch), batch.attention_mask).double().softmax(-1).cpu()

    probs, kl, dloss = measured(lm, steering, next_token_probs, ref)
    request, paraphrase, neighbours, others = probs.split([len(g) for g in groups])

    def new_wins(p: torch.Tensor) -> torch.Tensor:
        return p[:, case.new_id] > p[:, case.true_id]

    preserved = others.argmax(-1) == torch.tensor(case.other_objects, dtype=torch.long)
    return CaseScores(_rate(new_wins(request)), _rate(new_wins(paraphrase)), _rate(~new_wins(neighbours)),
                      _rate(preserved), kl, dloss)


def _rate(hits: torch.Tensor) -> float:
    return float(hits.double().mean())


def summarize(scores: Sequence[CaseScores]) -> dict[str, float]:
    """Means over cases of every grade, and ``score`` = :func:`harmonic_score` of the mean ES, PS and NS."""
    rows = [asdict(s) for s in scores]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    return {**mean, "score": harmonic_score(mean["efficacy"], mean["paraphrase"], mean["neighbourhood"])}
