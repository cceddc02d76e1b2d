"""Strings found in token ids: against a character tokenizer (spans known by construction) and a real BPE one."""

from __future__ import annotations

import pytest
from core_helpers import PrintableTokenizer

from lsi.core.spans import token_id, token_span
from lsi.errors import InputError

pytestmark = pytest.mark.unit


def test_spans_in_a_character_tokenizer():
    tok = PrintableTokenizer()
    text = "Hello Lily, bye"
    ids = tok(text)["input_ids"]
    for needle in ("Lily", "H", "bye", ", b"):
        start = text.index(needle)
        assert token_span(tok, ids, needle) == (start, start + len(needle))
    with pytest.raises(InputError, match="not in"):
        token_span(tok, ids, "Tom")
    with pytest.raises(InputError, match="once") as info:
        token_span(tok, ids, "l")
    assert "3 times" in info.value.found
    with pytest.raises(InputError, match="tokenizer"):
        token_span(None, ids, "Lily")


def test_spans_in_a_bpe_tokenizer(stories_dir):
    """A word found inside a token that carries its leading space, and a word split over several tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    ids = tok("Once upon a time, Lily met a dragon", add_special_tokens=False)["input_ids"]
    start, stop = token_span(tok, ids, "Lily")
    assert tok.decode(ids[start:stop]).strip() == "Lily"
    start, stop = token_span(tok, ids, "dragon")
    assert tok.decode(ids[start:stop]).strip() == "dragon" and stop == len(ids)
    assert token_id(tok, 7) == 7
    with pytest.raises(InputError, match="one token"):
        token_id(tok, " Lily met")


def test_metrics_and_rome_requests_take_text(tiny_lm):
    """The same metric and edit request from strings as from the ids and positions written out by hand."""
    import torch

    import lsi
    from lsi.locate.metrics import logit, logit_diff
    from lsi.steer.rome import EditRequest

    tok = PrintableTokenizer()
    lm = lsi.LanguageModel(tiny_lm("llama").model, tok)
    batch = lm.to_batch(["in Paris", "Rome is"])
    logits = lm.forward(batch)
    e, r = tok("e")["input_ids"][0], tok("r")["input_ids"][0]
    assert torch.equal(logit_diff("e", "r", tokenizer=tok)(logits, batch), logit_diff(e, r)(logits, batch))
    assert torch.equal(logit(["e", "r"], tokenizer=tok)(logits, batch), logit([e, r])(logits, batch))
    request = EditRequest.from_prompts(lm, ["in Paris", "Paris is"], "Paris", "e")
    assert request.subject_positions == (7, 4) and request.target_id == e
    assert request.prompts == (tuple(tok("in Paris")["input_ids"]), tuple(tok("Paris is")["input_ids"]))
    with pytest.raises(InputError, match="prompt 1"):
        EditRequest.from_prompts(lm, ["in Paris", "Rome is"], "Paris", "e")
