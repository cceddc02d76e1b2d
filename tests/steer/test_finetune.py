"""Parameter masks (heads and neurons select exactly their slices of the per-head / per-neuron weight views in
every layout: fused gpt2 / gpt_neox qkv, GQA, fused gate_up, Conv1D) and masked fine-tuning (nothing outside the
mask moves, not even under weight decay; the model is left bit-exact, also on errors; a tiny task is learned;
the KL term protects the preserve set)."""

from __future__ import annotations

import pytest
import torch

from lsi.arch.dims import get_module
from lsi.arch.families import FAMILIES
from lsi.core.weight_edit import WeightEdit
from lsi.errors import InputError, ModelMismatchError
from lsi.locate.result import LocateResult
from lsi.steer.finetune import ParameterMask, masked_finetune, parameter_mask

FAMILY_NAMES = [spec.family for spec in FAMILIES]
PROMPT, TOKEN = [[5, 6]], 7
PRESERVE = torch.randint(3, 97, (4, 10), generator=torch.Generator().manual_seed(0))


def _views(lm, layer: int) -> dict[str, torch.Tensor]:
    """Per-head and per-neuron weight views of one layer (lsi.core.weights), copied."""
    w = lm.weights
    views = {"Q": w.W_Q(layer), "K": w.W_K(layer), "V": w.W_V(layer), "O": w.W_O(layer), "in": w.W_in(layer),
             "out": w.W_out(layer).T}  # out: one row per neuron
    if w.W_gate(layer) is not None:
        views["gate"] = w.W_gate(layer)
    return {k: v.clone() for k, v in views.items()}


def _changed_views(lm, mask: ParameterMask, layer: int) -> dict[str, torch.Tensor]:
    """Each view's change when every masked entry is raised by exactly 1."""
    before = _views(lm, layer)
    with WeightEdit.of(lm, {n: m.float() for n, m in mask.masks.items()}).apply(lm):
        after = _views(lm, layer)
    return {k: after[k] - before[k] for k in before}


def _bias_entries(mask: ParameterMask) -> int:
    return sum(int(m.sum()) for n, m in mask.masks.items() if n.endswith("bias"))


def _has_bias(lm, path: str | None) -> bool:
    return path is not None and getattr(get_module(lm.model, lm.spec.layer_path(0, path)), "bias", None) is not None


def _check_slices(delta: torch.Tensor, chosen: list[int]) -> int:
    """The chosen slices of a view rose by 1, the others did not move; returns the entries chosen."""
    others = [i for i in range(len(delta)) if i not in chosen]
    torch.testing.assert_close(delta[chosen], torch.ones_like(delta[chosen]))
    assert not delta[others].any()
    return delta[chosen].numel()


@pytest.mark.arch
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_head_mask_selects_exactly_the_heads_slices(fresh_lm, family):
    lm = fresh_lm(family)
    head = 3
    kv = lm.weights.kv_head(head)  # GQA families: 4 query heads over 2 kv heads -> kv head 1
    mask = parameter_mask(lm, f"blocks.1.attn.head_out[{head}]")
    delta = _changed_views(lm, mask, 1)
    entries = (_check_slices(delta["Q"], [head]) + _check_slices(delta["K"], [kv]) + _check_slices(delta["V"], [kv])
               + _check_slices(delta["O"], [head]))
    assert not any(delta[k].any() for k in ("in", "out"))
    assert not _changed_views(lm, mask, 0)["Q"].any()
    has_bias = _has_bias(lm, lm.spec.q_proj or lm.spec.qkv_proj)  # gpt2, gpt_neox, qwen2
    assert _bias_entries(mask) == (3 * lm.dims.d_head if has_bias else 0)
    assert mask.count() == entries + _bias_entries(mask)  # nothing else is selected
    assert parameter_mask(lm, f"blocks.1.attn.z[{head}]").masks.keys() == mask.masks.keys()


@pytest.mark.arch
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_neuron_mask_selects_its_rows_and_column(fresh_lm, family):
    lm = fresh_lm(family)
    units = [2, 17]
    mask = parameter_mask(lm, [f"blocks.0.mlp.post[{j}]" for j in units])
    delta = _changed_views(lm, mask, 0)
    entries = sum(_check_slices(delta[k], units) for k in ("in", "out", "gate") if k in delta)
    assert ("gate" in delta) == lm.spec.gated
    assert not any(delta[k].any() for k in ("Q", "K", "V", "O"))
    assert _bias_entries(mask) == (len(units) if _has_bias(lm, lm.spec.mlp_in) else 0)  # gpt2, gpt_neox
    assert mask.count() == entries + _bias_entries(mask)


@pytest.mark.unit
def test_component_strings_select_modules_and_parameters(tiny_lm):
    lm = tiny_lm("gpt2")
    params = dict(lm.model.named_parameters())
    assert set(parameter_mask(lm, "blocks.1").masks) == {n for n in params if n.startswith("transformer.h.1.")}
    mlp = parameter_mask(lm, "blocks.0.mlp")
    assert set(mlp.masks) == {n for n in params if n.startswith("transformer.h.0.mlp.")}
    assert mlp.count() == sum(params[n].numel() for n in mlp.masks)
    assert parameter_mask(lm, "blocks.0.mlp.out").count() == mlp.count()
    assert parameter_mask(lm, "blocks.*.mlp").count() == 2 * mlp.count()
    # tied unembedding: one parameter, under its first name; embed adds the positional embedding
    assert set(parameter_mask(lm, "unembed").masks) == {"transformer.wte.weight"}
    assert set(parameter_mask(lm, "embed").masks) == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert parameter_mask(lm, "transformer.ln_f.bias").count() == 32
    # a parameter_gradients row label: row 5 of c_fc in [out, in] layout = column 5 of its Conv1D storage
    row = parameter_mask(lm, "transformer.h.0.mlp.c_fc.weight[5]").masks["transformer.h.0.mlp.c_fc.weight"]
    assert row[:, 5].all() and int(row.sum()) == 32


@pytest.mark.unit
def test_locate_results_give_their_top_k_components(tiny_lm):
    lm = tiny_lm("llama")
    grid = LocateResult(torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]),
                        (("layer", ("0", "1")), ("head", ("0", "1", "2", "3"))), method="demo")
    heads = parameter_mask(lm, grid, k=2)
    expected = parameter_mask(lm, ["blocks.0.attn.head_out[1]", "blocks.1.attn.head_out[0]"])
    assert heads.targets == ("blocks.0.attn.head_out[1]", "blocks.1.attn.head_out[0]")
    assert all(torch.equal(heads.masks[n], expected.masks[n]) for n in expected.masks)
    traced = LocateResult(torch.tensor([[0.1, 0.7], [0.2, 0.3]]), (("layer", ("0", "1")), ("position", ("a", "b"))),
                          method="causal_tracing", settings={"site": "blocks.{l}.mlp.out"})
    assert parameter_mask(lm, traced, k=1).targets == ("blocks.0.mlp.out",)
    sites = LocateResult(torch.tensor([[0.1, 0.7], [0.9, 0.3]]),
                         (("site", ("blocks.1.mlp.post[4]", "blocks.0.attn.head_out[2]")), ("position", ("0", "1"))),
                         method="activation_patching")
    assert parameter_mask(lm, sites, k=2).targets == ("blocks.0.attn.head_out[2]", "blocks.1.mlp.post[4]")
    with pytest.raises(InputError, match="k="):
        parameter_mask(lm, grid)


@pytest.mark.unit
def test_labels_without_parameters_are_refused(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(InputError, match="written by no parameters"):
        parameter_mask(lm, "blocks.0.resid_pre")
    with pytest.raises(InputError, match="a component"):
        parameter_mask(lm, "blocks.0.attention")
    with pytest.raises(InputError, match="a bias on"):  # llama's o_proj has none
        parameter_mask(lm, "blocks.0.attn.bias")
    with pytest.raises(IndexError):
        parameter_mask(lm, "blocks.0.mlp.post[48]")
    other = parameter_mask(tiny_lm("gpt2"), "blocks.0.mlp")
    with pytest.raises(ModelMismatchError):
        masked_finetune(lm, _task_loss, other, steps=1, lr=0.01)


def _task_loss(lm) -> torch.Tensor:
    """-log p(7 | 5, 6)."""
    return -lm.logits_with_grad(PROMPT)[0, -1].float().log_softmax(-1)[TOKEN]


def _snapshot(lm) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _left_as_it_was(lm, before: dict[str, torch.Tensor]) -> bool:
    """Weights bit-exact, requires_grad as HF sets it, no gradients left behind."""
    return all(torch.equal(p, before[n]) and p.requires_grad and p.grad is None
               for n, p in lm.model.named_parameters())


def _logp(lm) -> float:
    return float(lm.forward(PROMPT)[0, -1].log_softmax(-1)[TOKEN])


@pytest.mark.unit
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_nothing_outside_the_mask_moves(fresh_lm, family):
    lm = fresh_lm(family)
    before = _snapshot(lm)
    mask = parameter_mask(lm, ["blocks.0.attn.head_out[1]", "blocks.1.mlp.post[3]", "blocks.1.mlp.post[40]"])
    # weight decay would shrink every entry of the trained tensors: it must not reach those outside the mask
    result = masked_finetune(lm, _task_loss, mask, steps=5, lr=0.05, weight_decay=0.5)
    edit = result.edit
    assert set(edit.deltas) == set(mask.masks) and edit.label == "masked_finetune"
    for name, delta in edit.deltas.items():
        assert not delta[~mask.masks[name]].any(), name
    nonzero = sum(int((d != 0).sum()) for d in edit.deltas.values())
    assert result.moved == nonzero and 0.9 * mask.count() < result.moved <= mask.count()
    assert _left_as_it_was(lm, before)
    full = masked_finetune(lm, _task_loss, None, steps=2, lr=0.05, weight_decay=0.5)
    assert full.edit.label == "finetune" and full.moved > 10 * mask.count()  # the control: decay moves the rest


@pytest.mark.unit
def test_masked_finetune_learns_a_tiny_task(fresh_lm):
    lm = fresh_lm("gpt2")
    assert int(lm.forward(PROMPT)[0, -1].argmax()) != TOKEN
    result = masked_finetune(lm, _task_loss, parameter_mask(lm, "blocks.1.mlp"), steps=30, lr=0.02)
    with result.edit.apply(lm):
        assert int(lm.forward(PROMPT)[0, -1].argmax()) == TOKEN
    # random tiny models have small logits (std-0.02 tied embeddings): 0.5 nats is most of what the MLP can add
    assert result.losses[-1].target < result.losses[0].target - 0.5
    assert result.losses[0].preserve == 0.0 and result.losses[-1].total == result.losses[-1].target


def _preserve_kl(lm, edit: WeightEdit) -> float:
    reference = lm.forward(PRESERVE).log_softmax(-1)
    with edit.apply(lm):
        logp = lm.forward(PRESERVE).log_softmax(-1)
    return float((reference.exp() * (reference - logp)).sum(-1).mean())


@pytest.mark.unit
def test_kl_term_protects_the_preserve_set(fresh_lm):
    lm = fresh_lm("llama")
    base = _logp(lm)
    plain = masked_finetune(lm, _task_loss, None, steps=15, lr=0.02)
    kept = masked_finetune(lm, _task_loss, None, steps=15, lr=0.02, preserve=PRESERVE, kl_weight=20.0)
    for result in (plain, kept):
        with result.edit.apply(lm):
            assert _logp(lm) > base + 1.0  # both learn the task
    assert _preserve_kl(lm, kept.edit) < 0.5 * _preserve_kl(lm, plain.edit)
    last = kept.losses[-1]
    assert last.total == pytest.approx(last.target + 20.0 * last.preserve, rel=1e-5)
    assert last.preserve == pytest.approx(_preserve_kl(lm, kept.edit), rel=0.2)  # KL of the step before the last


@pytest.mark.unit
def test_the_model_is_restored_when_training_fails(fresh_lm):
    lm = fresh_lm("gpt2")
    before = _snapshot(lm)
    calls = []

    def failing(model):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("data ran out")
        return _task_loss(model)

    with pytest.raises(RuntimeError, match="data ran out"):
        masked_finetune(lm, failing, parameter_mask(lm, "blocks.0"), steps=10, lr=0.1)
    assert _left_as_it_was(lm, before)
    with pytest.raises(InputError, match="logits_with_grad"):  # a loss without gradients
        masked_finetune(lm, lambda m: m.forward(PROMPT)[0, -1, TOKEN], None, steps=1, lr=0.1)
    with pytest.raises(InputError, match="lr"):
        masked_finetune(lm, _task_loss, None, steps=1, lr=float("nan"))
    assert _left_as_it_was(lm, before)
