"""Measurements every recipe shares: greedy replies, side effects per corpus position, cost, the random
baseline's direction, and export checksums.

Example:
    >>> import torch
    >>> v = torch.tensor([3.0, 4.0])
    >>> float(random_like(v, seed=0).norm())  # same norm, random direction
    5.0
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lsi.improve.rundir import sha256_file

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.core.steering import Steering
    from lsi.evaluation.steer import Reference
    from lsi.improve.recipe import Progress

BATCH = 64


@dataclass(frozen=True)
class Reply:
    """A generated reply: its text (special tokens dropped) and whether it ended with the end-of-sequence token."""

    text: str
    ended: bool


def replies(lm: LanguageModel, prompts: Sequence[str], max_new_tokens: int, *, progress: Progress | None = None,
            batch_size: int = BATCH) -> list[Reply]:
    """Greedy replies to text ``prompts`` through ``lm.generate`` (so an active steering acts on them)."""
    tok = lm.tokenizer
    eos = tok.eos_token_id
    chunks = [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    if progress is not None:
        chunks = list(progress.iterate(chunks, total=len(chunks), desc="generating"))
    out: list[Reply] = []
    for chunk in chunks:
        ids = lm.generate(chunk, max_new_tokens=max_new_tokens, eos_token_id=eos)
        width = lm.to_batch(chunk, padding_side="left").input_ids.shape[1]
        for row in ids[:, width:].tolist():
            ended = eos in row
            body = row[: row.index(eos)] if ended else row
            out.append(Reply(" ".join(tok.decode(body, skip_special_tokens=True).split()), ended))
    return out


def divergence_values(logits: torch.Tensor, ref: Reference) -> dict[str, list[float]]:
    """Per scored corpus position: ``{"kl": [...], "dloss": [...]}`` (nats), for bootstrap intervals."""
    from lsi.evaluation.steer import divergences

    kl, dloss = divergences(logits, ref)
    return {"kl": kl.tolist(), "dloss": dloss.tolist()}


def time_ratio(base: Callable[[], Any], steered: Callable[[], Any],
               steering: Callable[[], AbstractContextManager[Any]], *, rounds: int = 5, repeats: int = 3) -> float:
    """The steered forward time over the unsteered one: ``rounds`` alternating blocks of ``repeats`` calls of
    ``base()`` and, inside one ``steering()`` context, of ``steered()``; the ratio of the fastest calls (the least
    disturbed by other work on a shared machine; alternating blocks cancel drifts such as warm-up)."""
    def fastest(call: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)

    base(), steered()  # warm-up
    base_times, steered_times = [], []
    for _ in range(rounds):
        base_times.append(fastest(base))
        with steering():
            steered_times.append(fastest(steered))
    return min(steered_times) / min(base_times)


def changed_parameters(base: LanguageModel, edited: LanguageModel) -> int:
    """How many parameter values of ``edited`` differ from ``base``'s (non-zero values of parameters ``base`` lacks,
    e.g. biases a fold adds, count as changed)."""
    base_params = dict(base.model.named_parameters())
    with torch.no_grad():
        return sum(int((p != base_params[name].to(p.device)).sum()) if name in base_params else int((p != 0).sum())
                   for name, p in edited.model.named_parameters())


def random_like(vector: torch.Tensor, *, seed: int) -> torch.Tensor:
    """A random direction (seeded Gaussian) with ``vector``'s norm, dtype and device: the equal-size baseline."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(vector.shape, generator=gen, dtype=torch.float64)
    return (r / r.norm() * vector.double().norm()).to(dtype=vector.dtype, device=vector.device)


def export_checkpoint(out: Path, lm: LanguageModel, edit: Steering | LanguageModel, note: str) -> dict[str, Any]:
    """Export ``lm`` with ``edit`` (a steering, folded into the weights, or an edited model) into ``out`` with
    :func:`~lsi.steer.export.export_hf` (which checks the reloaded checkpoint against the steered logits); what an
    interrupted export left there is removed first. Returns ``{"files": checksums, "note", "params": changed
    parameters}``, or ``files`` ``None`` and the reason when the edit does not fold."""
    import shutil

    from lsi.core.steering import Steering
    from lsi.errors import LsiError
    from lsi.steer.export import export_hf, fold

    if out.exists():
        shutil.rmtree(out)
    try:
        edited = fold(lm, edit) if isinstance(edit, Steering) else edit
        export_hf(lm, edit, out)
    except LsiError as err:
        return {"files": None, "note": f"not exported: {err}", "params": 0}
    return {"files": checksums(out), "note": note, "params": changed_parameters(lm, edited)}


def checksums(directory: str | Path) -> dict[str, str]:
    """``{relative file name: sha256}`` of every file under ``directory``."""
    root = Path(directory)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}
