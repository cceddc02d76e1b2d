"""Typed errors. Each one says what was expected, what was found and how to fix it.

Example:
    >>> try:
    ...     raise SiteError("a site name", "blocks.0.resid_prre", "did you mean 'blocks.0.resid_pre'?")
    ... except LsiError as err:
    ...     print(err.fix)
    did you mean 'blocks.0.resid_pre'?
"""

from __future__ import annotations


class LsiError(Exception):
    """Base class of every error lsi raises on purpose."""

    def __init__(self, expected: str, found: str, fix: str) -> None:
        self.expected, self.found, self.fix = expected, found, fix
        super().__init__(f"expected {expected}; found {found}. Fix: {fix}")


class SiteError(LsiError, KeyError):
    """A site string or selector that does not name a site (misspelled, malformed)."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return Exception.__str__(self)


class SiteUnavailableError(LsiError):
    """A well-formed site that this model family does not have (e.g. resid_mid under parallel attention)."""


class ReadOnlySiteError(LsiError):
    """An intervention on a site that can be read but not written (e.g. attention patterns)."""


class IndexOutOfRangeError(LsiError, IndexError):
    """A layer, head, neuron or position index outside the model or the sequence."""


class InputError(LsiError, ValueError):
    """Inputs that cannot be run: empty, wrong type, missing tokenizer, mismatched batch."""


class ShapeMismatchError(LsiError, ValueError):
    """A tensor (patch source, vector, value) whose shape does not fit the site it is applied to."""


class UnknownArchitectureError(LsiError):
    """A model whose structure lsi could not map onto its site contract and verify."""


class AttentionImplementationError(LsiError):
    """A request that needs a specific attention implementation (attention patterns need eager)."""


class StoreError(LsiError):
    """An activation store on disk that is missing, incomplete or written for other settings."""


class CheckpointError(InputError):
    """A checkpoint on disk that cannot be loaded as it is: truncated or corrupt, pickle-only, or with missing,
    unexpected or wrongly shaped tensors (which would otherwise leave randomly initialized weights)."""


class ModelMismatchError(InputError):
    """Something made for another model: a steering, weight edit, tuned lens or activation store whose model
    identity (family, dimensions, fingerprint of the weights it was computed on) differs from the model given."""


class NonFiniteSteeringError(LsiError, ArithmeticError):
    """A steering whose values or strength are NaN / infinite, or whose interventions make a forward pass produce
    NaN / infinite logits or overflow the residual stream."""


class NonFiniteMetricError(LsiError, ArithmeticError):
    """A locate metric that returned NaN or an infinite value (scores computed from it would be NaN)."""


class NotSerializableError(LsiError):
    """A steering that holds something only memory can keep (a patch source cache, a Python function)."""


class NotFoldableError(LsiError):
    """A steering that cannot be folded into the model's weights exactly."""
