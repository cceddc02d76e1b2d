"""Steering SmolLM2-135M-Instruct: a ROME edit (Paris -> Rome) measured on paraphrases and neighbours and exported
as a plain transformers checkpoint, and a diff-in-means sentiment vector chosen under a KL budget, against a random
direction of the same norm. docs/smollm2.md shows the output of

    OMP_NUM_THREADS=2 .venv/bin/python examples/smollm2_steer.py "$(scripts/get-smollm2)" [--sections rome,sentiment]

ROME's key statistics ``C = E[k kᵀ]`` are taken over 80 paragraphs of the Python reference documentation that
ships with CPython (``pydoc_data.topics``): English text that needs no download. The layer is the one causal
tracing picks: the MLP whose output, restored at the subject's last token, brings the true answer back most, after
MLP 0 (which restores the subject token itself: on this model it acts as part of the embedding, and an edit there
would rewrite every use of "France").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import lsi
from lsi import Add
from lsi.evaluation.steer import measured, reference
from lsi.locate.tracing import causal_tracing
from lsi.steer.directions import diff_in_means_by_site
from lsi.steer.export import export_hf
from lsi.steer.rome import EditRequest, key_statistics, rome_edit
from lsi.steer.selection import grid, select

EDIT_PROMPTS = ["The capital of France is", "France's capital city is", "The capital city of France is called"]
PARAPHRASES = ["In France, the capital is", "The largest city and capital of France is",
               "Q: What is the capital of France? A: The capital of France is"]
NEIGHBOURS = {"Germany": " Berlin", "Spain": " Madrid", "Japan": " Tokyo", "England": " London", "Russia": " Moscow"}
POSITIVE = ["I loved this movie, it was wonderful.", "What a great book, I enjoyed every page.",
            "The food was delicious and the staff were lovely.", "This is the best phone I have ever owned.",
            "A beautiful, moving film. Highly recommended.", "The hotel was clean, quiet and friendly.",
            "Fantastic service, I will definitely come back.", "The concert was amazing, a perfect evening.",
            "Great value and it works perfectly.", "My kids adored this game, so much fun."]
NEGATIVE = ["I hated this movie, it was awful.", "What a boring book, I regretted every page.",
            "The food was disgusting and the staff were rude.", "This is the worst phone I have ever owned.",
            "An ugly, tedious film. Avoid it.", "The hotel was dirty, noisy and unfriendly.",
            "Terrible service, I will never come back.", "The concert was dreadful, a wasted evening.",
            "Overpriced and it broke at once.", "My kids hated this game, so much frustration."]
NEGATIVE_WORDS = [" terrible", " awful", " bad", " boring", " horrible", " disappointing"]
POSITIVE_WORDS = [" great", " wonderful", " good", " amazing", " excellent", " beautiful"]
DEV_PROMPTS = ["The restaurant on the corner was", "My new laptop is", "Last night's film was", "The train journey was"]
TEST_PROMPTS = ["The museum we visited was", "This coffee shop is", "The book I just finished was",
                "Our holiday rental was"]
KL_TEXT = ["The meeting is scheduled for Tuesday at ten.", "Water boils at one hundred degrees Celsius.",
           "The library opens at nine in the morning.", "He took the bus to the station and bought a ticket."]
LAYERS, ALPHAS, TAU = [6, 10, 14], [1.0, 2.0, 4.0, 8.0], 0.5


def show(title: str) -> None:
    print(f"\n## {title}")


def next_token(lm: lsi.LanguageModel, prompts: Sequence[str]) -> list[str]:
    """The greedy next token after each prompt."""
    batch = lm.to_batch(list(prompts), padding_side="left")
    return [lm.tokenizer.decode([int(i)]) for i in lm.forward(batch)[:, -1].argmax(-1)]


def chat_answer(lm: lsi.LanguageModel, question: str, tokens: int = 12) -> str:
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                              tokenize=False)
    start = lm.to_batch(prompt).input_ids.shape[1]
    return str(lm.tokenizer.decode(lm.generate(prompt, max_new_tokens=tokens)[0, start:], skip_special_tokens=True))


def corpus(n: int = 80) -> list[str]:
    """The first ``n`` prose paragraphs (over 80 characters, cut at 400) of CPython's reference topics."""
    from pydoc_data.topics import topics

    paragraphs = [" ".join(p.split()) for key in sorted(topics) for p in topics[key].split("\n\n")]
    return [p[:400] for p in paragraphs if len(p) > 80 and not p.startswith((">>>", "***"))][:n]


def section_rome(lm: lsi.LanguageModel) -> dict[str, Any]:
    show("ROME: France's capital is Rome")
    traced = causal_tracing(lm, EDIT_PROMPTS, "France", " Paris", kind="mlp", positions="subject_last",
                            noise_samples=10)
    layer = 1 + int(traced.scores[1:, 0].argmax())
    print("causal tracing at the last subject token: top MLPs " + ", ".join(
        f"{k} {v:+.3f}" for k, v in traced.top(3)) + f" -> edit layer {layer} (the best after MLP 0)")
    texts = corpus()
    stats = key_statistics(lm, layer, texts)
    request = EditRequest.from_prompts(lm, EDIT_PROMPTS, "France", " Rome")
    edit = rome_edit(lm, request, layer, stats=stats, corpus=texts)
    info = edit.info
    print(f"key statistics over {len(texts)} paragraphs of Python's reference; |delta| / |v| = "
          f"{info['delta_norm'] / info['value_norm']:.2f}; ridge {info['ridge']:.3g}")
    neighbour_prompts = [f"The capital of {country} is" for country in NEIGHBOURS]
    before = {"edit": next_token(lm, EDIT_PROMPTS), "para": next_token(lm, PARAPHRASES),
              "neigh": next_token(lm, neighbour_prompts), "chat": chat_answer(lm, "What is the capital of France?")}
    with edit.apply(lm):
        after = {"edit": next_token(lm, EDIT_PROMPTS), "para": next_token(lm, PARAPHRASES),
                 "neigh": next_token(lm, neighbour_prompts), "chat": chat_answer(lm, "What is the capital of France?")}
    for name, prompts in (("edit", EDIT_PROMPTS), ("para", PARAPHRASES), ("neigh", neighbour_prompts)):
        for prompt, b, a in zip(prompts, before[name], after[name], strict=True):
            print(f"  [{name}] {prompt!r}: {b!r} -> {a!r}")
    efficacy = sum(t == " Rome" for t in after["para"]) / len(PARAPHRASES)
    kept = sum(a == b for a, b in zip(after["neigh"], NEIGHBOURS.values(), strict=True)) / len(NEIGHBOURS)
    print(f"paraphrase efficacy (next token ' Rome'): {efficacy:.2f}; neighbourhood kept (true capital): {kept:.2f}")
    print(f"chat 'What is the capital of France?': {before['chat']!r} -> {after['chat']!r}")
    with tempfile.TemporaryDirectory() as tmp:
        from transformers import AutoModelForCausalLM

        start = time.perf_counter()
        out = export_hf(lm, edit, Path(tmp) / "smollm2-rome")
        plain = lsi.LanguageModel(AutoModelForCausalLM.from_pretrained(out), lm.tokenizer)
        exported = chat_answer(plain, "What is the capital of France?")
        error = json.loads((out / "lsi_export.json").read_text())["max_abs_logit_error"]
        print(f"export_hf -> plain transformers checkpoint ({time.perf_counter() - start:.1f} s, checked on reload: "
              f"max |Δlogit| {error:.2g}); its chat answer: {exported!r}")
    return {"layer": layer, "efficacy": efficacy, "neighbourhood": kept, "chat_after": after["chat"],
            "exported_chat": exported}


def one_token_ids(lm: lsi.LanguageModel, words: Sequence[str]) -> list[int]:
    return [ids[0] for ids in (lm.encode(w) for w in words) if len(ids) == 1]


def negativity(prompts: Sequence[str]) -> Callable[[lsi.LanguageModel], float]:
    """log P(a negative word next) - log P(a positive word next), averaged over the prompts (nats)."""
    def score(lm: lsi.LanguageModel) -> float:
        batch = lm.to_batch(list(prompts), padding_side="left")
        logp = lm.forward(batch)[:, -1].float().log_softmax(-1)
        neg, pos = one_token_ids(lm, NEGATIVE_WORDS), one_token_ids(lm, POSITIVE_WORDS)
        return float((logp[:, neg].logsumexp(-1) - logp[:, pos].logsumexp(-1)).mean())
    return score


def continuation(lm: lsi.LanguageModel, prompt: str, tokens: int = 16) -> str:
    return str(lm.tokenizer.decode(lm.generate(prompt, max_new_tokens=tokens)[0, -tokens:], skip_special_tokens=True))


def section_sentiment(lm: lsi.LanguageModel) -> dict[str, Any]:
    show(f"A diff-in-means 'negative review' vector, layer and strength chosen on dev under KL <= {TAU} nats")
    by_site = diff_in_means_by_site(lm, NEGATIVE, POSITIVE, [f"blocks.{layer}.resid_pre" for layer in LAYERS],
                                    positions="all")
    vectors = {layer: by_site[f"blocks.{layer}.resid_pre"] for layer in LAYERS}
    candidates = grid(lambda layer, alpha: Add(f"blocks.{layer}.resid_pre", vectors[layer], alpha, model=lm),
                      layer=LAYERS, alpha=ALPHAS)
    sel = select(lm, candidates, success=negativity(DEV_PROMPTS), corpus=KL_TEXT, tau=TAU, stop_along="alpha")
    print(f"score: log P(negative word next) - log P(positive word next) after '... was'; "
          f"unsteered dev {negativity(DEV_PROMPTS)(lm):+.2f}")
    for p in sel.curve:
        print(f"  L{p.settings['layer']:<3} alpha {p.settings['alpha']:<4g} score {p.success:+6.2f}  KL {p.kl:.3f}"
              + ("  <- chosen" if p is sel.best else ""))
    best, chosen = sel.best, sel.steering
    if best is None or chosen is None:
        print(f"no candidate within KL {TAU}")
        return {}
    layer, alpha = best.settings["layer"], best.settings["alpha"]
    vector = vectors[layer]
    random = torch.randn(vector.shape, generator=torch.Generator().manual_seed(0))
    baseline = Add(f"blocks.{layer}.resid_pre", random * vector.norm() / random.norm(), alpha, model=lm)
    ref = reference(lm, KL_TEXT)
    rows = {"unsteered": (negativity(TEST_PROMPTS)(lm), 0.0)}
    for name, steering in (("diff-in-means", chosen), ("random, same norm", baseline)):
        value, kl, _ = measured(lm, steering, negativity(TEST_PROMPTS), ref)
        rows[name] = (value, kl)
    print(f"test prompts ({len(TEST_PROMPTS)}, other subjects):")
    for name, (value, kl) in rows.items():
        print(f"  {name:<18} score {value:+6.2f}  KL {kl:.3f}")
    prompt = TEST_PROMPTS[0]
    print(f"  greedy, {prompt!r}: {continuation(lm, prompt)!r}")
    with chosen.apply(lm):
        print(f"  steered:{'':<{len(prompt) + 2}} {continuation(lm, prompt)!r}")
    return {"chosen": best.settings, "test": rows}


SECTIONS: dict[str, Callable[[lsi.LanguageModel], dict[str, Any]]] = {
    "rome": section_rome, "sentiment": section_sentiment,
}


def run(model: str, sections: list[str]) -> dict[str, dict[str, Any]]:
    """Run the named sections, printing each one's output and time; returns each section's key figures."""
    torch.set_num_threads(2)
    lm = lsi.load(model)
    figures = {}
    for name in sections:
        start = time.perf_counter()
        figures[name] = SECTIONS[name](lm)
        print(f"({name}: {time.perf_counter() - start:.1f} s)")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("model", help="the .gguf file (scripts/get-smollm2 prints its path)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    args = parser.parse_args()
    run(args.model, args.sections.split(","))


if __name__ == "__main__":
    main()
