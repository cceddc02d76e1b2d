"""``language_neurons``: locate language-specific neurons with LAPE on dev, then steer their amplitude (Tang et al.
2024) — locate and steer connected.

LAPE (:func:`lsi.locate.magnitude.lape_neurons`) runs on the task's dev contrast sets taken as two languages
(``positive`` = the language to induce or remove, ``negative`` = the other one), at every MLP neuron. Then:

- ``induce``: :class:`~lsi.core.interventions.Set` of the positive language's neurons to their mean activation
  over the dev positive inputs, plus :class:`~lsi.core.interventions.Zero` of the negative language's neurons
  ("activate" one language);
- ``remove``: ``Zero`` of the positive language's neurons ("deactivate" it).

LAPE's ``top_rate`` (the fraction of all neurons selected) is the strength axis of the curve: one candidate per
rate in :data:`TOP_RATES` (METHODS.md's range, 1–5 %); a rate that selects no neuron of a needed language gives no
candidate. The method applies to the ``two_languages`` organism, whose contrast sets are two languages.

Example:
    >>> from lsi.bench.steer_registry import get_steer_methods
    >>> [m.name for m in get_steer_methods(["language_neurons"])]
    ['random', 'language_neurons']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lsi.bench.steer_registry import Candidate, SteerMethod, register_steer_method
from lsi.core.interventions import Set, Zero, reference_means
from lsi.core.steering import compose
from lsi.locate.magnitude import activation_probability, lape_neurons
from lsi.steer.located import group_units

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.core.steering import Steering
    from lsi.evaluation.steer import SteerTask

TOP_RATES = (0.01, 0.02, 0.03, 0.05)
ORGANISMS = ("two_languages",)


def _applies(task: SteerTask) -> str | None:
    if task.organism in ORGANISMS:
        return None
    return f"LAPE needs contrast sets that are two languages: organisms {list(ORGANISMS)} only"


def _steering(lm: LanguageModel, task: SteerTask, neurons: dict[str, list[str]]) -> Steering | None:
    """The amplitude steering of the task's goal on LAPE's neurons (``None``: a needed language has none)."""
    target, other = group_units(neurons["positive"]), group_units(neurons["negative"])
    if not target:
        return None
    if task.goal == "remove":
        return compose(Zero(s, model=lm) for s in target)
    means = reference_means(lm, task.dev.positive, target)
    return compose([Set(s, m, model=lm) for s, m in zip(target, means, strict=True)],
                   [Zero(s, model=lm) for s in other])


def _run(lm: LanguageModel, task: SteerTask, seed: int) -> list[Candidate]:
    probs = activation_probability(lm, {"positive": task.dev.positive, "negative": task.dev.negative})
    candidates = []
    for rate in TOP_RATES:
        neurons = lape_neurons(probs, top_rate=rate)
        steering = _steering(lm, task, neurons)
        if steering is not None:
            settings: dict[str, Any] = {"top_rate": rate, **{f"n_{k}": len(v) for k, v in neurons.items()}}
            candidates.append(Candidate(steering, settings))
    return candidates


register_steer_method(SteerMethod(
    "language_neurons", "LAPE language neurons located on dev; induce: set the positive language's to their dev mean "
    "and zero the other's; remove: zero the positive language's (one candidate per LAPE top_rate)", _run,
    applies=_applies))
