"""The steering contract's weight side: WeightEdit applies its deltas inside the block and restores the weights
bit-exactly, composes with hook steerings, saves / loads (refused on other weights), and folds into an exported
checkpoint that plain transformers reproduces."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsi.core.identity import weights_fingerprint
from lsi.core.interventions import Add
from lsi.core.steering import Steering
from lsi.core.weight_edit import WeightEdit, added_to_weights
from lsi.errors import InputError, ModelMismatchError, NonFiniteSteeringError, ShapeMismatchError
from lsi.steer.export import export_hf, fold

IDS = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
DOWN = {"gpt2": "transformer.h.1.mlp.c_proj.weight", "llama": "model.layers.1.mlp.down_proj.weight"}


def _edit(lm, name: str, seed: int = 0, scale: float = 0.05) -> WeightEdit:
    param = dict(lm.model.named_parameters())[name]
    delta = scale * torch.randn(param.shape, generator=torch.Generator().manual_seed(seed))
    return WeightEdit.of(lm, {name: delta}, label="test", info={"seed": seed})


def _manual(lm, name: str, delta: torch.Tensor) -> torch.Tensor:
    """Logits with ``delta`` added by hand (the brute-force reference)."""
    param = dict(lm.model.named_parameters())[name]
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(delta)
    try:
        return lm.forward(IDS)
    finally:
        with torch.no_grad():
            param.copy_(saved)


@pytest.mark.unit
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edit_applies_inside_the_block_and_restores_exactly(fresh_lm, family):
    lm = fresh_lm(family)
    name = DOWN[family]
    edit = _edit(lm, name)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    base = lm.forward(IDS)
    with edit.apply(lm):
        edited = lm.forward(IDS)
    assert torch.equal(edited, _manual(lm, name, edit.deltas[name]))
    assert not torch.allclose(edited, base)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"), added_to_weights(lm, edit.deltas):
        raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


@pytest.mark.unit
def test_edits_compose_with_each_other_and_with_hooks(fresh_lm):
    lm = fresh_lm("llama")
    a, b = _edit(lm, DOWN["llama"], 0), _edit(lm, "model.layers.0.mlp.down_proj.weight", 1)
    add = Add("blocks.1.resid_post", torch.ones(32), 0.3, model=lm)
    with (a + b + add).apply(lm):
        together = lm.forward(IDS)
    with a.apply(lm), b.apply(lm), add.apply(lm):
        nested = lm.forward(IDS)
    torch.testing.assert_close(together, nested, rtol=0, atol=1e-6)
    assert (a + a).weight_deltas(lm)[DOWN["llama"]].equal(2 * a.deltas[DOWN["llama"]])


@pytest.mark.unit
def test_save_load_round_trip_and_refusal_on_other_weights(fresh_lm, tmp_path):
    lm = fresh_lm("gpt2")
    edit = _edit(lm, DOWN["gpt2"]) + Add("blocks.0.resid_post", torch.ones(32), model=lm)
    edit.save(tmp_path / "edit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.json", "edit.safetensors"]
    loaded = Steering.load(tmp_path / "edit.json", lm)
    with edit.apply(lm):
        expected = lm.forward(IDS)
    with loaded.apply(lm):
        torch.testing.assert_close(lm.forward(IDS), expected, rtol=0, atol=0)
    assert loaded.leaves()[0].info == {"seed": 0}

    other = fresh_lm("gpt2")  # same family and sizes, other random weights
    with torch.no_grad():
        dict(other.model.named_parameters())[DOWN["gpt2"]].add_(1e-3)
    with pytest.raises(ModelMismatchError) as err:
        Steering.load(tmp_path / "edit", other)
    assert "fingerprint" in err.value.expected and err.value.fix
    with pytest.raises(ModelMismatchError):
        _edit(lm, DOWN["gpt2"]).apply(other)


@pytest.mark.unit
def test_bad_deltas_are_refused(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(ShapeMismatchError, match="shape"):
        WeightEdit.of(lm, {DOWN["llama"]: torch.zeros(3, 3)})
    with pytest.raises(ModelMismatchError, match="no_such"):
        WeightEdit.of(lm, {"no_such.weight": torch.zeros(3)})
    bad = torch.zeros(dict(lm.model.named_parameters())[DOWN["llama"]].shape)
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteSteeringError):
        WeightEdit.of(lm, {DOWN["llama"]: bad})
    before = weights_fingerprint(lm, [DOWN["llama"]])
    with added_to_weights(lm, {DOWN["llama"]: torch.full(bad.shape, 1e-6)}):
        assert weights_fingerprint(lm, [DOWN["llama"]]) != before  # any change of the weights shows
    assert weights_fingerprint(lm, [DOWN["llama"]]) == before


@pytest.mark.integration
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edit_folds_and_exports_to_a_plain_checkpoint(fresh_lm, tmp_path, family):
    lm = fresh_lm(family)
    edit = _edit(lm, DOWN[family]) + Add("blocks.1.resid_pre", torch.ones(32), 0.5, model=lm)
    with edit.apply(lm):
        hooked = lm.forward(IDS)
    torch.testing.assert_close(fold(lm, edit).forward(IDS), hooked, rtol=0, atol=1e-5)
    out = export_hf(lm, edit, tmp_path / "edited")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, hooked, rtol=0, atol=1e-4)


class _Trap:
    """Unpickling this runs code: a loader that unpickles would set TRIGGERED."""

    def __reduce__(self):
        return (_trigger, ())


TRIGGERED: list[bool] = []


def _trigger() -> None:
    TRIGGERED.append(True)


@pytest.mark.unit
def test_a_pickled_steering_is_never_loaded(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    torch.save({"vector": _Trap()}, tmp_path / "steering.pt")
    (tmp_path / "steering.json").write_text("{}")
    with pytest.raises(InputError, match="safetensors"):
        Steering.load(tmp_path / "steering.pt", lm)
    assert not TRIGGERED
