"""Padding-aware position selectors.

Indices count real tokens only, so position 0 is the first real token of each row whatever the padding side,
and ``-1`` is the last. A selector turns ``(input_ids, attention_mask)`` into a boolean mask ``[batch, pos]``
(for interventions) or absolute indices ``[batch, k]`` (for gathering a cache).

Example:
    >>> import torch
    >>> ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 5]]); mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    >>> Last().index(ids, mask).tolist()
    [[3], [3]]
    >>> Index(0).index(ids, mask).tolist()
    [[2], [0]]
    >>> Match(5).mask(ids, mask).int().tolist()
    [[0, 0, 1, 0], [0, 0, 0, 1]]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lsi.errors import IndexOutOfRangeError, InputError


class Positions:
    """Base selector. Subclasses implement :meth:`mask`."""

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def index(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Absolute indices ``[batch, k]``; every row must select the same number of positions."""
        m = self.mask(input_ids, attention_mask)
        counts = m.sum(1)
        if counts.numel() and not bool((counts == counts[0]).all()):
            raise InputError(f"{self} to select the same number of positions in every row",
                             f"counts {counts.tolist()}", "use a selector with one hit per row, or run rows apart")
        k = int(counts[0]) if counts.numel() else 0
        ar = torch.arange(m.shape[1], device=m.device).expand_as(m)
        return ar[m].view(m.shape[0], k)


def _real_positions(attention_mask: torch.Tensor) -> list[torch.Tensor]:
    return [torch.nonzero(row, as_tuple=True)[0] for row in attention_mask.bool()]


@dataclass(frozen=True)
class All(Positions):
    """Every real (non-padding) token."""

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return attention_mask.bool()

    def __str__(self) -> str:
        return "all"


@dataclass(frozen=True)
class Index(Positions):
    """Real-token indices (negative counts from the end): ``Index(0)``, ``Index([2, -1])``."""

    indices: tuple[int, ...]

    def __init__(self, indices: int | list[int] | tuple[int, ...]) -> None:
        object.__setattr__(self, "indices", (indices,) if isinstance(indices, int) else tuple(indices))

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(attention_mask, dtype=torch.bool)
        for row, real in enumerate(_real_positions(attention_mask)):
            n = len(real)
            for i in self.indices:
                if not -n <= i < n:
                    raise IndexOutOfRangeError(f"a position in [-{n}, {n - 1}] (row {row} has {n} real tokens)",
                                               f"position {i}", "choose a position inside every sequence")
                out[row, real[i]] = True
        return out

    def __str__(self) -> str:
        return ",".join(str(i) for i in self.indices)


@dataclass(frozen=True)
class Last(Positions):
    """The last real token of each row."""

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return Index(-1).mask(input_ids, attention_mask)

    def __str__(self) -> str:
        return "last"


@dataclass(frozen=True)
class Span(Positions):
    """Real tokens ``start:stop`` (Python slice semantics, per row)."""

    start: int | None = None
    stop: int | None = None

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(attention_mask, dtype=torch.bool)
        for row, real in enumerate(_real_positions(attention_mask)):
            out[row, real[self.start:self.stop]] = True
        return out

    def __str__(self) -> str:
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"


@dataclass(frozen=True)
class Match(Positions):
    """Every token of every occurrence of a token-id sequence (``Match(5)`` or ``Match([12, 40])``)."""

    token_ids: tuple[int, ...]

    def __init__(self, token_ids: int | list[int] | tuple[int, ...]) -> None:
        ids = (token_ids,) if isinstance(token_ids, int) else tuple(token_ids)
        if not ids:
            raise InputError("at least one token id to match", "an empty sequence", "pass the ids to look for")
        object.__setattr__(self, "token_ids", ids)

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        n = len(self.token_ids)
        target = torch.tensor(self.token_ids, device=input_ids.device)
        hits = torch.zeros_like(attention_mask, dtype=torch.bool)
        if input_ids.shape[1] >= n:
            windows = input_ids.unfold(1, n, 1)  # [b, p-n+1, n]
            starts = (windows == target).all(-1) & attention_mask.bool()[:, : windows.shape[1]]
            for offset in range(n):
                hits[:, offset: offset + starts.shape[1]] |= starts
        return hits & attention_mask.bool()

    def __str__(self) -> str:
        return "match(" + ",".join(str(i) for i in self.token_ids) + ")"


PositionSpec = Positions | str | int | list[int] | tuple[int, ...] | slice | None


def as_positions(spec: PositionSpec) -> Positions:
    """Normalize ``None``/``"all"``, ``"last"``, an int, a list of ints or a slice into a selector."""
    if isinstance(spec, Positions):
        return spec
    if spec is None or spec == "all":
        return All()
    if spec == "last":
        return Last()
    if isinstance(spec, bool):
        raise InputError("positions", repr(spec), "use 'all', 'last', an int, a list of ints or a slice")
    if isinstance(spec, int):
        return Index(spec)
    if isinstance(spec, slice):
        if spec.step not in (None, 1):
            raise InputError("a slice without a step", repr(spec), "select positions with a list of ints instead")
        return Span(spec.start, spec.stop)
    if isinstance(spec, (list, tuple)) and all(isinstance(i, int) for i in spec):
        return Index(spec)
    raise InputError("positions: 'all', 'last', an int, a list of ints, a slice or a Positions object",
                     repr(spec), "e.g. positions='last' or positions=[0, -1] or lsi.Match(token_id)")
