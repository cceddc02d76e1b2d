"""Inputs a model cannot read: ids outside the vocabulary, rows past the context, text it cannot tokenize,
wrong argument types, nothing to generate."""

from __future__ import annotations

import warnings

import pytest
import torch
from badinput_checks import refuse
from core_helpers import IDS, PrintableTokenizer

import lsi
from lsi.errors import IndexOutOfRangeError, InputError

pytestmark = pytest.mark.unit
VOCAB, CONTEXT = 97, 64  # the tiny models


@pytest.mark.parametrize("ids", [[[5, 97, 6]], [[5, -1, 6]], [[5, 6, 7], [500]], torch.tensor([[3, 4, 1000]])],
                         ids=["vocab", "negative", "padded-row", "tensor"])
@pytest.mark.parametrize("call", ["forward", "run_with_cache", "generate", "intervene"])
def test_token_ids_outside_the_vocabulary(tiny_lm, ids, call):
    lm = tiny_lm("llama")

    def run() -> object:
        if call == "intervene":
            with lm.intervene(lsi.Zero("blocks.0.mlp.out")):
                return lm.forward(ids)
        return {"forward": lambda: lm.forward(ids), "run_with_cache": lambda: lm.run_with_cache(ids, "embed"),
                "generate": lambda: lm.generate(ids, max_new_tokens=1)}[call]()

    with refuse(IndexOutOfRangeError, model=lm.model, match="the vocabulary"):
        run()


def test_padding_ids_go_through_the_embedding_too(tiny_lm):
    lm = tiny_lm("llama")
    batch = lsi.Batch(torch.tensor([[5, 6, 7], [8, 9, 500]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
    with refuse(IndexOutOfRangeError, model=lm.model, match="500 in row 1"):
        lm.forward(batch)


@pytest.mark.parametrize(("length", "new"), [(CONTEXT + 1, 0), (CONTEXT + 30, 0), (CONTEXT - 2, 5)],
                         ids=["one-past", "far-past", "prompt-plus-new"])
def test_past_learned_position_embeddings(tiny_lm, length, new):
    lm = tiny_lm("gpt2")  # learned positions: no vector exists past the context
    ids = [[5 + i % 80 for i in range(length)]]
    with refuse(IndexOutOfRangeError, model=lm.model, match=f"at most {CONTEXT} positions"):
        lm.generate(ids, max_new_tokens=new) if new else lm.forward(ids)


def test_exactly_the_learned_context_runs(tiny_lm):
    lm = tiny_lm("gpt2")
    assert lm.forward([[5] * CONTEXT]).shape == (1, CONTEXT, VOCAB)
    assert lm.generate([[5] * (CONTEXT - 3)], max_new_tokens=3).shape == (1, CONTEXT)


def test_past_a_rotary_context_warns_once(fresh_lm):
    lm = fresh_lm("llama")  # rotary positions: it runs, on positions never trained
    long = [[5 + i % 80 for i in range(CONTEXT + 10)]]
    with pytest.warns(UserWarning, match=f"past the {CONTEXT} positions") as record:
        lm.forward(long)
    assert record[0].filename == __file__  # points at the caller, not inside lsi
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.forward(long)  # once per model
        lm.forward([[5] * CONTEXT])


def test_text_that_is_only_unknown_tokens_warns_once(fresh_lm):
    class UnkTokenizer(PrintableTokenizer):
        unk_token, unk_token_id, all_special_ids = "<unk>", 3, [0, 3]

        def __call__(self, text, **kwargs):
            return {"input_ids": [3 if ord(c) > 127 else ord(c) - 29 for c in text]}

    lm = fresh_lm("llama", tokenizer=UnkTokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.forward(["abc", "ab\u00e9"])  # one known character is enough
    with pytest.warns(UserWarning, match=r"rows \[1\] became only unknown tokens"):
        lm.forward(["abc", "\u65e5\u672c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.forward("\u65e5\u672c")


@pytest.mark.parametrize("value", [0, -1, 2.5, None])
def test_nothing_to_generate(tiny_lm, value):
    lm = tiny_lm("llama")
    with refuse(InputError, model=lm.model, match="max_new_tokens >= 1"):
        lm.generate(IDS, max_new_tokens=value)


def test_generate_text_without_a_tokenizer(tiny_lm):
    lm = tiny_lm("llama")
    with refuse(InputError, model=lm.model, match="tokenizer"):
        lm.generate_text(IDS.tolist(), max_new_tokens=1)


@pytest.mark.parametrize("inputs", [None, 3, 2.5, object()], ids=["none", "int", "float", "object"])
def test_inputs_of_the_wrong_type(tiny_lm, inputs):
    lm = tiny_lm("llama")
    with refuse(InputError, model=lm.model, match="token ids"):
        lm.forward(inputs)


@pytest.mark.parametrize("sites", [3, None, {"blocks.0.mlp.out"}, [3], ["embed", None]],
                         ids=["int", "none", "set", "list-of-int", "list-with-none"])
def test_sites_of_the_wrong_type(tiny_lm, sites):
    lm = tiny_lm("llama")
    with refuse(InputError, model=lm.model, match="a site name"):
        lm.run_with_cache(IDS, sites)


@pytest.mark.acceptance
def test_stories260k_past_its_context_warns(stories_dir):
    lm = lsi.load(stories_dir)
    text = "Once upon a time there was a little dog. " * 60
    with pytest.warns(UserWarning, match="past the 512 positions"):
        lm.forward(text)
