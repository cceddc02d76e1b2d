"""What the benchmark's locate methods share about a :class:`~lsi.evaluation.locate.LocateTask`: its metric as a
locate metric, its universe as sites, and why a method does not apply to it.

Example:
    >>> from contextlib import nullcontext
    >>> from lsi.evaluation.locate import LocateTask, Split
    >>> split = Split(inputs=[[1, 2]], metric=lambda logits: logits.sum(), intervene=lambda u: nullcontext())
    >>> needs_sites(LocateTask("toy", "layers", ("blocks.0", "blocks.1"), frozenset(), dev=split, test=split))
    'the universe is not concrete sites (e.g. whole layers)'
"""

from __future__ import annotations

from lsi.core.sites import Site
from lsi.errors import SiteError
from lsi.evaluation.locate import LocateTask, Split
from lsi.locate.metrics import Metric


def task_metric(split: Split) -> Metric:
    """The split's metric as a locate metric ``(logits, batch) -> scalar`` (the batch is the split's own)."""
    return Metric("task metric", lambda logits, batch: split.metric(logits))


def needs_contrast(task: LocateTask) -> str | None:
    """Why a method that compares clean and corrupted runs does not apply to ``task`` (``None`` if it does)."""
    if task.test.clean is None or task.test.corrupted is None:
        return "the task has no clean and corrupted runs"
    return None


def universe_sites(task: LocateTask) -> list[Site] | None:
    """The task's universe as concrete sites, or ``None`` when it names something else (e.g. whole layers)."""
    try:
        sites = [Site.parse(u) for u in task.universe]
    except SiteError:
        return None
    return None if any(s.is_pattern for s in sites) else sites


def needs_sites(task: LocateTask) -> str | None:
    """Why a method that scores sites does not apply to ``task`` (``None`` if it does)."""
    return None if universe_sites(task) is not None else "the universe is not concrete sites (e.g. whole layers)"


def needs_contrast_sites(task: LocateTask) -> str | None:
    """Why a method that compares clean and corrupted runs at sites does not apply to ``task`` (``None`` if it
    does)."""
    return needs_contrast(task) or needs_sites(task)
