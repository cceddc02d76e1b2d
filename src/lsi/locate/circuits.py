"""Circuit discovery over the residual DAG: EAP, EAP-IG, ACDC-style pruning, and faithfulness of a circuit.

The graph, its edge labels and edge patching are defined in :mod:`lsi.locate.circuit_graph`. Every method takes a
clean and a corrupted run — inputs aligned token by token, or Run-like objects with ``.inputs`` and ``.setting``
(e.g. noise on the subject embeddings) — and a metric ``metric(logits, batch) -> scalar`` (larger = more of the
behaviour), always evaluated against the clean batch. Edge scores come as a :class:`LocateResult` over one
``edge`` axis; :func:`node_scores` sums them per node.

- :func:`eap` (edge attribution patching): ``S(u→v) = (a_u(clean) − a_u(corrupt)) · ∂m/∂z_v |clean`` summed over
  batch and positions, ``z_v`` the receiver's own residual input; two forwards and one backward. Patching u→v to
  the corrupted run changes the metric by about ``−S``: positive scores support the behaviour.
- :func:`eap_ig` (Hanna et al. 2024, "EAP-IG-inputs"): the same with the gradient averaged over runs whose input
  embeddings are ``e_corrupt + α (e_clean − e_corrupt)``, ``α = k/n`` for ``k = 1..n`` (a right Riemann sum, so
  ``n = 1`` is exactly EAP; the authors' code uses ``k = 0..n−1``). Completeness: the scores of the edges out of
  ``embed`` sum to ≈ ``m(clean) − m(corrupt)`` as ``n`` grows (reported in the settings).
- :func:`acdc` (Conmy et al. 2023): receivers in reverse topological order, each incoming edge (latest sender
  first) tentatively patched on top of the edges already removed; the edge is removed when the metric moves by
  less than ``threshold``. An edge's score is the metric drop measured when it was tested, so the kept circuit
  is ``result.select(threshold=threshold, by="abs")``. One forward per edge.
- :func:`faithfulness` ``f(C) = (m(C) − m(∅)) / (m(full) − m(∅))``, every edge outside ``C`` patched;
  :func:`faithfulness_curve` over circuit sizes of 0.1 … 100 % of the edges, with its area.

Example:
    >>> import lsi
    >>> from lsi.locate.metrics import logit_diff
    >>> lm = lsi.LanguageModel(lsi.testing.tiny_model("llama"))  # doctest: +SKIP
    >>> edges = eap_ig(lm, [[5, 6, 7, 5, 6]], [[5, 9, 7, 5, 6]], logit_diff(7, 9), steps=10)  # doctest: +SKIP
    >>> edges.top(3, by="abs")  # doctest: +SKIP
    >>> node_scores(edges).top(3)  # doctest: +SKIP
    >>> faithfulness_curve(lm, [[5, 6, 7, 5, 6]], [[5, 9, 7, 5, 6]], logit_diff(7, 9), edges).area  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from lsi.core.inputs import Batch
from lsi.errors import InputError
from lsi.locate.circuit_graph import (
    DEFAULT_BATCH_SIZE,
    CircuitGraph,
    Contrast,
    check_batch_size,
    contrast,
    edge_products,
    patched_metrics,
    per_copy,
    receiver_grads,
)
from lsi.locate.metrics import metric_name
from lsi.locate.result import By, LocateResult

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel, Metric

Direction = Literal["out", "in", "both"]
FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # circuit sizes (GROUND_TRUTH.md)


def _setup(lm: LanguageModel, clean: Any, corrupted: Any, metric: Metric,
           graph: CircuitGraph | None) -> tuple[CircuitGraph, Contrast]:
    graph = graph or CircuitGraph.of(lm)
    return graph, contrast(lm, graph, clean, corrupted, metric)


def _edge_result(graph: CircuitGraph, con: Contrast, scores: torch.Tensor, method: str, metric: Metric,
                 **settings: Any) -> LocateResult:
    shape = {"n_layers": graph.n_layers, "n_heads": graph.n_heads, "n_kv_heads": graph.n_kv_heads}
    return LocateResult.over(graph.edges, scores, method=method, metric=metric_name(metric), axis="edge",
                             n_inputs=len(con.batch.input_ids), f_corrupt=con.f_corrupt, **shape, **settings)


def _completeness(graph: CircuitGraph, scores: torch.Tensor, f_clean: float, f_corrupt: float) -> dict[str, float]:
    out_of_embed = [i for i, label in enumerate(graph.edges) if label.startswith("embed->")]
    return {"embed_edges_sum": float(scores[out_of_embed].sum()), "f_clean_minus_f_corrupt": f_clean - f_corrupt}


def eap(lm: LanguageModel, clean: Any, corrupted: Any, metric: Metric, *,
        graph: CircuitGraph | None = None) -> LocateResult:
    """Edge attribution patching: one score per edge of the residual DAG (see the module docstring).

    Example:
        >>> r = eap(lm, clean_ids, corrupt_ids, logit_diff(3, 4))  # doctest: +SKIP
        >>> r.top(5, by="abs")  # doctest: +SKIP
    """
    graph, con = _setup(lm, clean, corrupted, metric, graph)
    with con.setting():
        value, senders, grads = receiver_grads(lm, graph, con.batch, metric)
    scores = edge_products(graph, senders - con.corrupt, grads)
    f_clean = float(value)
    return _edge_result(graph, con, scores, "eap", metric, f_clean=f_clean,
                        completeness=_completeness(graph, scores, f_clean, con.f_corrupt))


def eap_ig(lm: LanguageModel, clean: Any, corrupted: Any, metric: Metric, *, steps: int = 10,
           graph: CircuitGraph | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> LocateResult:
    """EAP with integrated gradients on the input embeddings (``steps`` points ``α = k/steps``, ``k = 1..steps``).

    Several interpolation steps run in one forward as stacked copies (``batch_size`` rows per forward).

    Example:
        >>> r = eap_ig(lm, clean_ids, corrupt_ids, logit_diff(3, 4), steps=10)  # doctest: +SKIP
        >>> r.settings["completeness"]  # doctest: +SKIP
    """
    if steps < 1:
        raise InputError("steps >= 1", str(steps), "e.g. steps=10 (steps=1 is plain EAP)")
    check_batch_size(batch_size)
    graph, con = _setup(lm, clean, corrupted, metric, graph)
    with con.setting():
        cache = lm.run_with_cache(con.batch, graph.sender_sites)
    assert cache.logits is not None
    copies = per_copy(metric, con.batch)
    f_clean = float(copies(cache.logits)[0])
    e_clean, e_corrupt = cache["embed"], con.corrupt[:, :, 0]
    alphas = [k / steps for k in range(1, steps + 1)]
    per_forward = max(1, batch_size // len(con.batch.input_ids))

    def summed(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return copies(logits).sum()

    wide, total = torch.promote_types(e_clean.dtype, torch.float32), torch.zeros(())
    for start in range(0, steps, per_forward):
        chunk = alphas[start:start + per_forward]
        embed = torch.cat([torch.lerp(e_corrupt, e_clean, a) for a in chunk])
        with con.setting():
            _, _, grads = receiver_grads(lm, graph, con.batch.repeat(len(chunk)), summed, embed)
        total = total + grads.unflatten(0, (len(chunk), -1)).to(wide).sum(0)
    scores = edge_products(graph, graph.sender_values(cache) - con.corrupt, total / steps)
    return _edge_result(graph, con, scores, "eap_ig", metric, steps=steps, f_clean=f_clean,
                        completeness=_completeness(graph, scores, f_clean, con.f_corrupt))


def acdc(lm: LanguageModel, clean: Any, corrupted: Any, metric: Metric, *, threshold: float, relative: bool = False,
         graph: CircuitGraph | None = None) -> LocateResult:
    """ACDC-style pruning: remove every edge whose patching moves the metric by less than ``threshold`` (a
    fraction of ``|m(clean) − m(corrupt)|`` with ``relative=True``). Scores: the metric drop when each edge was
    tested; settings: the kept edge count and the pruned circuit's metric ``f_circuit``.

    Example:
        >>> r = acdc(lm, clean_ids, corrupt_ids, logit_diff(3, 4), threshold=0.02, relative=True)  # doctest: +SKIP
        >>> r.select(threshold=r.settings["threshold"], by="abs")  # the circuit  # doctest: +SKIP
    """
    graph, con = _setup(lm, clean, corrupted, metric, graph)
    removed = torch.zeros_like(graph.allowed)
    current = float(patched_metrics(lm, graph, con, removed[None], metric)[0])
    tau = threshold * abs(current - con.f_corrupt) if relative else threshold
    if not tau >= 0:
        raise InputError("a threshold >= 0", str(threshold), "e.g. threshold=0.02, relative=True")
    f_clean, drops = current, torch.zeros(graph.allowed.shape)
    for r in reversed(range(len(graph.receivers))):
        for s in reversed(graph.allowed[r].nonzero().flatten().tolist()):
            trial = removed.clone()
            trial[r, s] = True
            value = float(patched_metrics(lm, graph, con, trial[None], metric)[0])
            drops[r, s] = current - value
            if abs(current - value) < tau:
                removed, current = trial, value
    kept = int((graph.allowed & ~removed).sum())
    return _edge_result(graph, con, drops[graph.allowed], "acdc", metric, threshold=tau, kept=kept,
                        f_circuit=current, f_clean=f_clean)


# -- nodes ---------------------------------------------------------------------------------------------------------

_RECEIVER = re.compile(r"^blocks\.(\d+)\.attn\.([qkv])\[(\d+)\]$")


def _receiver_nodes(label: str, heads_per_kv: int) -> list[str]:
    m = _RECEIVER.match(label)
    if m is None:
        return [label]  # an MLP output or the logits
    layer, kind, index = int(m.group(1)), m.group(2), int(m.group(3))
    heads = [index] if kind == "q" else range(index * heads_per_kv, (index + 1) * heads_per_kv)
    return [f"blocks.{layer}.attn.head_out[{h}]" for h in heads]


def node_scores(edges: LocateResult, *, direction: Direction = "both") -> LocateResult:
    """Node importance from edge scores: the sum of ``|score|`` over each node's incident edges (``"both"``), its
    outgoing (``"out"``) or its incoming edges (``"in"``; a KV head's key/value edges count for each query head
    sharing it).

    Nodes: ``embed``, every ``blocks.{l}.attn.head_out[h]``, every ``blocks.{l}.mlp.out``, ``logits``.

    Example:
        >>> node_scores(eap(lm, clean_ids, corrupt_ids, metric)).top(3)  # doctest: +SKIP
    """
    if direction not in ("out", "in", "both"):
        raise InputError("direction 'out', 'in' or 'both'", repr(direction), "e.g. direction='out'")
    if edges.axes[0][0] != "edge" or "n_heads" not in edges.settings:
        raise InputError("edge scores from eap, eap_ig or acdc", f"a result over {edges.axes[0][0]!r}",
                         "pass the edge-level result")
    s = edges.settings
    heads_per_kv = int(s["n_heads"]) // int(s["n_kv_heads"])
    totals: dict[str, float] = {"embed": 0.0}
    for layer in range(int(s["n_layers"])):
        totals.update({f"blocks.{layer}.attn.head_out[{h}]": 0.0 for h in range(int(s["n_heads"]))})
        totals[f"blocks.{layer}.mlp.out"] = 0.0
    totals["logits"] = 0.0
    for label, score in edges.as_dict().items():
        sender, receiver = label.split("->")
        if direction != "in":
            totals[sender] += abs(score)
        if direction != "out":
            for node in _receiver_nodes(receiver, heads_per_kv):
                totals[node] += abs(score)
    return LocateResult.over(list(totals), list(totals.values()), method=f"{edges.method}_nodes",
                             metric=edges.metric, axis="node", direction=direction, edge_method=edges.method)


# -- faithfulness --------------------------------------------------------------------------------------------------

def faithfulness(lm: LanguageModel, clean: Any, corrupted: Any, metric: Metric, circuit: Iterable[str], *,
                 graph: CircuitGraph | None = None) -> float:
    """``f(C) = (m(C) − m(∅)) / (m(full) − m(∅))`` with every edge outside ``circuit`` (edge labels) patched to
    the corrupted run: 1 = the circuit alone carries the clean behaviour, 0 = none of it.

    Example:
        >>> faithfulness(lm, clean_ids, corrupt_ids, metric, edges.select(k=10, by="abs"))  # doctest: +SKIP
    """
    graph, con = _setup(lm, clean, corrupted, metric, graph)
    keep = graph.mask(circuit)
    full, empty, value = patched_metrics(lm, graph, con, torch.stack([~graph.allowed, graph.allowed, ~keep]),
                                         metric).tolist()
    return (value - empty) / (full - empty)


@dataclass(frozen=True)
class FaithfulnessCurve:
    """Faithfulness of the top-k edges for each circuit size (a fraction of all edges, rounded up)."""

    fractions: tuple[float, ...]
    sizes: tuple[int, ...]
    values: tuple[float, ...]
    f_full: float
    f_empty: float
    by: By

    def _area(self, ys: Sequence[float]) -> float:
        xs = [math.log10(f) for f in self.fractions]
        if len(xs) < 2:
            return float(ys[0])
        trapezoids = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:], strict=False))
        return trapezoids / (xs[-1] - xs[0])

    @property
    def area(self) -> float:
        """Area under ``f`` over log10(fraction), normalized so a curve at 1 has area 1 (higher is better)."""
        return self._area(self.values)

    @property
    def area_from_one(self) -> float:
        """Area of ``|1 − f|`` on the same axis (lower is better)."""
        return self._area([abs(1 - v) for v in self.values])


def faithfulness_curve(lm: LanguageModel, clean: Any, corrupted: Any, metric: Metric, edges: LocateResult, *,
                       by: By = "signed", fractions: Sequence[float] = FRACTIONS, graph: CircuitGraph | None = None,
                       batch_size: int = DEFAULT_BATCH_SIZE) -> FaithfulnessCurve:
    """Faithfulness of the top ``ceil(fraction × n_edges)`` edges by ``edges`` (signed or ``|score|``) for each
    fraction; every circuit is one copy in a batched forward. GROUND_TRUTH.md grades ``area`` with ``by="signed"``
    and ``area_from_one`` with ``by="abs"``.

    Example:
        >>> curve = faithfulness_curve(lm, clean_ids, corrupt_ids, metric, eap_ig(...))  # doctest: +SKIP
        >>> curve.values, curve.area  # doctest: +SKIP
    """
    if not fractions or any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(fractions):
        raise InputError("increasing fractions in (0, 1]", str(list(fractions)), "e.g. (0.01, 0.1, 0.5, 1.0)")
    graph, con = _setup(lm, clean, corrupted, metric, graph)
    if tuple(edges.labels) != graph.edges:
        raise InputError("edge scores over this model's graph", f"a result over {edges.shape} labels",
                         "score the edges of the same model with eap, eap_ig or acdc")
    sizes = [math.ceil(f * len(graph.edges)) for f in fractions]
    keeps = [graph.mask(edges.select(k=k, by=by)) for k in sizes]
    masks = torch.stack([~graph.allowed, graph.allowed, *[~keep for keep in keeps]])
    full, empty, *values = patched_metrics(lm, graph, con, masks, metric, batch_size=batch_size).tolist()
    return FaithfulnessCurve(tuple(fractions), tuple(sizes), tuple((v - empty) / (full - empty) for v in values),
                             full, empty, by)
