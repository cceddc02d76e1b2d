"""Shared checks of the bad-input suite: every refusal is a typed error with a remedy and changes nothing.

(Not a conftest.py: a second module named ``conftest`` would shadow the top-level one for ``from conftest import``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from core_helpers import assert_no_hooks

from lsi.errors import LsiError


def assert_remedy(err: BaseException) -> None:
    """``err`` is an :class:`LsiError` whose message says what was expected, what was found and the fix."""
    assert isinstance(err, LsiError), f"{type(err).__name__}: {err}"
    assert err.expected and err.found and err.fix
    assert str(err).startswith("expected ") and "; found " in str(err) and ". Fix: " in str(err)


@contextmanager
def refuse(error: type[LsiError], model: torch.nn.Module | None = None, match: str | None = None) -> Iterator[Any]:
    """Expect ``error`` (with a remedy) inside the block; afterwards ``model`` has no hooks and the same weights."""
    before = None if model is None else {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match) as info:
        yield info
    assert_remedy(info.value)
    if model is not None:
        assert_no_hooks(model)
        after = model.state_dict()
        assert before is not None and before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before), "weights changed"
