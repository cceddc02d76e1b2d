"""Weight objects against the sites they produce; the structural probe; the logit lens."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lsi
from lsi.errors import IndexOutOfRangeError, UnknownArchitectureError
from lsi.locate.vocab import logit_lens
from lsi.testing import TINY_CONFIGS

pytestmark = pytest.mark.unit
IDS = torch.tensor([[3, 14, 15, 9, 26, 5]])


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_qkv_weights_reproduce_the_projection_sites(tiny_lm, family):
    lm = tiny_lm(family)
    attn = lm.model.get_submodule(lm.spec.layer_path(1, lm.spec.attn))
    seen = {}

    def record_input(module, args, kwargs, output):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handle = attn.register_forward_hook(record_input, with_kwargs=True)
    try:
        cache = lm.run_with_cache(IDS, ["blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v"])
    finally:
        handle.remove()
    w = lm.weights
    for name, weight in (("q", w.W_Q(1)), ("k", w.W_K(1)), ("v", w.W_V(1))):
        predicted = torch.einsum("bpd,hde->bphe", seen["x"], weight)
        got = cache[f"blocks.1.attn.{name}"]
        # biases cancel in differences between positions
        torch.testing.assert_close(got - got[:, :1], predicted - predicted[:, :1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_head_circuits_and_neuron_weights(tiny_lm, family):
    lm = tiny_lm(family)
    w, d = lm.weights, lm.dims
    assert w.W_K(0, expand=True).shape == (d.n_heads, d.d_model, d.d_head)
    last = d.n_heads - 1
    assert w.kv_head(last) == d.n_kv_heads - 1
    torch.testing.assert_close(w.OV(0, last), w.W_V(0)[w.kv_head(last)] @ w.W_O(0)[last])
    torch.testing.assert_close(w.QK(0, 0), w.W_Q(0)[0] @ w.W_K(0)[0].T)
    # a neuron's value weight is what one unit of its activation writes: down_proj applied to a one-hot
    down = lm.model.get_submodule(lm.spec.layer_path(0, lm.spec.mlp_down))
    one_hot = torch.zeros(1, d.d_mlp)
    one_hot[0, 7] = 1.0
    bias = getattr(down, "bias", None)
    written = down(one_hot)[0] - (0 if bias is None else bias)
    torch.testing.assert_close(written, w.neuron_value(0, 7), atol=1e-6, rtol=0)
    assert w.neuron_key(0, 7).shape == (d.d_model,)
    with pytest.raises(IndexOutOfRangeError):
        w.neuron_key(0, d.d_mlp)


def _model(model_type, **kwargs):
    base = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=48, vocab_size=97)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**base, **kwargs})).eval()


def test_unregistered_architecture_is_probed_and_verified():
    lm = lsi.LanguageModel(_model("starcoder2"))
    assert lm.probed and lm.family == "probed:starcoder2" and lsi.self_check(lm).passed
    assert (lm.spec.pre_attn_norm, lm.spec.pre_mlp_norm) == ("input_layernorm", "post_attention_layernorm")


def test_probe_detects_parallel_attention():
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gptj", n_layer=2, n_embd=32, n_head=4, vocab_size=97, rotary_dim=4)).eval()
    lm = lsi.LanguageModel(model)
    assert lm.probed and lm.parallel_attn
    assert lm.spec.pre_attn_norm == lm.spec.pre_mlp_norm == "ln_1"  # GPT-J's one norm feeds both blocks


def test_architecture_failing_the_self_check_is_refused_with_a_template():
    # granite scales each block's writes by residual_multiplier inside the layer: attn.out is not what is added
    with pytest.raises(UnknownArchitectureError, match="Template") as err:
        lsi.LanguageModel(_model("granite", residual_multiplier=0.5))
    assert "resid_post" in str(err.value) and "ArchSpec(" in str(err.value)
    assert "pre_attn_norm='input_layernorm'" in str(err.value) and "pre_mlp_norm=" in str(err.value)


@pytest.mark.parametrize("family", ["gpt2", "gemma2", "llama"])
def test_logit_lens_last_row_equals_model_logits(tiny_lm, family):
    lm = tiny_lm(family)
    lens = logit_lens(lm, IDS, positions="all")
    assert lens.labels[0] == "embed" and len(lens.labels) == lm.dims.n_layers + 1
    torch.testing.assert_close(lens.logits[-1], lm.forward(IDS), atol=1e-5, rtol=1e-5)
