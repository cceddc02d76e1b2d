"""Acceptance on a real instruct model: SmolLM2-135M-Instruct, loaded from its GGUF file (scripts/get-smollm2).

Llama family, 30 layers, d_model 576, 9 heads / 3 KV heads (GQA), tied embeddings, chat template in the file.
"""

from __future__ import annotations

import pytest
import torch
from core_helpers import assert_no_hooks

import lsi
from lsi import Add
from lsi.core.selfcheck import self_check
from lsi.steer.export import export_hf

pytestmark = [pytest.mark.real, pytest.mark.slow]

QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
N_LAYERS = 30


def chat(lm: lsi.LanguageModel, question: str) -> str:
    """A user turn in the model's chat template, ready for the assistant's answer."""
    messages = [{"role": "user", "content": question}]
    return str(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def answer(lm: lsi.LanguageModel, prompt: str, tokens: int = 9) -> str:
    """The greedy answer to a chat prompt, without the prompt and special tokens."""
    start = lm.to_batch(prompt).input_ids.shape[1]
    return str(lm.tokenizer.decode(lm.generate(prompt, max_new_tokens=tokens)[0, start:], skip_special_tokens=True))


def test_load_and_self_check(smollm2):
    lm = smollm2
    assert lm.family == "llama" and not lm.probed and lm.model.dtype == torch.float32
    d = lm.dims
    assert (d.n_layers, d.d_model, d.n_heads, d.n_kv_heads, d.d_head, d.d_mlp, d.vocab) == (
        N_LAYERS, 576, 9, 3, 64, 1536, 49152)
    assert type(lm.model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # dequantized, not packed blocks
    assert not hasattr(lm.model.config, "quantization_config")
    assert lm.tokenizer.chat_template and "<|im_start|>assistant" in chat(lm, QUESTION)
    result = self_check(lm)
    assert result.passed, [c for c in result.checks if not c.passed]


def test_greedy_chat_answer(smollm2):
    assert answer(smollm2, chat(smollm2, QUESTION)) == ANSWER


def test_decompositions_on_a_chat_prompt(smollm2):
    """The residual stream is the embedding plus every attention and MLP write; heads sum to attn.out."""
    lm = smollm2
    cache = lm.run_with_cache(chat(lm, QUESTION), ["embed", "blocks.*.attn.out", "blocks.*.mlp.out",
                                                   "blocks.*.resid_mid", "blocks.*.resid_post",
                                                   "blocks.*.attn.head_out"])
    total = cache["embed"].clone()
    for i in range(N_LAYERS):
        b = f"blocks.{i}."
        scale = 1e-5 * (1 + float(cache[b + "resid_post"].abs().max()))  # float32 sums of states up to ~1e2
        torch.testing.assert_close(cache[b + "attn.head_out"].sum(-2), cache[b + "attn.out"], atol=scale, rtol=0)
        total += cache[b + "attn.out"]
        torch.testing.assert_close(total, cache[b + "resid_mid"], atol=10 * scale, rtol=0)
        total += cache[b + "mlp.out"]
        torch.testing.assert_close(total, cache[b + "resid_post"], atol=10 * scale, rtol=0)
    with torch.no_grad():
        lens = lm.unembed(cache[f"blocks.{N_LAYERS - 1}.resid_post"])
    torch.testing.assert_close(lens, cache.logits, atol=1e-4, rtol=1e-5)


def test_batched_equals_unbatched_with_left_padding(smollm2):
    lm = smollm2
    prompts = [chat(lm, q) for q in (QUESTION, "Name a fruit.", "What is two plus two? Answer with one word.")]
    batch = lm.to_batch(prompts, padding_side="left")
    assert batch.has_padding
    batched = lm.forward(batch)
    for row, prompt in enumerate(prompts):
        alone = lm.forward(prompt)[0]
        torch.testing.assert_close(batched[row, -alone.shape[0]:], alone, atol=1e-4, rtol=1e-4)
    texts = lm.generate_text(prompts[:2], max_new_tokens=9)
    assert texts[0].endswith(ANSWER) and texts[1] == lm.generate_text(prompts[1], max_new_tokens=9)[0]


def test_patching_in_another_country_changes_the_answer(smollm2):
    """Adding the France -> Italy difference of the residual stream at the country token moves the answer to Italy."""
    lm = smollm2
    france, italy = chat(lm, QUESTION), chat(lm, QUESTION.replace("France", "Italy"))
    country = lm.to_batch(france).input_ids[0].tolist().index(lm.encode(" France")[0])
    site = "blocks.6.resid_post"
    states = lm.run_with_cache([france, italy], site)[site]
    with lm.intervene(lsi.Add(site, states[1, country] - states[0, country], positions=[country])):
        steered = answer(lm, france)
    assert steered != ANSWER and "Ital" in steered, steered
    assert answer(lm, france) == ANSWER
    assert_no_hooks(lm.model)


def test_folded_steering_exports_a_plain_checkpoint(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    lm = smollm2
    vector = torch.randn(576, generator=torch.Generator().manual_seed(0))
    steering = Add("blocks.12.resid_pre", vector, 2.0)
    out = export_hf(lm, steering, tmp_path / "steered")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = lm.to_batch(chat(lm, QUESTION)).input_ids
    with steering.apply(lm):
        steered = lm.forward(ids)
    with torch.no_grad():
        reloaded = plain(input_ids=ids).logits
    assert not torch.allclose(steered, lm.forward(ids), atol=1e-2)  # the steering does something
    torch.testing.assert_close(reloaded, steered, atol=1e-4, rtol=1e-4)
    assert_no_hooks(lm.model)
