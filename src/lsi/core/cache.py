"""ActivationCache: site values from one run, addressed by site strings or :class:`Site` objects.

Values are stored per concrete site without index; ``cache["blocks.0.attn.z[3]"]`` slices head 3 out. When the
run selected positions, every value has a position axis of that length (``[batch, k, ...]``) and
``cache.positions`` holds the absolute indices ``[batch, k]``.

Example:
    >>> import torch
    >>> c = ActivationCache({"blocks.0.attn.z": torch.arange(24.).view(1, 2, 3, 4)}, n_layers=2)
    >>> c["blocks.-2.attn.z[1]"].shape
    torch.Size([1, 2, 4])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from lsi.core.sites import Site
from lsi.errors import SiteError


class ActivationCache(Mapping[str, torch.Tensor]):
    """Read-only mapping from concrete site strings to tensors, plus the inputs that produced them."""

    def __init__(self, values: dict[str, torch.Tensor], *, n_layers: int, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                 logits: torch.Tensor | None = None) -> None:
        self._values = dict(values)
        self.n_layers = n_layers
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.positions = positions
        self.logits = logits

    def _key(self, site: str | Site) -> tuple[Site, str]:
        s = Site.parse(site)
        if s.is_pattern:
            raise SiteError("a concrete site (one layer)", str(s), "use cache.stack(pattern) for several layers")
        concrete = s.expand(self.n_layers)[0]
        key = str(concrete.without_index())
        if key not in self._values:
            raise SiteError(f"a cached site (cached: {', '.join(self._values) or 'none'})", key,
                            "add it to sites= when running")
        return concrete, key

    def full(self, site: str | Site) -> torch.Tensor:
        """The whole cached value of a site, ignoring any head/neuron index in ``site``."""
        return self._values[self._key(site)[1]]

    def __getitem__(self, site: str | Site) -> torch.Tensor:
        concrete, key = self._key(site)
        value = self._values[key]
        idx = concrete.indices()
        if idx is None:
            return value
        axis = concrete.info.index_axis
        assert axis is not None
        picked = value.index_select(axis, torch.tensor(idx, device=value.device))
        return picked.squeeze(axis) if isinstance(concrete.index, int) else picked

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, site: object) -> bool:
        try:
            self._key(site)  # type: ignore[arg-type]
        except (SiteError, ValueError):
            return False
        return True

    def stack(self, pattern: str | Site) -> torch.Tensor:
        """Values of a layer pattern stacked on a new leading layer axis: ``[n_layers_selected, ...]``."""
        return torch.stack([self[s] for s in Site.parse(pattern).expand(self.n_layers)])

    def mean(self, site: str | Site) -> torch.Tensor:
        """Mean over batch and real positions (for mean ablation): the site's shape without batch and pos."""
        value = self[site]
        axis = Site.parse(site).info.position_axis
        if self.attention_mask is None or self.positions is not None:
            return value.mean(dim=(0, axis))
        mask = self.attention_mask.bool().to(value.device)
        moved = value.movedim(axis, 1)[mask]  # [n_real_tokens, ...]
        return moved.mean(0)

    def to(self, device: str | torch.device) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._values.items()}, n_layers=self.n_layers,
                               input_ids=self.input_ids, attention_mask=self.attention_mask,
                               positions=self.positions, logits=self.logits)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._values.items())
        return f"ActivationCache({shapes})"
