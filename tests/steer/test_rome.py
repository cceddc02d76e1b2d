"""Rank-one editing (ROME): key statistics and keys against brute-force sums, the rank-one update mapping k* to v*
exactly (GPT-2's Conv1D and Llama, float64 and float32) while keys orthogonal to k* in the C⁻¹ metric keep their
values, the WeightEdit round trip and plain-HF export, typed refusals, and real edits on the fact-world organism
and on stories260k."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lsi
from lsi.core.steering import Steering
from lsi.core.weight_edit import WeightEdit
from lsi.errors import IndexOutOfRangeError, InputError, ModelMismatchError, NotFoldableError
from lsi.steer.export import export_hf
from lsi.steer.rome import (
    EditRequest,
    KeyStatistics,
    ValueOptimization,
    down_projection,
    edit_vectors,
    key_statistics,
    projected,
    rank_one_edit,
    rome_edit,
    sample_prefixes,
    subject_key,
    with_prefixes,
)
from lsi.testing import tiny_model

CORPUS = [torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in range(20, 44, 2)]
REQUEST = EditRequest([[1, 5, 6, 7, 8], [1, 9, 5, 6, 10, 11]], [2, 3], target_id=42, subject="5 6")
DOWN = {"gpt2": "transformer.h.1.mlp.c_proj.weight", "llama": "model.layers.1.mlp.down_proj.weight"}


def _lm(family: str, dtype: torch.dtype = torch.float32) -> lsi.LanguageModel:
    return lsi.LanguageModel(tiny_model(family).to(dtype))


def _keys(lm, layer: int, rows) -> list[torch.Tensor]:
    """Each row's keys ``[len, d_mlp]`` from its own unpadded run (the brute-force reference)."""
    return [lm.run_with_cache([row], [f"blocks.{layer}.mlp.post"])[f"blocks.{layer}.mlp.post"][0].double()
            for row in rows]


# -- statistics and keys ---------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_key_statistics_are_the_mean_outer_product_over_every_real_token(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    stats = key_statistics(lm, 1, CORPUS, batch_size=5)  # padded batches of several lengths
    keys = torch.cat(_keys(lm, 1, CORPUS))
    assert stats.count == sum(len(r) for r in CORPUS) == len(keys)
    torch.testing.assert_close(stats.second_moment, keys.T @ keys / len(keys), rtol=1e-6, atol=1e-9)
    loaded = KeyStatistics.load(stats.save(tmp_path / "c1"), lm)
    assert loaded.layer == 1 and loaded.count == stats.count
    assert torch.equal(loaded.second_moment, stats.second_moment)
    with pytest.raises(ModelMismatchError, match="layer 0"):
        rank_one_edit(lm, 0, torch.ones(48), torch.ones(32), stats)
    with pytest.raises(ModelMismatchError, match="gpt2"):
        KeyStatistics.load(tmp_path / "c1", _lm("gpt2"))


@pytest.mark.unit
def test_subject_key_averages_the_last_subject_token_over_prompts_and_prefixes(tiny_lm):
    lm = tiny_lm("gpt2")  # bos_token_id = 1: prefixes go after it
    rows, positions = with_prefixes(lm, REQUEST.prompts, REQUEST.subject_positions, [[70, 71], [72]])
    assert rows == [[1, 5, 6, 7, 8], [1, 9, 5, 6, 10, 11], [1, 70, 71, 5, 6, 7, 8], [1, 70, 71, 9, 5, 6, 10, 11],
                    [1, 72, 5, 6, 7, 8], [1, 72, 9, 5, 6, 10, 11]]
    assert positions == [2, 3, 4, 5, 3, 4]
    assert all(row[p] == 6 for row, p in zip(rows, positions, strict=True))  # the subject's last token
    by_hand = torch.stack([k[p] for k, p in zip(_keys(lm, 0, rows), positions, strict=True)]).mean(0)
    torch.testing.assert_close(subject_key(lm, 0, rows, positions), by_hand, rtol=1e-6, atol=1e-8)
    prefixes = sample_prefixes(lm, [[1, *r] for r in CORPUS], n=4, length=3, seed=5)
    assert [len(p) for p in prefixes] == [3] * 4 and all(1 not in p for p in prefixes)  # BOS never sampled
    assert prefixes == sample_prefixes(lm, [[1, *r] for r in CORPUS], n=4, length=3, seed=5)


@pytest.mark.unit
def test_requests_are_checked_and_built_from_text(tiny_lm, char_tokenizer):
    assert REQUEST.essence == ((1, 5, 6), (1, 9, 5, 6)) and REQUEST.essence_positions == (2, 3)
    with pytest.raises(IndexOutOfRangeError, match="positions inside"):
        EditRequest([[1, 5, 6]], [3], 7)
    with pytest.raises(InputError, match="one last-subject-token position per prompt"):
        EditRequest([[1, 5, 6]], [1, 2], 7)
    lm = lsi.LanguageModel(tiny_model("gpt2"), char_tokenizer)  # one token per character
    request = EditRequest.from_text(lm, ["{} is in", "at {}: "], "ab", "z", essence_templates=["{} is a"])
    assert request.subject_positions == (1, 4) and request.essence_positions == (1,)
    assert request.prompts[1] == tuple(char_tokenizer("at ab: ")["input_ids"])
    assert request.target_id == char_tokenizer("z")["input_ids"][0]
    with pytest.raises(InputError, match="one token"):
        EditRequest.from_text(lm, ["{} is in"], "ab", " Rome")
    with pytest.raises(InputError, match="templates with one"):
        EditRequest.from_text(lm, ["is in"], "ab", "z")
    with pytest.raises(IndexOutOfRangeError, match="target id"):
        edit_vectors(lm, EditRequest([[5, 6]], [0], 97), 0)
    with pytest.raises(InputError, match="lr > 0"):
        ValueOptimization(lr=0.0)


# -- the rank-one update ---------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(("family", "dtype", "rtol"), [("gpt2", torch.float64, 1e-6), ("llama", torch.float64, 1e-6),
                                                       ("gpt2", torch.float32, 1e-5), ("llama", torch.float32, 1e-5)])
def test_rank_one_edit_maps_the_key_to_the_value_and_leaves_c_orthogonal_keys(family, dtype, rtol):
    lm = _lm(family, dtype)
    stats = key_statistics(lm, 1, CORPUS)
    gen = torch.Generator().manual_seed(3)
    key = _keys(lm, 1, [[1, 50, 51, 52]])[0][-1]
    down = down_projection(lm, 1)
    value = projected(down, key) + torch.randn(32, generator=gen, dtype=torch.float64)
    edit = rank_one_edit(lm, 1, key, value, stats)
    assert list(edit.deltas) == [DOWN[family]]
    delta = edit.deltas[DOWN[family]].double()
    delta = delta.T if family == "gpt2" else delta  # Conv1D stores [in, out]
    singular = torch.linalg.svdvals(delta)
    assert float(singular[1]) < 1e-6 * float(singular[0])  # rank one
    u, ridge = stats.solve(key)
    assert ridge == 0.0  # 264 corpus tokens, 48 neurons: C is positive definite
    other = torch.randn(48, generator=gen, dtype=torch.float64)
    orthogonal = other - (u @ other) / (u @ key) * key  # uᵀ k = 0: orthogonal to k* in the C⁻¹ metric
    before = projected(down, orthogonal)
    change = value - projected(down, key)  # what the edit must add for k*
    with edit.apply(lm):
        torch.testing.assert_close(projected(down, key), value, rtol=rtol, atol=rtol * float(value.norm()))
        # the stored ΔW is float32: its rounding, not the formula, limits how exactly C⁻¹-orthogonal keys stay
        scale = float(change.norm() * orthogonal.norm() / key.norm())
        assert float((projected(down, orthogonal) - before).norm()) < 1e-5 * scale
    # corpus keys move by |Δv|² / (k*ᵀ C⁻¹ k*) on average (since E[(uᵀk)²] = uᵀ C u = uᵀ k*)
    keys = torch.cat(_keys(lm, 1, CORPUS))
    moved = (keys @ delta.T).pow(2).sum(1).mean()
    torch.testing.assert_close(moved, change.pow(2).sum() / (u @ key), rtol=1e-4, atol=0)


@pytest.mark.unit
def test_singular_statistics_get_a_ridge(tiny_lm):
    lm = tiny_lm("llama")
    stats = key_statistics(lm, 0, [[3, 4, 5, 6]])  # 4 tokens, 48 neurons: rank 4
    key = _keys(lm, 0, [[7, 8]])[0][-1]
    u, ridge = stats.solve(key)
    assert ridge > 0 and bool(torch.isfinite(u).all())
    edit = rank_one_edit(lm, 0, key, torch.zeros(32, dtype=torch.float64), stats)
    assert edit.info["ridge"] == ridge
    with edit.apply(lm):
        assert float(projected(down_projection(lm, 0), key).abs().max()) < 1e-5


# -- ROME end to end on tiny models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_edit():
    lm = _lm("gpt2")
    stats = key_statistics(lm, 0, CORPUS)
    return lm, stats, rome_edit(lm, REQUEST, 0, stats=stats, corpus=CORPUS)


@pytest.mark.unit
def test_rome_edit_is_the_rank_one_edit_of_its_vectors(gpt2_edit):
    lm, stats, edit = gpt2_edit
    prefixes = sample_prefixes(lm, CORPUS)
    found = edit_vectors(lm, REQUEST, 0, prefixes=prefixes)
    again = rank_one_edit(lm, 0, found.key, found.value, stats)
    name = "transformer.h.0.mlp.c_proj.weight"
    assert torch.equal(edit.deltas[name], again.deltas[name])
    assert edit.label == "rome" and edit.info["prefixes"] == len(prefixes) == 5 and edit.info["layer"] == 0
    assert edit.info["losses"] == found.losses and len(found.losses) == ValueOptimization().steps + 1
    assert edit.info["delta_norm"] == pytest.approx(found.losses[-1]["delta_norm"], rel=1e-5)
    assert found.losses[-1]["delta_norm"] <= 4.0 * found.value_norm * (1 + 1e-6)  # clamped to 4 |v|


@pytest.mark.integration
def test_rome_edit_saves_loads_and_exports_to_plain_transformers(gpt2_edit, tmp_path):
    lm, _, edit = gpt2_edit
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(1))
    with edit.apply(lm):
        edited = lm.forward(ids)
    loaded = Steering.load(edit.save(tmp_path / "rome"), lm)
    assert isinstance(loaded, WeightEdit) and loaded.info == edit.info
    with loaded.apply(lm):
        assert torch.equal(lm.forward(ids), edited)
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        Steering.load(tmp_path / "rome", lsi.LanguageModel(tiny_model("gpt2", seed=1)))
    out = export_hf(lm, edit, tmp_path / "exported")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, edited, rtol=0, atol=1e-5)


@pytest.mark.unit
def test_post_norm_families_and_missing_statistics_are_refused(tiny_lm):
    with pytest.raises(NotFoldableError, match="writing to the residual stream as is"):
        key_statistics(tiny_lm("gemma2"), 0, CORPUS)
    with pytest.raises(InputError, match="key statistics or a corpus"):
        rome_edit(tiny_lm("llama"), REQUEST, 0)
    with pytest.raises(IndexOutOfRangeError, match="layer"):
        down_projection(tiny_lm("llama"), 2)


# -- real models -----------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_rome_rewrites_a_fact_of_the_fact_world_organism():
    from lsi.organisms.fact_world_data import RELATIONS, encode_prompts
    from lsi.organisms.registry import ground_truth, load_organism

    lm, truth = load_organism("fact_world"), ground_truth("fact_world")
    tok, fact = lm.tokenizer, truth["facts"][0]
    new = next(o for o in RELATIONS[fact["relation"]]["objects"] if o != fact["object"])
    ids, answer, subject, objects = encode_prompts(tok, [fact], "train")
    request = EditRequest([r[: a + 1].tolist() for r, a in zip(ids, answer, strict=True)], subject.tolist(),
                          tok.convert_tokens_to_ids(new), subject=fact["subject"])
    corpus = [r[r != tok.pad_token_id].tolist() for r in encode_prompts(tok, truth["stage1_facts"], "train")[0]]
    layer = truth["layer"]
    stats = key_statistics(lm, layer, corpus)
    found = edit_vectors(lm, request, layer)
    edit = rank_one_edit(lm, layer, found.key, found.value, stats)
    rows = torch.arange(len(ids))
    before = lm.forward(ids)[rows, answer].softmax(-1)
    with edit.apply(lm):
        torch.testing.assert_close(projected(down_projection(lm, layer), found.key), found.value, rtol=1e-5,
                                   atol=1e-5 * float(found.value.norm()))
        after = lm.forward(ids)[rows, answer].softmax(-1)
    assert bool((before.argmax(-1) == objects).all()) and bool((after.argmax(-1) == request.target_id).all())


@pytest.mark.acceptance
def test_rome_on_stories260k_maps_the_key_to_the_value(stories_dir):
    lm = lsi.load(stories_dir)
    request = EditRequest.from_text(lm, ["{} went to the", "One day, {} went to the"], "Lily", "big")  # '▁big'
    corpus = ["Once upon a time, there was a little girl named Lily.", "She liked to play outside with her dog.",
              "One day, Tom went to the park with his mom."]
    stats = key_statistics(lm, 2, corpus)  # fewer tokens than neurons: C is singular, a ridge is added
    found = edit_vectors(lm, request, 2, optimization=ValueOptimization(steps=50, lr=0.05))  # a 260k model: slower
    edit = rank_one_edit(lm, 2, found.key, found.value, stats)
    assert edit.info["ridge"] > 0 and stats.count < lm.dims.d_mlp
    prompts = [list(p) for p in request.prompts]
    before = lm.forward(prompts)[:, -1].softmax(-1)[:, request.target_id]
    with edit.apply(lm):
        torch.testing.assert_close(projected(down_projection(lm, 2), found.key), found.value, rtol=1e-5,
                                   atol=1e-5 * float(found.value.norm()))
        after = lm.forward(prompts)[:, -1].softmax(-1)[:, request.target_id]
    assert float(before.max()) < 0.01 and float(after.min()) > 0.5
