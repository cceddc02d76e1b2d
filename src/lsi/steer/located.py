"""Targets from a locate result: the sites of its top objects, heads or neurons of one layer merged into one site.

Example:
    >>> import lsi
    >>> from lsi.locate.result import LocateResult
    >>> r = LocateResult.over(["blocks.0.mlp.post[4]", "blocks.1.mlp.post[2]", "blocks.0.mlp.post[1]"],
    ...                       [0.9, 0.1, 0.5], method="demo")
    >>> lsi.compose(lsi.Zero(s) for s in located_sites(r, 2))
    Zero(blocks.0.mlp.post[1,4])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lsi.core.sites import SITE_KINDS, Site
from lsi.errors import InputError, SiteError

if TYPE_CHECKING:
    from lsi.locate.result import By, LocateResult


def located_sites(result: LocateResult, k: int, *, by: By = "signed", head_site: str = "attn.head_out") -> list[str]:
    """Sites of the top ``k`` objects of ``result``, heads or neurons of one layer merged into one site
    (:func:`group_units`).

    Labels must name sites (``blocks.1.mlp.post[17]``, ``blocks.3.attn.head_out[2]``, ``blocks.0.mlp.out``: one
    axis of objects, as from LAPE, activation statistics, patching and probing), or the result is a
    ``layer × head`` grid (attention head scores, head weight norms), read as ``blocks.{layer}.{head_site}[head]``.

    Example:
        >>> import torch
        >>> from lsi.locate.result import LocateResult
        >>> grid = LocateResult(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), (("layer", ("0", "1")), ("head", ("0", "1"))),
        ...                     method="demo")
        >>> located_sites(grid, 2)
        ['blocks.0.attn.head_out[1]', 'blocks.1.attn.head_out[0]']
    """
    if not 1 <= k <= result.scores.numel():
        raise InputError(f"k in [1, {result.scores.numel()}] (the number of scored objects)", str(k),
                         "choose how many of the located objects to target")
    kind = SITE_KINDS.get(head_site)
    if kind is None or kind.index_name != "n_heads":
        raise InputError("head_site naming a per-head kind (attn.head_out, attn.z, attn.q)", repr(head_site),
                         "e.g. head_site='attn.z'")
    axes = tuple(name for name, _ in result.axes)
    chosen = result.select(k=k, by=by)
    if axes == ("layer", "head"):
        return group_units([Site(head_site, int(layer), int(head)) for layer, head in
                            (label.split("@") for label in chosen)])
    if len(axes) != 1:
        raise InputError("a result over one axis of site labels, or a layer × head grid", f"axes {axes}",
                         "pick one slice of the result first (e.g. one position) and build a LocateResult.over it")
    return group_units([_label_site(label) for label in chosen])


def _label_site(label: str) -> Site:
    try:
        site = Site.parse(label)
    except SiteError:
        raise InputError("object labels that name sites, like 'blocks.1.mlp.post[17]'", repr(label),
                         "locate heads, neurons or sites (not layers, rows or edges) to target them") from None
    if site.is_pattern:
        raise InputError("labels of concrete sites", repr(label), "locate objects of one layer each")
    return site


def group_units(sites: Sequence[str | Site]) -> list[str]:
    """Indexed sites of one kind and layer merged into one site listing every index (sorted, first appearance
    order of the groups); sites without an index, and patterns, are kept as they are.

    Example:
        >>> group_units(["blocks.1.mlp.post[7]", "blocks.0.mlp.post[3]", "blocks.1.mlp.post[2]", "embed"])
        ['blocks.1.mlp.post[2,7]', 'blocks.0.mlp.post[3]', 'embed']
    """
    groups: dict[str, list[int] | None] = {}  # None: kept as it is
    for s in map(Site.parse, sites):
        indices = s.indices()
        if indices is None or s.is_pattern:
            groups.setdefault(str(s), None)
        else:
            merged = groups.setdefault(f"{s.without_index()}[]", [])
            assert merged is not None
            merged.extend(indices)
    out = []
    for name, merged in groups.items():
        if merged is None:
            out.append(name)
            continue
        unique = sorted(set(merged))
        base = Site.parse(name[:-2])
        out.append(str(Site(base.kind, base.layer, unique[0] if len(unique) == 1 else tuple(unique))))
    return out
