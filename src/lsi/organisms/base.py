"""The organism contract: a small HF model trained by lsi on a synthetic task whose mechanism is known.

Each organism module defines one :class:`Organism` and is listed in ``lsi.organisms.registry``. Its committed
artefacts live in ``lsi/organisms/weights/<name>/``: a standard HF model directory (``config.json``,
``model.safetensors``, ``tokenizer.json`` + ``tokenizer_config.json``) plus ``ground_truth.json``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.evaluation.edit import EditTask
    from lsi.evaluation.locate import LocateTask
    from lsi.evaluation.steer import SteerTask

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Check:
    """One verification figure against its threshold."""

    name: str
    value: float
    threshold: float
    higher_is_better: bool = True

    @property
    def passed(self) -> bool:
        return self.value >= self.threshold if self.higher_is_better else self.value <= self.threshold


@dataclass(frozen=True)
class VerifyReport:
    organism: str
    checks: tuple[Check, ...]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


@dataclass(frozen=True)
class Organism:
    """A model organism: how to train it, where its weights are, and how to re-derive its ground truth.

    ``train(out_dir, seed)`` writes a complete HF model directory with ``ground_truth.json`` and returns a dict
    of training figures (seconds, final loss, ...). ``verify(model, ground_truth)`` re-derives the ground truth
    from the weights with diagnostics that no graded method uses.
    """

    name: str
    summary: str
    family: str
    truth_by: str  # "construction" | "training objective" | "data design + verification"
    train: Callable[[Path, int], dict[str, Any]]
    verify: Callable[[LanguageModel, dict[str, Any]], VerifyReport]
    seed: int = 0
    # the locate tasks it grades (None: its ground truth grades steer methods or SAEs instead)
    locate_tasks: Callable[[LanguageModel, dict[str, Any]], list[LocateTask]] | None = None
    # the steer tasks it grades (None: its ground truth grades no steer method)
    steer_tasks: Callable[[LanguageModel, dict[str, Any]], list[SteerTask]] | None = None
    # the knowledge-edit tasks it grades (None: its ground truth grades no edit method)
    edit_tasks: Callable[[LanguageModel, dict[str, Any]], list[EditTask]] | None = None

    @property
    def weights_dir(self) -> Path:
        return WEIGHTS_DIR / self.name
