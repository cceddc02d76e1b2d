"""Bad input gets a typed error that says what was expected, what was found and how to fix it."""

from __future__ import annotations

import warnings

import pytest
import torch
from core_helpers import IDS, assert_no_hooks

import lsi
from lsi.errors import (
    IndexOutOfRangeError,
    InputError,
    LsiError,
    ReadOnlySiteError,
    ShapeMismatchError,
    SiteError,
    SiteUnavailableError,
)

pytestmark = pytest.mark.unit


def _has_remedy(err: LsiError) -> None:
    assert isinstance(err, LsiError)
    assert err.expected and err.found and err.fix
    assert "Fix:" in str(err)


def test_misspelled_site_suggests_the_right_one(tiny_lm):
    lm = tiny_lm("llama")
    for call in (lambda: lm.run_with_cache(IDS, "blocks.0.resid_prre"),
                 lambda: lm.intervene(lsi.Zero("blocks.0.resid_prre")).__enter__(),
                 lambda: lm.run_with_grads(IDS, lambda lg, b: lg.sum(), "blocks.0.resid_prre")):
        with pytest.raises(SiteError) as info:
            call()
        assert "resid_pre" in info.value.fix and "did you mean" in info.value.fix
        _has_remedy(info.value)
    assert_no_hooks(lm.model)


def test_resid_mid_under_parallel_attention(tiny_lm):
    lm = tiny_lm("gpt_neox")
    with pytest.raises(SiteUnavailableError) as info:
        lm.run_with_cache(IDS, "blocks.0.resid_mid")
    assert "resid_pre + attn.out + mlp.out" in info.value.fix
    _has_remedy(info.value)
    with pytest.raises(SiteUnavailableError):
        lm.run_with_grads(IDS, lambda lg, b: lg.sum(), "blocks.*.resid_mid")
    assert_no_hooks(lm.model)


@pytest.mark.parametrize(("site", "phrase"), [
    ("blocks.0.attn.head_out[4]", "n_heads"),
    ("blocks.0.attn.z[7]", "n_heads"),
    ("blocks.0.attn.k[2]", "n_kv_heads"),  # GQA: 2 kv heads
    ("blocks.0.attn.pattern[4]", "n_heads"),
    ("blocks.1.mlp.post[48]", "d_mlp"),
    ("blocks.1.mlp.pre[0,100]", "d_mlp"),
    ("blocks.2.resid_post", "2 layers"),
    ("blocks.-3.resid_post", "2 layers"),
    ("blocks.0,5.attn.z", "2 layers"),
])
def test_index_out_of_range(tiny_lm, site, phrase):
    lm = tiny_lm("llama")
    with pytest.raises(IndexOutOfRangeError, match=phrase) as info:
        lm.run_with_cache(IDS, site)
    _has_remedy(info.value)
    with pytest.raises(IndexOutOfRangeError), lm.intervene(lsi.Zero(site)):
        pass
    assert_no_hooks(lm.model)


def test_negative_head_index_is_rejected(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(IndexOutOfRangeError):
        lm.site_shape("blocks.0.attn.z[-1]")


def test_positions_beyond_the_sequence(tiny_lm):
    lm = tiny_lm("llama")
    n = IDS.shape[1]
    for positions in (n, -n - 1, [0, n + 3], lsi.Index(50)):
        with pytest.raises(IndexOutOfRangeError, match="real tokens") as info:
            lm.run_with_cache(IDS, "blocks.0.resid_post", positions=positions)
        _has_remedy(info.value)
    # padding-aware: position 3 exists in the long row but not in the short one
    with pytest.raises(IndexOutOfRangeError, match="row 1 has 2 real tokens"):
        lm.run_with_cache([[4, 5, 6, 7], [8, 9]], "blocks.0.resid_post", positions=3)
    with pytest.raises(IndexOutOfRangeError), lm.intervene(lsi.Zero("blocks.0.mlp.out", positions=[n])):
        lm.forward(IDS)
    assert_no_hooks(lm.model)


def test_empty_inputs(tiny_lm, fresh_lm, char_tokenizer):
    lm = tiny_lm("llama")
    for bad in ([], [[]], torch.zeros(1, 0, dtype=torch.long)):
        with pytest.raises(InputError) as info:
            lm.run_with_cache(bad, "embed")
        _has_remedy(info.value)
        with pytest.raises(InputError):
            lm.forward(bad)
    with_tok = fresh_lm("llama", tokenizer=char_tokenizer)
    for bad in ("", [""], ["ab", ""]):
        with pytest.raises(InputError, match="at least one token"):
            with_tok.run_with_cache(bad, "embed")
        with pytest.raises(InputError):
            with_tok.generate(bad, max_new_tokens=1)
    assert_no_hooks(lm.model)


def test_text_without_a_tokenizer(tiny_lm):
    lm = tiny_lm("llama")
    assert lm.tokenizer is None
    for call in (lambda: lm.run_with_cache("hello", "embed"), lambda: lm.forward(["a", "b"]),
                 lambda: lm.generate("hello", max_new_tokens=1), lambda: lm.encode("hello")):
        with pytest.raises(InputError, match="tokenizer") as info:
            call()
        _has_remedy(info.value)


def test_patch_batch_size_mismatch(tiny_lm):
    lm = tiny_lm("llama")
    src = lm.run_with_cache(torch.cat([IDS, IDS]), "blocks.0.resid_post")
    with pytest.raises(ShapeMismatchError, match="same batch size") as info, lm.intervene(
            lsi.Patch("blocks.0.resid_post", src)):
        lm.forward(IDS)
    _has_remedy(info.value)
    # a different length too
    with pytest.raises(ShapeMismatchError), lm.intervene(lsi.Patch("blocks.0.resid_post", src)):
        lm.forward(torch.cat([IDS, IDS])[:, :4])
    # a cache taken at selected positions is not a full source
    last = lm.run_with_cache(IDS, "blocks.0.resid_post", positions="last")
    with pytest.raises(ShapeMismatchError, match="without positions="), lm.intervene(
            lsi.Patch("blocks.0.resid_post", last)):
        lm.forward(IDS)
    assert_no_hooks(lm.model)


def test_patch_from_a_cache_without_the_site(tiny_lm):
    lm = tiny_lm("llama")
    src = lm.run_with_cache(IDS, "blocks.0.resid_post")
    with pytest.raises(SiteError, match="add it to sites="), lm.intervene(lsi.Patch("blocks.1.resid_post", src)):
        lm.forward(IDS)
    assert_no_hooks(lm.model)


def test_pattern_switches_to_eager_and_warns_once(fresh_lm):
    lm = fresh_lm("llama")
    assert lm.attn_implementation == "sdpa"
    with pytest.warns(UserWarning, match="eager") as record:
        cache = lm.run_with_cache(IDS, "blocks.0.attn.pattern")
    assert len([w for w in record if "eager" in str(w.message)]) == 1
    assert record[0].filename == __file__  # the warning points at the caller
    assert lm.attn_implementation == "eager" and lm.attn_switched_from == "sdpa"
    assert cache["blocks.0.attn.pattern"].shape == (1, 4, IDS.shape[1], IDS.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.run_with_cache(IDS, "blocks.*.attn.pattern")
        lm.run_with_grads(IDS, lambda lg, b: lg[0, -1, 3], "blocks.0.resid_post")


def test_eager_model_does_not_warn(tiny_lm):
    lm = tiny_lm("llama", attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.run_with_cache(IDS, "blocks.0.attn.pattern")
    assert lm.attn_switched_from is None


def test_pattern_is_read_only_eager(tiny_lm):
    lm = tiny_lm("llama", attn_implementation="eager")
    for op in (lsi.Zero("blocks.0.attn.pattern"), lsi.Scale("blocks.*.attn.pattern[1]", 2.0)):
        with pytest.raises(ReadOnlySiteError) as info, lm.intervene(op):
            lm.forward(IDS)
        assert "attn.q" in info.value.fix
        _has_remedy(info.value)
    assert_no_hooks(lm.model)


def test_pattern_is_read_only_whatever_the_attention(fresh_lm):
    """The read-only error does not depend on the attention implementation (checked before running)."""
    lm = fresh_lm("llama")
    assert lm.attn_implementation == "sdpa"
    with pytest.raises(ReadOnlySiteError), lm.intervene(lsi.Zero("blocks.0.attn.pattern")):
        lm.forward(IDS)
    assert_no_hooks(lm.model)


@pytest.mark.parametrize(("op_factory", "phrase"), [
    (lambda d: lsi.Add("blocks.0.resid_post", torch.ones(d.d_model + 1)), "vector"),
    (lambda d: lsi.Add("blocks.0.mlp.post", torch.ones(d.d_model)), "vector"),  # d_mlp expected
    (lambda d: lsi.Set("blocks.0.attn.z[1]", torch.ones(d.d_model)), "value"),  # d_head expected
    (lambda d: lsi.Apply("blocks.0.attn.out", lambda x: x[..., :3]), "shape"),
    (lambda d: lsi.Apply("blocks.0.attn.out", lambda x: 1.0), "tensor"),
])
def test_wrong_shape_values(tiny_lm, op_factory, phrase):
    lm = tiny_lm("llama")
    with pytest.raises(ShapeMismatchError, match=phrase) as info, lm.intervene(op_factory(lm.dims)):
        lm.forward(IDS)
    _has_remedy(info.value)
    assert_no_hooks(lm.model)


def test_metric_must_return_a_scalar(tiny_lm):
    lm = tiny_lm("llama")
    for metric in (lambda lg, b: lg[0, -1], lambda lg, b: 3.0, lambda lg, b: lg[:, -1, :2]):
        with pytest.raises(InputError, match="scalar") as info:
            lm.run_with_grads(IDS, metric, "blocks.0.resid_post")
        _has_remedy(info.value)
    assert_no_hooks(lm.model)


def test_bad_scope_and_dtype():
    with pytest.raises(InputError, match="scope"):
        lsi.Zero("blocks.0.resid_post", scope="decode")
    from lsi.core.loading import _dtype

    with pytest.raises(InputError, match="dtype"):
        _dtype("float8")


def test_load_unknown_local_path(tmp_path):
    for path in (tmp_path / "missing_model", str(tmp_path / "missing" / "model")):
        with pytest.raises(InputError, match="check the path") as info:
            lsi.load(path)
        _has_remedy(info.value)


def test_load_directory_without_a_model(tmp_path):
    """An existing local directory with no config.json is also a bad path, not a raw transformers error."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as info:
        lsi.load(tmp_path / "empty")
    _has_remedy(info.value)


def test_load_device_and_device_map_conflict(tmp_path):
    with pytest.raises(InputError, match="device"):
        lsi.load(tmp_path, device="cpu", device_map="auto")


def test_grads_need_a_writable_site(tiny_lm):
    lm = tiny_lm("llama", attn_implementation="eager")
    with pytest.raises(ReadOnlySiteError) as info:
        lm.run_with_grads(IDS, lambda lg, b: lg[0, -1, 3], "blocks.0.attn.pattern")
    _has_remedy(info.value)
    assert_no_hooks(lm.model)
