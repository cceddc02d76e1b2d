"""Inputs -> padded batches, and padding-aware position selectors."""

from __future__ import annotations

import pytest
import torch

import lsi
from lsi.core.inputs import Batch, to_batch
from lsi.core.positions import All, Index, Last, Match, Span, as_positions
from lsi.errors import IndexOutOfRangeError, InputError

pytestmark = pytest.mark.unit


def _batch(rows, side):
    return to_batch(rows, tokenizer=None, padding_side=side, pad_id=0)


# --- inputs ---------------------------------------------------------------------------------------------------------

def test_padding_left_and_right():
    left = _batch([[5, 6, 7], [8]], "left")
    assert left.input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    right = _batch([[5, 6, 7], [8]], "right")
    assert right.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right.position_ids.tolist()[1][0] == 0
    assert left.lengths == right.lengths == [3, 1]
    assert left.has_padding and not _batch([[1, 2]], "left").has_padding
    assert left.input_ids.dtype == torch.long


def test_pad_id_is_used():
    b = to_batch([[5, 6, 7], [8]], tokenizer=None, padding_side="right", pad_id=9)
    assert b.input_ids.tolist() == [[5, 6, 7], [8, 9, 9]]


def test_input_kinds(char_tokenizer):
    tok = char_tokenizer
    one = to_batch("ab", tokenizer=tok, padding_side="right", pad_id=0)
    assert one.input_ids.tolist() == [tok("ab")["input_ids"]]
    many = to_batch(["abc", "d"], tokenizer=tok, padding_side="left", pad_id=0)
    assert many.input_ids.tolist() == [tok("abc")["input_ids"], [0, 0, *tok("d")["input_ids"]]]
    assert _batch([4, 5, 6], "left").input_ids.tolist() == [[4, 5, 6]]  # one row of ids
    assert _batch([(4, 5), (6,)], "right").input_ids.tolist() == [[4, 5], [6, 0]]
    assert _batch(torch.tensor([4, 5]), "left").input_ids.tolist() == [[4, 5]]
    t = torch.tensor([[4, 5], [6, 7]], dtype=torch.int32)
    b = _batch(t, "left")
    assert b.input_ids.dtype == torch.long and b.attention_mask.tolist() == [[1, 1], [1, 1]]
    enc = {"input_ids": torch.tensor([[0, 4, 5]]), "attention_mask": torch.tensor([[0, 1, 1]])}
    b = _batch(enc, "right")
    assert b.input_ids.tolist() == [[0, 4, 5]] and b.attention_mask.tolist() == [[0, 1, 1]]
    b = _batch({"input_ids": [4, 5]}, "right")
    assert b.input_ids.tolist() == [[4, 5]] and b.attention_mask.tolist() == [[1, 1]]
    same = Batch(torch.tensor([[3, 4]]), torch.tensor([[1, 1]]))
    assert _batch(same, "left") is same


@pytest.mark.parametrize(("inputs", "phrase"), [
    ([], "at least one input"),
    ([[]], "at least one token"),
    ([[4, 5], []], "at least one token"),
    (torch.zeros(1, 0, dtype=torch.long), "at least one real token"),
    (torch.tensor([[1.0, 2.0]]), "integer token ids"),
    (torch.zeros(1, 2, 3, dtype=torch.long), "integer token ids"),
    ({"ids": [1]}, "input_ids"),
    ({"input_ids": [[4, 5]], "attention_mask": [[0, 0]]}, "at least one real token"),
    ([[4, 5], "text"], "one kind"),
    ([4.5], "one kind"),
])
def test_bad_inputs(inputs, phrase):
    with pytest.raises(InputError, match=phrase) as info:
        _batch(inputs, "right")
    assert info.value.fix


def test_text_needs_a_tokenizer():
    with pytest.raises(InputError, match="tokenizer"):
        _batch("hello", "right")
    with pytest.raises(InputError, match="tokenizer"):
        _batch(["a", "b"], "right")


def test_empty_strings(char_tokenizer):
    for inputs in ("", [""], ["abc", ""]):
        with pytest.raises(InputError, match="at least one token"):
            to_batch(inputs, tokenizer=char_tokenizer, padding_side="right", pad_id=0)


# --- positions ------------------------------------------------------------------------------------------------------

ROWS = [[5, 6, 7, 5], [8, 5]]


def _mask(sel, side):
    b = _batch(ROWS, side)
    return sel.mask(b.input_ids, b.attention_mask).int().tolist()


@pytest.mark.parametrize(("sel", "left", "right"), [
    (All(), [[1, 1, 1, 1], [0, 0, 1, 1]], [[1, 1, 1, 1], [1, 1, 0, 0]]),
    (Last(), [[0, 0, 0, 1], [0, 0, 0, 1]], [[0, 0, 0, 1], [0, 1, 0, 0]]),
    (Index(0), [[1, 0, 0, 0], [0, 0, 1, 0]], [[1, 0, 0, 0], [1, 0, 0, 0]]),
    (Index([0, -1]), [[1, 0, 0, 1], [0, 0, 1, 1]], [[1, 0, 0, 1], [1, 1, 0, 0]]),
    (Index(-2), [[0, 0, 1, 0], [0, 0, 1, 0]], [[0, 0, 1, 0], [1, 0, 0, 0]]),
    (Span(1, None), [[0, 1, 1, 1], [0, 0, 0, 1]], [[0, 1, 1, 1], [0, 1, 0, 0]]),
    (Span(None, 1), [[1, 0, 0, 0], [0, 0, 1, 0]], [[1, 0, 0, 0], [1, 0, 0, 0]]),
    (Span(-2, None), [[0, 0, 1, 1], [0, 0, 1, 1]], [[0, 0, 1, 1], [1, 1, 0, 0]]),
    (Span(1, 3), [[0, 1, 1, 0], [0, 0, 0, 1]], [[0, 1, 1, 0], [0, 1, 0, 0]]),
    (Match(5), [[1, 0, 0, 1], [0, 0, 0, 1]], [[1, 0, 0, 1], [0, 1, 0, 0]]),
    (Match([6, 7]), [[0, 1, 1, 0], [0, 0, 0, 0]], [[0, 1, 1, 0], [0, 0, 0, 0]]),
    (Match([8, 5]), [[0, 0, 0, 0], [0, 0, 1, 1]], [[0, 0, 0, 0], [1, 1, 0, 0]]),
    (Match([7, 5, 8]), [[0, 0, 0, 0], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]),  # no match across rows
    (Match([1, 2, 3, 4, 5]), [[0] * 4, [0] * 4], [[0] * 4, [0] * 4]),  # longer than the sequence
])
def test_selector_masks_are_padding_aware(sel, left, right):
    assert _mask(sel, "left") == left
    assert _mask(sel, "right") == right


def test_match_never_hits_padding():
    # pad id 0 is also a real token in row 0; a pattern over [0, 8] must not use row 1's padding
    b = _batch([[0, 8, 3], [8]], "left")  # row 1: [0, 0, 8]
    assert Match([0, 8]).mask(b.input_ids, b.attention_mask).int().tolist() == [[1, 1, 0], [0, 0, 0]]
    assert Match(0).mask(b.input_ids, b.attention_mask).int().tolist() == [[1, 0, 0], [0, 0, 0]]


def test_index_gathers_absolute_positions():
    b = _batch(ROWS, "left")
    assert Last().index(b.input_ids, b.attention_mask).tolist() == [[3], [3]]
    assert Index([0, -1]).index(b.input_ids, b.attention_mask).tolist() == [[0, 3], [2, 3]]
    b = _batch(ROWS, "right")
    assert Last().index(b.input_ids, b.attention_mask).tolist() == [[3], [1]]
    with pytest.raises(InputError, match="same number of positions"):
        Match(5).index(b.input_ids, b.attention_mask)


@pytest.mark.parametrize("sel", [Index(2), Index(-3), Index([0, 4])])
def test_index_beyond_a_row(sel):
    b = _batch(ROWS, "left")
    with pytest.raises(IndexOutOfRangeError, match="real tokens"):
        sel.mask(b.input_ids, b.attention_mask)


def test_as_positions():
    assert as_positions(None) == All() and as_positions("all") == All()
    assert as_positions("last") == Last()
    assert as_positions(3) == Index(3)
    assert as_positions([0, -1]) == Index([0, -1]) == Index((0, -1))
    assert as_positions(slice(1, 3)) == Span(1, 3)
    m = Match(5)
    assert as_positions(m) is m
    for bad in (slice(0, 4, 2), True, "first", 1.5, [0, "a"]):
        with pytest.raises(InputError):
            as_positions(bad)
    with pytest.raises(InputError):
        Match([])


def test_selector_strings_and_exports():
    assert [str(x) for x in (All(), Last(), Index([0, -1]), Span(1, None), Match([3, 4]))] == [
        "all", "last", "0,-1", "1:", "match(3,4)"]
    assert lsi.Last is Last and lsi.Index is Index and lsi.Span is Span and lsi.Match is Match and lsi.All is All


def test_lm_to_batch_uses_tokenizer_side_and_pad(fresh_lm, char_tokenizer):
    char_tokenizer.padding_side = "left"
    lm = fresh_lm("llama", tokenizer=char_tokenizer)
    b = lm.to_batch(["abc", "d"])
    assert b.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert lm.to_batch(["abc", "d"], padding_side="right").attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert lm.encode("ab") == char_tokenizer("ab")["input_ids"]
    no_tok = fresh_lm("llama")
    assert no_tok.to_batch([[3, 4], [5]]).attention_mask.tolist() == [[1, 1], [1, 0]]  # right by default
    assert no_tok.pad_id == 0
