"""Task vectors and model merging: task arithmetic (Ilharco et al. 2023) and TIES (Yadav et al. 2023).

A task vector ``τ = W_ft − W_base`` is a :class:`~lsi.core.weight_edit.WeightEdit` on the base model (so it applies,
composes, saves, folds and exports like any steering); :func:`masked_finetune`'s edits are task vectors too.

* :func:`combine`: ``Σ_t λ_t τ_t``;
* :func:`ties_merge`: trim each ``τ_t`` to its largest entries, elect a sign per entry, average the entries that
  agree with it, scale by ``lam``; optionally only over the entries of a :class:`ParameterMask`.

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> base = lsi.LanguageModel(tiny_model("gpt2"))
    >>> other = lsi.LanguageModel(tiny_model("gpt2", seed=1))  # same names and shapes, other weights
    >>> tau = task_vector(base, other)
    >>> with tau.apply(base):
    ...     same = torch.allclose(base.forward([[5, 6, 7]]), other.forward([[5, 6, 7]]), atol=1e-5)
    >>> same, tau.label
    (True, 'task_vector')
    >>> combine(base, [tau, tau], weights=[0.5, -0.5]).moved()  # the two halves cancel
    0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from lsi.core.steering import check_finite
from lsi.core.weight_edit import WeightEdit
from lsi.errors import InputError, ModelMismatchError
from lsi.steer.finetune import ParameterMask

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel


def task_vector(base_lm: LanguageModel, finetuned: Any) -> WeightEdit:
    """``τ = W_ft − W_base`` for every parameter that differs (label ``"task_vector"``), computed in float64.

    ``finetuned`` is a :class:`LanguageModel` or an HF model with the same parameter names and shapes as
    ``base_lm`` (:class:`ModelMismatchError` otherwise).
    """
    from lsi.core.model import LanguageModel

    model = finetuned.model if isinstance(finetuned, LanguageModel) else finetuned
    if not isinstance(model, torch.nn.Module):
        raise InputError("a LanguageModel or an HF model", type(finetuned).__name__,
                         "pass the fine-tuned model (lsi.load(path) or AutoModelForCausalLM.from_pretrained)")
    base = dict(base_lm.model.named_parameters())
    tuned = dict(model.named_parameters())
    missing, extra = sorted(set(base) - set(tuned)), sorted(set(tuned) - set(base))
    if missing or extra:
        raise ModelMismatchError(f"a fine-tuned model with the base model's {len(base)} parameter names",
                                 f"missing {missing[:3]}, extra {extra[:3]}",
                                 "pass a model fine-tuned from this base (same architecture and tying)")
    for name, p in base.items():
        if tuned[name].shape != p.shape:
            raise ModelMismatchError(f"{name} of shape {tuple(p.shape)}", f"shape {tuple(tuned[name].shape)}",
                                     "pass a model fine-tuned from this base (same sizes)")
    deltas = {}
    for name, p in base.items():
        delta = tuned[name].detach().double().cpu() - p.detach().double().cpu()
        if bool(delta.any()):
            deltas[name] = delta
    return WeightEdit.of(base_lm, deltas, label="task_vector", info={"changed_parameters": len(deltas)})


def _deltas(base_lm: LanguageModel, vectors: Sequence[WeightEdit]) -> list[dict[str, torch.Tensor]]:
    """Each vector's deltas, checked against ``base_lm`` (model and the weights it was computed on)."""
    if not vectors:
        raise InputError("at least one task vector", "none", "pass [task_vector(base, finetuned), ...]")
    bad = [type(v).__name__ for v in vectors if not isinstance(v, WeightEdit)]
    if bad:
        raise InputError("task vectors as WeightEdit objects", f"{bad}",
                         "use task_vector(base, finetuned) or a weight-space edit (masked_finetune(...).edit)")
    return [{n: d.double() for n, d in v.weight_deltas(base_lm).items()} for v in vectors]


def combine(base_lm: LanguageModel, vectors: Sequence[WeightEdit],
            weights: Sequence[float] | None = None) -> WeightEdit:
    """Task arithmetic ``Σ_t λ_t τ_t`` (``weights`` λ default to 1; label ``"task_arithmetic"``)."""
    deltas = _deltas(base_lm, vectors)
    lams = [1.0] * len(deltas) if weights is None else [float(w) for w in weights]
    if len(lams) != len(deltas):
        raise InputError(f"one weight per task vector ({len(deltas)})", f"{len(lams)} weights",
                         "pass weights=[λ1, λ2, ...] of the same length")
    check_finite(torch.tensor(lams), "task-vector weights", "pass finite weights")
    total: dict[str, torch.Tensor] = {}
    for lam, delta in zip(lams, deltas, strict=True):
        for name, d in delta.items():
            total[name] = total[name] + lam * d if name in total else lam * d
    return WeightEdit.of(base_lm, total, label="task_arithmetic", info={"weights": lams})


def _ties(matrix: torch.Tensor, density: float) -> torch.Tensor:
    """TIES on task vectors flattened into the rows of ``matrix [tasks, entries]``: keep the ``⌈density · n⌉``
    largest |entries| of each row, elect per entry the sign of the kept values' sum (a zero sum takes the sign
    most entries elected, as in the authors' code), and average the kept values that have the elected sign.
    """
    n = matrix.shape[1]
    k = min(n, math.ceil(density * n))
    keep = torch.zeros_like(matrix, dtype=torch.bool).scatter_(1, matrix.abs().topk(k, dim=1).indices, True)
    trimmed = torch.where(keep, matrix, torch.zeros_like(matrix))
    elected = trimmed.sum(0).sign()
    elected[elected == 0] = elected.sum().sign()
    agree = (trimmed != 0) & (trimmed.sign() == elected)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties_merge(base_lm: LanguageModel, vectors: Sequence[WeightEdit], *, density: float = 0.2, lam: float = 1.0,
               mask: ParameterMask | None = None) -> WeightEdit:
    """TIES merging (Yadav et al. 2023), label ``"ties_merge"``.

    Trimming is global per task vector, as in the paper's code: the ``⌈density · n⌉`` entries of largest
    magnitude over all its parameters together (``n``: entries of the parameters any vector changes). With
    ``mask`` (from :func:`parameter_mask`), the merge covers only the masked entries: ``n`` counts those, and
    the result is zero elsewhere. The merged vector is ``lam`` times the disjoint mean of the agreeing entries.
    """
    if not 0 < density <= 1:
        raise InputError("0 < density <= 1 (the share of each task vector's entries kept)", repr(density),
                         "e.g. density=0.2")
    check_finite(torch.tensor(float(lam)), "lam", "pass a finite lam")
    deltas = _deltas(base_lm, vectors)
    if mask is not None:
        mask.check(base_lm)
        deltas = [mask.restrict(d) for d in deltas]
    names = list(dict.fromkeys(n for d in deltas for n in d))
    params = dict(base_lm.model.named_parameters())
    chosen = {n: mask.masks[n] if mask is not None else torch.ones(params[n].shape, dtype=torch.bool) for n in names}
    sizes = [int(chosen[n].sum()) for n in names]
    rows = [torch.cat([d[n][chosen[n]] if n in d else torch.zeros(size, dtype=torch.float64)
                       for n, size in zip(names, sizes, strict=True)]) for d in deltas] if names else []
    merged = (lam * _ties(torch.stack(rows), density)).split(sizes) if names else ()
    out = {}
    for name, values in zip(names, merged, strict=True):
        out[name] = torch.zeros(chosen[name].shape, dtype=torch.float64)
        out[name][chosen[name]] = values
    info = {"density": density, "lam": lam, "n_vectors": len(deltas), "entries": sum(sizes),
            "targets": list(mask.targets) if mask is not None else "all"}
    return WeightEdit.of(base_lm, out, label="ties_merge", info=info)
