"""Steer method ``refusal_direction``: the refusal-direction selection protocol of Arditi et al. 2024
(:func:`lsi.steer.refusal.select_refusal_direction`) on a refusal_gate task's dev contrast (harmful-verb requests
vs harmless ones), reading ``blocks.{l}.resid_pre`` at the three post-instruction tokens ``end assistant :``, with
the refusal template's first token as the refusal token set and the dev contrast prompts as validation prompts.

Removal tasks get the chosen direction's :class:`~lsi.steer.directional.DirectionalAblation`; induce tasks add it at
its layer's input at the strengths of ``diff_in_means_addition`` (:data:`lsi.steer.selection.ADDITION_ALPHAS`).
Other organisms define no refusal tokens or post-instruction template, so the method does not apply.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from lsi.bench.steer_methods.diff_in_means import addition_candidates
from lsi.bench.steer_registry import Candidate, SteerMethod, register_steer_method
from lsi.organisms import refusal_gate
from lsi.steer.refusal import RefusalSelection, select_refusal_direction

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.evaluation.steer import SteerTask


@functools.lru_cache(maxsize=4)  # the two refusal_gate tasks share nothing but the model: one run each
def protocol(lm: LanguageModel, task: SteerTask) -> RefusalSelection:
    """The protocol's result on ``task.dev`` (every candidate's scores and filters)."""
    refusal = lm.tokenizer.get_vocab()[refusal_gate.REFUSAL[0]]
    return select_refusal_direction(lm, task.dev.positive, task.dev.negative, refusal_tokens=[refusal],
                                    positions=len(refusal_gate.POST_INSTRUCTION))


def _run(lm: LanguageModel, task: SteerTask, seed: int) -> list[Candidate]:
    result = protocol(lm, task)
    chosen = result.pick()  # raises, with how many each filter discarded, when no candidate is left
    if task.goal == "remove":
        return [Candidate(result.ablation(model=lm), {"layer": chosen.layer, "position": chosen.position})]
    settings = {"position": chosen.position, "norm": round(float(chosen.direction.norm()), 4)}
    return addition_candidates(lm, task, chosen.site, chosen.direction, settings)


def _refusal_gate_only(task: SteerTask) -> str | None:
    if task.organism == refusal_gate.ORGANISM.name:
        return None
    return "needs refusal tokens and post-instruction template tokens, which only the refusal_gate organism defines"


register_steer_method(SteerMethod(
    "refusal_direction", "Arditi et al.'s selection (lowest bypass score after the layer / KL / induce filters) of "
    "μ_harmful − μ_harmless at the post-instruction tokens; ablated (remove) or added (induce)", _run,
    applies=_refusal_gate_only))
