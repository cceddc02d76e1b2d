"""Model identity: what a steering, weight edit, tuned lens or activation store was made for.

A :class:`ModelIdentity` holds the model family and dimensions, and optionally a fingerprint of the named
parameters something was computed on (a weight edit's edited parameters, a lens's unembedding and final norm).
:meth:`ModelIdentity.check` raises :class:`~lsi.errors.ModelMismatchError` (expected / found / fix) for any other
model.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> identity = ModelIdentity.of(lm)
    >>> str(identity)
    'gpt2 model with n_layers=2, d_model=32'
    >>> ModelIdentity.from_json(identity.to_json()) == identity
    True
    >>> try:
    ...     identity.check(lsi.LanguageModel(tiny_model("gpt2", num_hidden_layers=3)), "a vector made for")
    ... except ModelMismatchError as err:
    ...     print(err.found)
    a gpt2 model with n_layers=3, d_model=32 (n_layers differs)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lsi.arch.dims import ModelDims
from lsi.errors import ModelMismatchError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

_FIX = "use it with the model it was made for, or make it again on this model"


def model_parameters(lm: LanguageModel, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The named parameters of ``lm`` (tied ones under every name); :class:`ModelMismatchError` if any is
    missing."""
    params = dict(lm.model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        raise ModelMismatchError(f"parameters {missing[:3]} in the model", f"a {lm.family} model without them",
                                 "compute it on this model (parameter names come from model.named_parameters)")
    return {n: params[n] for n in names}


def weights_fingerprint(lm: LanguageModel, names: Sequence[str]) -> str:
    """A short hash of ``lm``'s dimensions and the values of the named parameters, in the order given."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(lm.dims), sort_keys=True).encode())
    params = model_parameters(lm, names)
    for name in names:
        h.update(params[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    """Family and dimensions of a model and, optionally, the fingerprint of its ``parameters``' values."""

    family: str
    dims: ModelDims
    parameters: tuple[str, ...] = ()
    fingerprint: str | None = None

    @classmethod
    def of(cls, lm: LanguageModel, parameters: Sequence[str] = ()) -> ModelIdentity:
        """``lm``'s identity; with ``parameters`` also the fingerprint of their current values."""
        names = tuple(parameters)
        return cls(lm.family, lm.dims, names, weights_fingerprint(lm, names) if names else None)

    @property
    def shape(self) -> ModelIdentity:
        """This identity without a fingerprint (family and dimensions only)."""
        return ModelIdentity(self.family, self.dims)

    def check(self, lm: LanguageModel, what: str, fix: str = _FIX) -> None:
        """Raise :class:`ModelMismatchError` unless ``lm`` has this family, these dimensions and (with a
        fingerprint) these parameter values. ``what`` reads before the identity, e.g. ``"a steering made for"``."""
        found = ModelIdentity(lm.family, lm.dims)
        if found != self.shape:
            differs = [f.name for f in dataclasses.fields(ModelDims) if getattr(self.dims, f.name) !=
                       getattr(lm.dims, f.name)] or ["family"]
            raise ModelMismatchError(f"{what} a {self}", f"a {found} ({', '.join(differs)} differs)", fix)
        if self.fingerprint is not None:
            now = weights_fingerprint(lm, self.parameters)
            if now != self.fingerprint:
                raise ModelMismatchError(
                    f"{what} weights with fingerprint {self.fingerprint} ({len(self.parameters)} parameters)",
                    f"weights with fingerprint {now}",
                    "use the model it was computed on (not one already edited, fine-tuned or another checkpoint), "
                    "or compute it again on this model")

    def to_json(self) -> dict[str, Any]:
        """``{"family", "dims"}`` plus ``parameters`` and ``fingerprint`` when there is one."""
        record: dict[str, Any] = {"family": self.family, "dims": dataclasses.asdict(self.dims)}
        if self.fingerprint is not None:
            record.update(parameters=list(self.parameters), fingerprint=self.fingerprint)
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> ModelIdentity:
        return cls(record["family"], ModelDims(**record["dims"]), tuple(record.get("parameters", ())),
                   record.get("fingerprint"))

    def __str__(self) -> str:
        return f"{self.family} model with n_layers={self.dims.n_layers}, d_model={self.dims.d_model}"


def as_identity(model: LanguageModel | ModelIdentity | None) -> ModelIdentity | None:
    """``None``, an identity as is, or the identity (without fingerprint) of a model."""
    return model if model is None or isinstance(model, ModelIdentity) else ModelIdentity.of(model)
