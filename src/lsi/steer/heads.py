"""Head-level steering: Inference-Time Intervention (ITI, Li et al. 2023).

:func:`iti_heads` reads every head's mixed value ``z_h`` (site ``blocks.{l}.attn.z[h]``, the head's slice of the
output projection's input) at one position of positive and negative inputs, and per head

* ranks it by the held-out accuracy of a linear probe separating the two sets (:func:`lsi.locate.probing.probe`);
* takes the mass-mean direction ``θ_h = μ⁺_h − μ⁻_h`` (unit ``θ̂_h``) and ``σ_h``, the standard deviation of
  every input's activation projected on ``θ̂_h`` (both sets together); ``|θ_h| / σ_h`` (the separation of the two
  means in units of that spread) breaks ties of accuracy, which saturates when many heads decode the contrast.

:class:`HeadShift` adds ``α · σ_h · θ̂_h`` to ``z_h`` of the top ``K`` heads at every position. A constant shift
``s`` of ``z_h`` adds ``W_O[h] s`` to the attention output, so a head shift folds into the output projection's bias
(:func:`lsi.steer.export.fold`).

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> pos = [[5, 6, 40 + i] for i in range(10)]; neg = [[5, 6, 70 + i] for i in range(10)]
    >>> found = iti_heads(lm, pos, neg)
    >>> tuple(found.directions.shape), found.accuracy.labels[:2]
    ((2, 4, 8), ['blocks.0.attn.z[0]', 'blocks.0.attn.z[1]'])
    >>> shift = found.steering(k=2, alpha=5.0)
    >>> len(shift.heads), shift.alpha
    (2, 5.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lsi.arch.dims import get_module
from lsi.core.folding import Folding, Writer, bias_of, check_everywhere
from lsi.core.identity import ModelIdentity, as_identity
from lsi.core.interventions import Add, Intervention
from lsi.core.positions import All, Positions, PositionSpec, as_positions
from lsi.core.sites import Site
from lsi.core.steering import (
    Scope,
    Steering,
    check_finite,
    check_scaled,
    check_scope,
    positions_from_json,
    positions_json,
)
from lsi.errors import IndexOutOfRangeError, InputError, ShapeMismatchError
from lsi.locate.probing import ProbePosition, probe

if TYPE_CHECKING:
    from lsi.core.inputs import Batch, Inputs
    from lsi.core.model import LanguageModel
    from lsi.locate.result import LocateResult

Z_SITES = "blocks.*.attn.z"


@dataclass(frozen=True, eq=False, repr=False)
class HeadShift(Steering):
    """``z_h <- z_h + alpha * shift_h`` for each head ``(layer, head)`` of ``heads`` (``shifts``: one
    ``[d_head]`` row per head, in the head's mixed-value space), at ``positions`` with ``scope`` as in
    :mod:`lsi.core.interventions`. Folds into the output projection's bias when applied at every position.

    Example:
        >>> HeadShift([(1, 2), (0, 3)], torch.ones(2, 8), alpha=3.0)
        HeadShift(heads=[(1, 2), (0, 3)], alpha=3, |shift| mean=2.83, positions=all, scope=all)
    """

    heads: tuple[tuple[int, int], ...]
    shifts: torch.Tensor
    alpha: float = 1.0
    positions: Positions = dataclasses.field(default_factory=All)
    scope: Scope = "all"
    model: ModelIdentity | None = None

    def __init__(self, heads: Sequence[tuple[int, int]], shifts: torch.Tensor, alpha: float = 1.0, *,
                 positions: PositionSpec = "all", scope: Scope = "all",
                 model: LanguageModel | ModelIdentity | None = None) -> None:
        pairs = tuple((int(layer), int(head)) for layer, head in heads)
        if not pairs or len(set(pairs)) != len(pairs):
            raise InputError("one or more distinct (layer, head) pairs", repr(list(pairs)),
                             "list each head once, e.g. heads=[(0, 1), (1, 3)]")
        s = torch.as_tensor(shifts).detach().float().cpu().clone()
        if s.dim() != 2 or s.shape[0] != len(pairs):
            raise ShapeMismatchError(f"shifts of shape [{len(pairs)}, d_head] (one row per head)",
                                     f"shape {tuple(s.shape)}", "stack one d_head-wide shift per head")
        check_finite(s, "head shift")
        check_scope(scope)
        object.__setattr__(self, "heads", pairs)
        object.__setattr__(self, "shifts", s)
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "positions", as_positions(positions))
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "model", as_identity(model))
        check_scaled(self.alpha, self.shifts, torch.float32, "shifts")

    def layer_shifts(self, lm: LanguageModel) -> dict[int, torch.Tensor]:
        """Per layer with a shifted head, the unscaled shift of every head ``[n_heads, d_head]`` (zero rows for
        the heads left alone), checked against ``lm``."""
        d = lm.dims
        if self.shifts.shape[1] != d.d_head:
            raise ShapeMismatchError(f"head shifts of width d_head={d.d_head}", f"width {self.shifts.shape[1]}",
                                     "compute the shifts on this model (iti_heads)")
        out: dict[int, torch.Tensor] = {}
        for (layer, head), shift in zip(self.heads, self.shifts, strict=True):
            if not (0 <= layer < d.n_layers and 0 <= head < d.n_heads):
                raise IndexOutOfRangeError(f"heads with layer in [0, {d.n_layers - 1}] and head in "
                                           f"[0, {d.n_heads - 1}]", f"({layer}, {head})",
                                           f"this model has {d.n_layers} layers of {d.n_heads} heads")
            out.setdefault(layer, torch.zeros(d.n_heads, d.d_head))[head] = shift
        return out

    def _ops(self, lm: LanguageModel) -> list[Intervention]:
        check_scaled(self.alpha, self.shifts, lm.weights.W_E.dtype, "shifts")
        return [Add(f"blocks.{layer}.attn.z", block, self.alpha, positions=self.positions, scope=self.scope)
                for layer, block in sorted(self.layer_shifts(lm).items())]

    def folding(self, lm: LanguageModel) -> Folding:
        """At every position: a bias ``W_O s`` on each shifted layer's attention output projection (exact also under
        a post-attention norm, which acts after the projection); it reads ``W_O``, so no other leaf may rescale
        those layers' projections."""
        check_everywhere(self, "an addition")
        layers = frozenset(self.layer_shifts(lm))
        return Folding(self._fold, layers=layers, reads=layers)

    def _fold(self, lm: LanguageModel) -> None:
        for layer, z_shift in self.layer_shifts(lm).items():
            path = lm.spec.layer_path(layer, lm.spec.o_proj)
            writer = Writer(f"blocks.{layer}.attn.out", path, get_module(lm.model, path), lm.spec.conv1d)
            bias = bias_of(lm, writer)
            delta = writer.weight.detach().double() @ (self.alpha * z_shift.double().flatten()).to(bias.device)
            with torch.no_grad():
                bias.copy_((bias.double() + delta).to(bias.dtype))

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return ({"heads": [list(h) for h in self.heads], "alpha": self.alpha,
                 "positions": positions_json(self.positions), "scope": self.scope}, {"shifts": self.shifts})

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelIdentity) -> HeadShift:
        return cls([tuple(h) for h in meta["heads"]], tensors["shifts"], meta["alpha"],
                   positions=positions_from_json(meta["positions"]), scope=meta["scope"], model=model)

    def __repr__(self) -> str:
        return (f"HeadShift(heads={list(self.heads)}, alpha={self.alpha:g}, "
                f"|shift| mean={float(self.shifts.norm(dim=1).mean()):.3g}, positions={self.positions}, "
                f"scope={self.scope})")


@dataclass(frozen=True)
class ITIDirections:
    """What :func:`iti_heads` found: ``accuracy`` (held-out probe accuracy per head, labels
    ``blocks.{l}.attn.z[h]``, the probe's other measures in its settings), unit mass-mean directions
    ``directions`` ``[n_layers, n_heads, d_head]`` (zero for a head whose two means coincide), ``sigma`` and
    ``separation`` ``|θ_h| / σ_h``, both ``[n_layers, n_heads]``."""

    accuracy: LocateResult
    directions: torch.Tensor
    sigma: torch.Tensor
    separation: torch.Tensor
    model: ModelIdentity

    def top_heads(self, k: int) -> list[tuple[int, int]]:
        """The ``k`` heads of highest probe accuracy, best first (ties: larger separation first)."""
        n = self.sigma.numel()
        if not 1 <= k <= n:
            raise InputError(f"k in [1, {n}] (the number of heads)", str(k), "choose how many heads to shift")
        scored = []
        for label, acc in self.accuracy.as_dict().items():
            site = Site.parse(label)
            layer, head = int(site.layer), int(site.index)  # type: ignore[arg-type]
            scored.append((-acc, -float(self.separation[layer, head]), layer, head))
        return [(layer, head) for *_, layer, head in sorted(scored)[:k]]

    def shifts(self, heads: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``σ_h θ̂_h`` for each head: ``[len(heads), d_head]``."""
        return torch.stack([self.sigma[layer, head] * self.directions[layer, head] for layer, head in heads])

    def steering(self, k: int, alpha: float, *, positions: PositionSpec = "all", scope: Scope = "all",
                 model: LanguageModel | ModelIdentity | None = None) -> HeadShift:
        """ITI: shift each of the top ``k`` heads by ``alpha · σ_h · θ̂_h`` (towards the positive set for
        ``alpha > 0``)."""
        heads = self.top_heads(k)
        return HeadShift(heads, self.shifts(heads), alpha, positions=positions, scope=scope,
                         model=model if model is not None else self.model)


def iti_heads(lm: LanguageModel, positive: Inputs | Batch, negative: Inputs | Batch, *,
              positions: ProbePosition = "last", folds: int = 2, heldout: float = 0.2, l2: float = 1e-3,
              seed: int = 0, batch_size: int = 64) -> ITIDirections:
    """Probe accuracy, mass-mean direction and projected standard deviation of every head's ``z`` (see the module
    docstring), read at ``positions``: ``"last"`` real token, one real-token index, or ``"mean"`` over the real
    tokens. ``folds``, ``heldout``, ``l2`` and ``seed`` go to :func:`lsi.locate.probing.probe`.
    """
    rows = _token_rows(lm, positive)
    n_pos = len(rows)
    rows += _token_rows(lm, negative)
    labels = [1] * n_pos + [0] * (len(rows) - n_pos)
    accuracy = probe(lm, rows, labels, Z_SITES, positions=positions, control=False, folds=folds, heldout=heldout,
                     l2=l2, seed=seed)
    z = head_features(lm, rows, positions=positions, batch_size=batch_size)  # [n, L, H, d_head]
    is_pos = torch.tensor(labels, dtype=torch.bool)
    theta = z[is_pos].mean(0) - z[~is_pos].mean(0)
    norm = theta.norm(dim=-1, keepdim=True)
    unit = torch.where(norm > 0, theta / norm.clamp_min(1e-300), torch.zeros_like(theta))
    sigma = (z * unit).sum(-1).std(0, unbiased=False)
    separation = torch.where(sigma > 0, norm[..., 0] / sigma.clamp_min(1e-300), torch.zeros_like(sigma))
    return ITIDirections(accuracy, unit.float(), sigma.float(), separation.float(), ModelIdentity.of(lm))


def head_features(lm: LanguageModel, inputs: Inputs | Batch, *, positions: ProbePosition = "last",
                  batch_size: int = 64) -> torch.Tensor:
    """Every head's ``z`` per input: ``[n, n_layers, n_heads, d_head]`` (float64, CPU) at one real-token position
    (``"last"`` or an int) or averaged over the real tokens (``"mean"``), streamed ``batch_size`` rows at a time.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
        >>> tuple(head_features(lm, [[5, 6, 7], [8, 9]], positions="mean").shape)
        (2, 2, 4, 8)
    """
    pooled = positions == "mean"
    out = []
    for batch in lm.batches(inputs, batch_size):
        cache = lm.run_with_cache(batch, Z_SITES, positions=None if pooled else positions, device="cpu")
        z = cache.stack(Z_SITES).double()  # [L, b, p, H, d_head]
        if pooled:
            real = batch.attention_mask.cpu().double()[None, :, :, None, None]
            z = (z * real).sum(2) / real.sum(2)
        else:
            z = z[:, :, 0]
        out.append(z.transpose(0, 1))
    return torch.cat(out)


def _token_rows(lm: LanguageModel, inputs: Inputs | Batch) -> list[list[int]]:
    """The real token ids of every input (text tokenized, padding dropped)."""
    batch = lm.to_batch(inputs)
    return [ids[mask].tolist() for ids, mask in zip(batch.input_ids.cpu(), batch.attention_mask.cpu().bool(),
                                                       strict=True)]
