"""Shared fixtures: tiny random models of every registered family, the stories260k checkpoint and SmolLM2."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from core_helpers import SMOLLM2_FILE

# Tiny models run far faster on one intra-op thread: with several, the CPU time goes to thread hand-offs, and on a
# busy 2-core machine the core suite took 10x longer. LSI_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("LSI_TEST_THREADS", "1")))

# tests/conftest.py -> repo root (parents[1]) -> ../shared/models/stories260k
STORIES_DIR = (Path(__file__).parents[1] / ".." / "shared" / "models" / "stories260k").resolve()


class CharTokenizer:
    """A minimal tokenizer stand-in (what ``lsi`` needs: ``__call__`` -> ``{"input_ids": [...]}``).

    Each character maps to ``3 + ord(c) % 90`` (ids 3..92 < 97, the tiny vocab); no special tokens, so an empty
    string has no tokens.
    """

    pad_token_id = 0

    def __init__(self, padding_side: str = "right") -> None:
        self.padding_side = padding_side

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": [3 + ord(c) % 90 for c in text]}


def _make(family: str, tokenizer: Any = None, **overrides: Any) -> Any:
    import lsi
    from lsi.testing import tiny_model

    return lsi.LanguageModel(tiny_model(family, **overrides), tokenizer)


@pytest.fixture(scope="session")
def tiny_lm() -> Callable[..., Any]:
    """Factory ``tiny_lm(family, **config_overrides)``: a session-cached ``LanguageModel`` over ``tiny_model``.

    Cached models are shared, so tests must not leave hooks or change them (except switching to eager
    attention, which pattern requests do anyway). Pass ``attn_implementation="eager"`` for a model that can
    serve attention patterns without a switch.
    """
    cache: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}

    def get(family: str, **overrides: Any) -> Any:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = _make(family, **overrides)
        return cache[key]

    return get


@pytest.fixture
def fresh_lm() -> Callable[..., Any]:
    """Factory ``fresh_lm(family, tokenizer=None, **config_overrides)``: a new, unshared ``LanguageModel``."""
    return _make


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not STORIES_DIR.is_dir():
        pytest.skip(f"stories260k checkpoint not found at {STORIES_DIR} (acceptance tests need ../shared/models)")
    return STORIES_DIR


@pytest.fixture(scope="session")
def stories_lm(stories_dir: Path) -> Any:
    import lsi

    return lsi.load(stories_dir)


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """SmolLM2-135M-Instruct (30 layers, d_model 576, 9 heads / 3 KV heads), loaded once, as users load it."""
    import lsi

    if not SMOLLM2_FILE.is_file():
        pytest.skip(f"SmolLM2 not found at {SMOLLM2_FILE} (run scripts/get-smollm2; LSI_SMOLLM2 sets its directory)")
    return lsi.load(SMOLLM2_FILE)


@pytest.fixture
def browser() -> None:
    """Skip unless headless Chromium and playwright are here; with ``LSI_REQUIRE_BROWSER=1`` (CI) fail instead."""
    from lsi.report.browser import missing

    why = missing()
    if why is None:
        return
    if os.environ.get("LSI_REQUIRE_BROWSER") == "1":
        pytest.fail(f"LSI_REQUIRE_BROWSER=1 but {why}")
    pytest.skip(why)
