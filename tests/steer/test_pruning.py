"""Deleted layers and pruned heads / neurons: hooks ≡ folded weights ≡ a plain-HF checkpoint that has fewer layers,
in every registered family; refusals for what does not fold; the layer_redundancy organism's planted layers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsi.core.interventions import Add, Scale, Zero
from lsi.core.steering import Steering
from lsi.errors import InputError, NotFoldableError
from lsi.steer.export import export_hf, fold
from lsi.steer.pruning import DeleteLayers, delete_layers

FAMILIES = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "olmo2")
IDS = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _hooked(lm, steering: Steering) -> torch.Tensor:
    with steering.apply(lm):
        return lm.forward(IDS)


@pytest.mark.arch
@pytest.mark.parametrize("family", FAMILIES)
def test_deleted_layers_equal_the_hooks_and_reload_in_plain_transformers(tiny_lm, tmp_path, family):
    lm = tiny_lm(family, num_hidden_layers=3)
    steer = DeleteLayers([1], model=lm)
    hooked = _hooked(lm, steer)
    smaller = delete_layers(lm, [1])
    assert smaller.dims.n_layers == 2 and lm.dims.n_layers == 3
    torch.testing.assert_close(smaller.forward(IDS), hooked, rtol=0, atol=1e-5)
    out = export_hf(lm, steer, tmp_path / "pruned")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=IDS).logits, hooked, rtol=0, atol=1e-4)
    generated = plain.generate(IDS[:1], max_new_tokens=4, do_sample=False)  # the renumbered key-value cache works
    with steer.apply(lm):
        assert torch.equal(lm.generate(IDS[:1], max_new_tokens=4), generated)


@pytest.mark.arch
@pytest.mark.parametrize("family", FAMILIES)
def test_zeroed_and_scaled_heads_and_neurons_fold_into_projection_columns(tiny_lm, family):
    lm = tiny_lm(family)
    steer = (Zero("blocks.0.attn.head_out[1]", model=lm) + Zero("blocks.1.mlp.post[3,17]", model=lm)
             + Scale("blocks.1.attn.z[0,2]", 0.5, model=lm))
    hooked = _hooked(lm, steer)
    assert not torch.allclose(hooked, lm.forward(IDS))
    torch.testing.assert_close(fold(lm, steer).forward(IDS), hooked, rtol=0, atol=1e-5)


@pytest.mark.unit
def test_what_does_not_fold_is_refused(tiny_lm):
    lm = tiny_lm("llama", num_hidden_layers=3)
    with pytest.raises(NotFoldableError, match="every position"):
        fold(lm, Zero("blocks.0.attn.head_out[1]", positions="last", model=lm))
    with pytest.raises(NotFoldableError, match="heads or neurons"):
        fold(lm, Zero("blocks.0.attn.out", model=lm))
    with pytest.raises(NotFoldableError, match="deleted layers"):
        fold(lm, DeleteLayers([1], model=lm) + Add("blocks.2.resid_pre", torch.ones(32), model=lm))
    fold(lm, DeleteLayers([1], model=lm) + Add("blocks.1.resid_pre", torch.ones(32), model=lm))  # layer 0's
    with pytest.raises(InputError, match=r"0\.\.2"):
        DeleteLayers([3]).interventions(lm)
    with pytest.raises(InputError, match="at least one layer kept"):
        delete_layers(lm, [0, 1, 2])


@pytest.mark.unit
def test_delete_layers_round_trips_through_save_and_load(tiny_lm, tmp_path):
    lm = tiny_lm("gpt2", num_hidden_layers=3)
    DeleteLayers([0, 2], model=lm).save(tmp_path / "drop")
    loaded = Steering.load(tmp_path / "drop", lm)
    assert isinstance(loaded, DeleteLayers) and loaded.layers == (0, 2)


@pytest.mark.integration
def test_block_influence_picks_the_planted_layers_and_deleting_them_keeps_the_loss():
    from lsi.locate.layers import block_influence
    from lsi.organisms.layer_redundancy import eval_mask, sample_batch
    from lsi.organisms.metrics import masked_nll
    from lsi.organisms.registry import ground_truth, load_organism

    lm, truth = load_organism("layer_redundancy"), ground_truth("layer_redundancy")
    ids = sample_batch(truth["data"], 128, torch.Generator().manual_seed(7))
    influence = block_influence(lm, ids)
    ranked = sorted(zip(influence.scores.flatten().tolist(), influence.labels, strict=True))
    lowest = sorted(int(label.split(".")[1]) for _, label in ranked[:2])
    assert lowest == sorted(truth["redundant_layers"])  # locate -> steer: the layers to delete

    def loss(model) -> float:
        return masked_nll(model.forward(ids), ids, eval_mask(ids))

    base = loss(lm)
    assert abs(loss(delete_layers(lm, lowest)) - base) < 0.05
    others = [layer for layer in range(lm.dims.n_layers) if layer not in lowest][:2]
    assert loss(delete_layers(lm, others)) - base > 0.3
