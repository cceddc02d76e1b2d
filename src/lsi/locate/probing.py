"""Linear probes: how well a label can be decoded from each object's activations (decodability, not causality).

:func:`train_probe` fits a multinomial logistic-regression probe on any features (standardised, L2-penalised,
full-batch L-BFGS from zero: deterministic). :func:`probe` reads features of every object at a chosen position
(or pooled over real tokens), and ranks objects by held-out accuracy, next to k-fold cross-validated accuracy on
the training part and a control task (Hewitt & Liang 2019): the same probe on labels re-assigned at random per
type (by default the token at the probed position), whose accuracy measures what the probe can memorise.
Selectivity = accuracy − control accuracy.

Example:
    >>> import torch
    >>> x = torch.randn(200, 5, generator=torch.Generator().manual_seed(0))
    >>> y = (x[:, 0] > 0).long()
    >>> train_probe(x[:150], y[:150]).accuracy(x[150:], y[150:]) > 0.9
    True
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from lsi.core.inputs import Batch
from lsi.core.sites import Site
from lsi.errors import InputError
from lsi.locate.result import LocateResult

if TYPE_CHECKING:
    from lsi.core.inputs import Inputs
    from lsi.core.model import LanguageModel

Labels = Sequence[Hashable] | torch.Tensor
ProbePosition = Literal["last", "mean"] | int
RankBy = Literal["accuracy", "selectivity"]


@dataclass(frozen=True)
class Probe:
    """A linear softmax probe on standardised features: ``logits = ((x - mean) / std) @ weight.T + bias``."""

    weight: torch.Tensor  # [classes, d]
    bias: torch.Tensor  # [classes]
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]
    classes: tuple[Hashable, ...]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> list[Hashable]:
        return [self.classes[i] for i in self.logits(features).argmax(-1).tolist()]

    def accuracy(self, features: torch.Tensor, labels: Labels) -> float:
        """Fraction of examples whose predicted class is their label (labels the probe never saw count as wrong)."""
        truth = _as_list(labels)
        return sum(p == t for p, t in zip(self.predict(features), truth, strict=True)) / max(len(truth), 1)


def _as_list(labels: Labels) -> list[Hashable]:
    return labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)


def _classes(labels: list[Hashable]) -> tuple[Hashable, ...]:
    unique = list(dict.fromkeys(labels))
    try:
        return tuple(sorted(unique))  # type: ignore[type-var]
    except TypeError:
        return tuple(unique)


def train_probe(features: torch.Tensor, labels: Labels, *, l2: float = 1e-3, max_iter: int = 200) -> Probe:
    """Fit a softmax probe: mean cross-entropy + ``l2 * |W|²`` on standardised ``features [n, d]``.

    Example:
        >>> import torch
        >>> x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
        >>> train_probe(x, ["a", "a", "b", "b"]).predict(torch.tensor([[0.2], [2.9]]))
        ['a', 'b']
    """
    truth = _as_list(labels)
    if features.dim() != 2 or features.shape[0] != len(truth) or not truth:
        raise InputError("features [n, d] with one label per row (n >= 1)",
                         f"features {tuple(features.shape)}, {len(truth)} labels", "pass matching features and labels")
    classes = _classes(truth)
    if len(classes) < 2:
        raise InputError("labels of at least two classes", f"only {classes!r}", "add examples of another class")
    x = features.detach().float()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    x = (x - mean) / std
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[t] for t in truth], device=x.device)
    weight = torch.zeros(len(classes), x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(len(classes), device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(weight.detach(), bias.detach(), mean, std, classes)


# -- splits and control labels ------------------------------------------------------------------------------------
def _split(labels: list[Hashable], folds: int, heldout: float, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Fold id per example (``-1`` = held out) and the held-out indices, both stratified by class."""
    rank = {c: i for i, c in enumerate(_classes(labels))}
    order = sorted(torch.randperm(len(labels), generator=gen).tolist(), key=lambda i: rank[labels[i]])  # stable
    held: set[int] = set()
    for c in rank:
        members = [i for i in order if labels[i] == c]
        held.update(members[: round(heldout * len(members))])
    fold = [-1] * len(labels)
    for j, i in enumerate(i for i in order if i not in held):
        fold[i] = j % folds  # consecutive members of a class go to different folds
    return fold, sorted(held)


def control_labels(labels: Labels, types: Sequence[Hashable], *, seed: int = 0) -> list[Hashable]:
    """Hewitt & Liang control task: each type gets one label drawn from the empirical label distribution, and
    every example of that type takes it (a probe can only score by memorising types).

    Example:
        >>> fake = control_labels([0, 1, 1, 0, 1], ["a", "b", "a", "c", "b"])
        >>> fake[0] == fake[2] and fake[1] == fake[4]
        True
    """
    truth = _as_list(labels)
    distinct = list(dict.fromkeys(types))
    draws = torch.randint(len(truth), (len(distinct),), generator=torch.Generator().manual_seed(seed)).tolist()
    assigned = {t: truth[d] for t, d in zip(distinct, draws, strict=True)}
    return [assigned[t] for t in types]


# -- probing a model ------------------------------------------------------------------------------------------------
def _objects(lm: LanguageModel, sites: str | Sequence[str]) -> list[tuple[str, Site]]:
    """``(object label, cached site)``: sites with a head axis and no index split into one object per head."""
    out: list[tuple[str, Site]] = []
    for s in lm.resolve_sites(sites):
        if s.info.position_axis != 1:
            raise InputError("sites with a position axis first (residual, heads, MLP)", str(s),
                             "probe attention patterns through attn.z or attn.head_out instead")
        name = s.info.index_name
        if name in ("n_heads", "n_kv_heads") and s.index is None:
            count = lm.dims.size(name) or 0
            out += [(str(Site(s.kind, s.layer, h)), Site(s.kind, s.layer, h)) for h in range(count)]
        else:
            out.append((str(s), s))
    return out


def _features(lm: LanguageModel, batch: Batch, sites: list[Site],
              position: ProbePosition) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Features ``[n, features]`` per object and the token id at the probed position (``None`` when pooled)."""
    pooled = position == "mean"
    cache = lm.run_with_cache(batch, sorted({str(s.without_index()) for s in sites}),
                              positions=None if pooled else position, device="cpu")
    mask = batch.attention_mask.cpu().float()
    out = {}
    for s in sites:
        value = cache[s].float()
        if pooled:
            real = mask.view(mask.shape + (1,) * (value.dim() - 2))
            value = (value * real).sum(1) / real.sum(1)
        else:
            value = value[:, 0]
        out[str(s)] = value.reshape(value.shape[0], -1)
    tokens = None if pooled else batch.input_ids.cpu().gather(1, cache.positions.cpu())[:, 0]  # type: ignore[union-attr]
    return out, tokens


def _check(n_inputs: int, truth: list[Hashable], folds: int, heldout: float, position: Any, rank_by: str,
           control: bool) -> None:
    if n_inputs != len(truth):
        raise InputError("one label per input", f"{n_inputs} inputs and {len(truth)} labels",
                         "pass labels aligned with the dataset")
    if len(set(truth)) < 2:
        raise InputError("labels of at least two classes", f"only {truth[0]!r}", "add examples of another class")
    if folds < 2:
        raise InputError("folds >= 2", str(folds), "use e.g. folds=5")
    if not 0 < heldout < 1:
        raise InputError("a held-out fraction in (0, 1)", str(heldout), "use e.g. heldout=0.2")
    n_train = len(truth) - round(heldout * len(truth))
    if n_train < folds:
        raise InputError(f"at least folds={folds} training examples", f"{n_train} after holding out {heldout:.0%}",
                         "add examples or lower folds")
    if not (position in ("last", "mean") or (isinstance(position, int) and not isinstance(position, bool))):
        raise InputError("positions='last', 'mean' or one int", repr(position), "probe one position at a time")
    if rank_by not in ("accuracy", "selectivity"):
        raise InputError("rank_by 'accuracy' or 'selectivity'", repr(rank_by), "pick one")
    if rank_by == "selectivity" and not control:
        raise InputError("control=True to rank by selectivity", "control=False", "set control=True")


def _scores(x: torch.Tensor, labels: list[Hashable], fold: list[int], held: list[int], folds: int,
            l2: float) -> tuple[float, float]:
    """(k-fold CV accuracy on the training part, accuracy on the held-out part of a probe fit on all of it)."""
    def fit_score(train: list[int], test: list[int]) -> float:
        return train_probe(x[train], [labels[i] for i in train], l2=l2).accuracy(x[test], [labels[i] for i in test])

    cv = [fit_score([i for i, f in enumerate(fold) if f not in (k, -1)], [i for i, f in enumerate(fold) if f == k])
          for k in range(folds)]
    return sum(cv) / folds, fit_score([i for i, f in enumerate(fold) if f != -1], held)


def _chance(labels: list[Hashable], fold: list[int], held: list[int]) -> float:
    """Held-out accuracy of always answering the training part's most common label."""
    train = [labels[i] for i, f in enumerate(fold) if f != -1]
    common = max(_classes(train), key=train.count)
    return sum(labels[i] == common for i in held) / len(held)


def probe(lm: LanguageModel, dataset: Inputs | Batch, labels: Labels, sites: str | Sequence[str], *,
          positions: ProbePosition = "last", types: Sequence[Hashable] | None = None, folds: int = 5,
          heldout: float = 0.2, control: bool = True, rank_by: RankBy = "accuracy", l2: float = 1e-3,
          seed: int = 0) -> LocateResult:
    """Rank objects by how well a linear probe decodes ``labels`` from them on held-out inputs.

    ``sites``: site selectors; per-head kinds without an index (``"blocks.*.attn.head_out"``) give one object per
    head. ``positions``: ``"last"`` real token, one real-token index, or ``"mean"`` (pooled over real tokens).
    ``types``: one per input, the control task's word types (default: the token id at the probed position; with
    ``"mean"`` every input is its own type). Scores are held-out accuracy (or selectivity with
    ``rank_by="selectivity"``); ``settings`` hold every measure per object (``accuracy``, ``cv_accuracy``,
    ``control_accuracy``, ``control_cv_accuracy``, ``selectivity``) and the majority-class baselines ``chance`` and
    ``control_chance``.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> ids = [[3, 4, t] for t in range(10, 30)]
        >>> r = probe(lm, ids, [t % 2 for t in range(10, 30)], "embed", folds=2, control=False)
        >>> r.labels
        ['embed']
    """
    truth = _as_list(labels)
    if not truth:
        raise InputError("at least one labelled example", "no labels", "pass a dataset and one label per input")
    batch = lm.to_batch(dataset)
    _check(batch.input_ids.shape[0], truth, folds, heldout, positions, rank_by, control)
    objects = _objects(lm, sites)
    features, tokens = _features(lm, batch, [s for _, s in objects], positions)
    gen = torch.Generator().manual_seed(seed)
    fold, held = _split(truth, folds, heldout, gen)
    if not held:
        raise InputError(f"at least one held-out example ({heldout:.0%} of each class, rounded)",
                         f"none from {len(truth)} examples", "add examples or raise heldout")
    measures: dict[str, Any] = {"accuracy": {}, "cv_accuracy": {}, "chance": _chance(truth, fold, held)}
    for label, s in objects:
        measures["cv_accuracy"][label], measures["accuracy"][label] = _scores(features[str(s)], truth, fold, held,
                                                                              folds, l2)
    if control:
        types = _types(types, tokens, len(truth))
        fake = control_labels(truth, types, seed=seed)
        if len(set(fake)) < 2:
            raise InputError("control labels of at least two classes", f"{len(set(types))} distinct type(s)",
                             "pass types= with more distinct values (e.g. one per input) or control=False")
        measures.update(control_accuracy={}, control_cv_accuracy={}, selectivity={},
                        control_chance=_chance(fake, fold, held))
        for label, s in objects:
            cv, acc = _scores(features[str(s)], fake, fold, held, folds, l2)
            measures["control_cv_accuracy"][label], measures["control_accuracy"][label] = cv, acc
            measures["selectivity"][label] = measures["accuracy"][label] - acc
    labels_out = [label for label, _ in objects]
    return LocateResult.over(labels_out, [measures[rank_by][u] for u in labels_out], method="probe",
                             metric=f"held-out {rank_by}", positions=str(positions), folds=folds, heldout=heldout,
                             l2=l2, seed=seed, n_examples=len(truth), classes=list(map(str, _classes(truth))),
                             **measures)


def _types(types: Sequence[Hashable] | None, tokens: torch.Tensor | None, n: int) -> list[Hashable]:
    if types is None:
        return list(range(n)) if tokens is None else tokens.tolist()
    found = list(types)
    if len(found) != n:
        raise InputError("one type per input", f"{len(found)} types for {n} inputs", "pass types aligned with the data")
    return found
