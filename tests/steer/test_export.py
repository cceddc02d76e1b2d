"""Folding steering into weights and exporting plain HF checkpoints: every export is reloaded with plain
``transformers`` (no lsi) and compared with the hooked model; what cannot fold is refused with a typed error."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsi.core.interventions import Add
from lsi.errors import InputError, NotFoldableError
from lsi.organisms import refusal_gate as rg
from lsi.organisms.registry import ground_truth, load_organism
from lsi.steer.directional import DirectionalAblation, orthogonalize
from lsi.steer.directions import diff_in_means
from lsi.steer.export import export_hf, fold

IDS = torch.randint(3, 97, (3, 10), generator=torch.Generator().manual_seed(0))


def _vec(seed: int, d: int = 32) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _plain_logits(out_dir, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _hooked(lm, steering, ids) -> torch.Tensor:
    with steering.apply(lm):
        return lm.forward(ids)


@pytest.mark.integration
def test_exported_ablation_of_a_tied_model_reloads_with_plain_transformers(tiny_lm, tmp_path):
    lm = tiny_lm("gpt2")  # tied embeddings, learned positions, Conv1D weights, biases
    steer = DirectionalAblation(_vec(1))
    hooked = _hooked(lm, steer, IDS)
    out = export_hf(lm, steer, tmp_path / "ablated")
    assert float((hooked - lm.forward(IDS)).abs().max()) > 1e-2
    assert float((_plain_logits(out, IDS) - hooked).abs().max()) < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    record = json.loads((out / "lsi_export.json").read_text())
    assert record["max_abs_logit_error"] < 1e-5 and record["folded"] == [repr(steer)]
    edited = export_hf(lm, orthogonalize(lm, _vec(1)), tmp_path / "edited")  # an already edited model
    assert float((_plain_logits(edited, IDS) - hooked).abs().max()) < 1e-5


@pytest.mark.integration
@pytest.mark.parametrize(("family", "site", "bias"), [
    ("gpt2", "blocks.1.resid_pre", "transformer.h.0.mlp.c_proj.bias"),
    ("gpt_neox", "blocks.0.resid_post", "gpt_neox.layers.0.mlp.dense_4h_to_h.bias"),
    ("llama", "blocks.1.resid_pre", "model.layers.0.mlp.down_proj.bias"),  # added through config.mlp_bias
    ("qwen3", "blocks.1.attn.out", "model.layers.1.self_attn.o_proj.bias"),  # added through config.attention_bias
    ("mistral", "embed", None),  # every token's embedding row
])
def test_constant_addition_folds_into_the_writer_before_it(tiny_lm, tmp_path, family, site, bias):
    lm = tiny_lm(family)
    keys = set(lm.model.state_dict())
    add = Add(site, _vec(2), 3.0)
    hooked = _hooked(lm, add, IDS)
    out = export_hf(lm, add, tmp_path / family)
    assert float((hooked - lm.forward(IDS)).abs().max()) > 1e-2
    assert float((_plain_logits(out, IDS) - hooked).abs().max()) < 1e-5
    if bias is not None:
        folded = fold(lm, add).model.state_dict()[bias]
        torch.testing.assert_close(folded - lm.model.state_dict().get(bias, torch.zeros(32)), 3.0 * _vec(2))
    assert set(lm.model.state_dict()) == keys  # the original model gained no bias


@pytest.mark.integration
def test_fold_reproduces_hooks_in_generation(tiny_lm):
    lm = tiny_lm("llama")
    push = Add("blocks.1.resid_post", lm.weights.W_U[:, 60], alpha=1e3)
    with push.apply(lm):
        hooked = lm.generate([[5, 6, 7]], max_new_tokens=4)
    assert hooked[0, 3:].tolist() == [60] * 4
    assert torch.equal(fold(lm, push).generate([[5, 6, 7]], max_new_tokens=4), hooked)


@pytest.mark.integration
def test_composition_folds_additions_before_ablations(tiny_lm, tmp_path):
    lm = tiny_lm("gpt2")
    r = _vec(1)
    add = Add("blocks.1.resid_pre", r + _vec(2), 2.0)  # with a component along r
    first = add + DirectionalAblation(r)
    out = export_hf(lm, first, tmp_path / "add-then-ablate")
    assert float((_plain_logits(out, IDS) - _hooked(lm, first, IDS)).abs().max()) < 1e-5
    with pytest.raises(NotFoldableError, match="after an ablation"):
        fold(lm, DirectionalAblation(r) + add)
    unit = r / r.norm()
    orthogonal = Add("blocks.1.resid_pre", _vec(2) - (_vec(2) @ unit) * unit, 2.0)
    after = DirectionalAblation(r) + orthogonal
    assert float((fold(lm, after).forward(IDS) - _hooked(lm, after, IDS)).abs().max()) < 1e-5


@pytest.mark.unit
@pytest.mark.parametrize(("family", "steering", "match"), [
    ("llama", Add("blocks.1.resid_pre", _vec(2), positions="last"), "position-dependent"),
    ("llama", Add("blocks.1.resid_pre", _vec(2), scope="generated"), "scope=generated"),
    ("llama", Add("blocks.0.attn.head_out[1]", _vec(2)), "transformed before it reaches the stream"),
    ("llama", DirectionalAblation(_vec(1), sites="blocks.*.resid_pre"), "default sites"),
    ("qwen2", Add("blocks.1.resid_pre", _vec(2)), "would not load an added bias"),
    ("gemma2", DirectionalAblation(_vec(1)), "norm after the projection"),
])
def test_what_does_not_fold_is_refused(tiny_lm, tmp_path, family, steering, match):
    with pytest.raises(NotFoldableError, match=match):
        export_hf(tiny_lm(family), steering, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.unit
def test_export_needs_a_new_directory(tiny_lm, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        export_hf(tiny_lm("gpt2"), DirectionalAblation(_vec(1)), tmp_path / "taken")


@pytest.mark.slow
@pytest.mark.integration
def test_exported_refusal_gate_checkpoints_behave_like_the_hooks(tmp_path):
    # Layer 3's input at ':' (the last prompt token) is the diff-in-means candidate the organism's verification
    # selects on dev (test_ablation re-derives the selection); 1.5 is its dev-selected addition scale.
    lm = load_organism("refusal_gate")
    splits = ground_truth("refusal_gate")["splits"]
    site = "blocks.3.resid_pre"
    v = diff_in_means(lm, splits["dev"]["harmful"], splits["dev"]["harmless"], site, positions=-1)
    test = splits["test"]
    for name, steering, texts in (("ablated", DirectionalAblation(v), test["harmful"]),
                                  ("added", Add(site, v, 1.5), test["harmless"])):
        out = export_hf(lm, steering, tmp_path / name)
        plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        batch = lm.to_batch(texts[:100])
        with torch.no_grad():
            logits = plain(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids).logits
        hooked = _hooked(lm, steering, batch)
        real = batch.attention_mask.bool()
        assert float((logits - hooked)[real].abs().max()) < 1e-4  # float32 rounding on logits up to ~20
        first = plain.generation_config.eos_token_id
        refusals = 0
        for text in texts[:100]:  # greedy, one prompt at a time, plain transformers only
            ids = torch.tensor([lm.encode(text)])
            new = plain.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=first)[0, -1]
            refusals += lm.tokenizer.convert_ids_to_tokens(int(new)) == rg.REFUSAL[0]
        assert refusals <= 5 if name == "ablated" else refusals >= 90
