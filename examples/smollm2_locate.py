"""Locating "the capital of France is Paris" in SmolLM2-135M-Instruct: causal tracing, activation vs attribution
patching, logit lens and EAP-IG. docs/smollm2.md shows the output of

    OMP_NUM_THREADS=2 .venv/bin/python examples/smollm2_locate.py "$(scripts/get-smollm2)" [--sections tracing,...]

The prompt is plain text, "The capital of France is" (p(" Paris") = 0.77 after it); the counterfactual swaps the
country for Italy (one token as well, so the prompts align token by token), and the metric is
logit(" Paris") - logit(" Rome") at the last token.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

import lsi
from lsi.evaluation.ranking import rank_correlation
from lsi.locate import circuits, gradients, patching, tracing, vocab
from lsi.locate.metrics import Metric, logit_diff

PROMPT, SWAPPED = "The capital of France is", "The capital of Italy is"


def show(title: str) -> None:
    print(f"\n## {title}")


def section_tracing(lm: lsi.LanguageModel, metric: Metric) -> dict[str, Any]:
    show("Causal tracing: which MLP outputs, restored at which token, bring ' Paris' back (subject 'France')")
    result = tracing.causal_tracing(lm, PROMPT, "France", " Paris", kind="mlp", noise_samples=10)
    s = result.settings
    print(f"p(Paris): clean {s['p_clean']:.3f}, subject noised {s['p_corrupt']:.3f} (noise std {s['noise_std']:.3f})")
    names = [repr(lm.tokenizer.decode([i])) for i in lm.encode(PROMPT)]
    print("indirect effect per layer (rows, every 3rd) and token (columns):")
    print(f"{'':<20}" + "".join(f"{n:>10}" for n in names))
    for row in range(0, lm.dims.n_layers, 3):
        print(f"{result.axes[0][1][row]:<20}" + "".join(f"{float(v):10.3f}" for v in result.scores[row]))
    print("top 5 cells: " + ", ".join(f"{k} {v:+.3f}" for k, v in result.top(5)))
    return {"p_clean": s["p_clean"], "p_corrupt": s["p_corrupt"], "top": result.top(3)}


def section_patching(lm: lsi.LanguageModel, metric: Metric) -> dict[str, Any]:
    show("Activation patching vs attribution patching on every head (France -> Italy, denoising)")
    exact = patching.activation_patching(lm, [PROMPT], [SWAPPED], metric, "blocks.*.attn.head_out")
    approx = gradients.attribution_patching(lm, [PROMPT], [SWAPPED], metric, "blocks.*.attn.head_out")
    rho = rank_correlation(exact.scores.flatten().tolist(), approx.scores.flatten().tolist())
    print(f"F_clean = {exact.settings['f_clean']:.3f}, F_corrupt = {exact.settings['f_corrupt']:.3f}")
    print(f"Spearman(attribution, exact) over {exact.scores.numel()} heads = {rho:.3f}")
    print("top 5 exact:       " + ", ".join(f"{k} {v:+.3f}" for k, v in exact.top(5, by="abs")))
    print("top 5 attribution: " + ", ".join(f"{k} {v:+.3f}" for k, v in approx.top(5, by="abs")))
    resid = patching.activation_patching(lm, [PROMPT], [SWAPPED], metric, "blocks.*.resid_pre", positions="each")
    country = lm.encode(PROMPT).index(lm.encode(" France")[0])
    moved = [i for i in range(lm.dims.n_layers) if float(resid.scores[i, -1]) > float(resid.scores[i, country])]
    print(f"resid_pre patching: the country token carries the answer up to layer {moved[0] - 1 if moved else '-'}, "
          f"the last token from layer {moved[0] if moved else '-'} on")
    return {"spearman": rho, "top_exact": exact.top(3, by="abs"), "handover_layer": moved[0] if moved else None}


def section_lens(lm: lsi.LanguageModel, metric: Metric) -> dict[str, Any]:
    show("Logit lens at the last token: the top token and p(' Paris') after every 3rd layer")
    lens = vocab.logit_lens(lm, [PROMPT])
    probs = lens.probs()[:, 0, -1]
    paris = lm.encode(" Paris")[0]
    for row in range(0, len(lens.labels), 3):
        top = int(probs[row].argmax())
        print(f"{lens.labels[row]:<22} top {lm.tokenizer.decode([top])!r:<12} {float(probs[row, top]):.3f}   "
              f"p(Paris) {float(probs[row, paris]):.3f}")
    first = next((lens.labels[r] for r in range(len(lens.labels)) if int(probs[r].argmax()) == paris), None)
    print(f"first layer whose top token is ' Paris': {first}")
    return {"first_paris": first, "p_paris_last": float(probs[-1, paris])}


def section_circuits(lm: lsi.LanguageModel, metric: Metric) -> dict[str, Any]:
    show("EAP-IG (5 steps) on the France / Italy pair: top edges and faithfulness")
    edges = circuits.eap_ig(lm, [PROMPT], [SWAPPED], metric, steps=5)
    done = edges.settings["completeness"]
    print(f"{edges.scores.numel()} edges; edges out of embed sum to {done['embed_edges_sum']:.3f}, "
          f"F_clean - F_corrupt = {done['f_clean_minus_f_corrupt']:.3f}")
    for label, score in edges.top(5, by="abs"):
        print(f"  {label:<50} {score:+.3f}")
    faithful = {k: circuits.faithfulness(lm, [PROMPT], [SWAPPED], metric, edges.select(k=k, by="abs"))
                for k in (100, 1000)}
    for k, f in faithful.items():
        print(f"faithfulness of the top {k} edges: {f:.3f}")
    return {"faithfulness": faithful}


SECTIONS: dict[str, Callable[[lsi.LanguageModel, Metric], dict[str, Any]]] = {
    "tracing": section_tracing, "patching": section_patching, "lens": section_lens, "circuits": section_circuits,
}


def run(model: str, sections: list[str]) -> dict[str, dict[str, Any]]:
    """Run the named sections, printing each one's output and time; returns each section's key figures."""
    torch.set_num_threads(2)
    start = time.perf_counter()
    lm = lsi.load(model)
    print(f"loaded {lm} in {time.perf_counter() - start:.1f} s")
    metric = logit_diff(" Paris", " Rome", tokenizer=lm.tokenizer)
    print(f"metric {metric.name}: clean {float(metric(lm.forward(PROMPT), lm.to_batch(PROMPT))):.3f}, "
          f"swapped {float(metric(lm.forward(SWAPPED), lm.to_batch(SWAPPED))):.3f}")
    figures = {}
    for name in sections:
        start = time.perf_counter()
        figures[name] = SECTIONS[name](lm, metric)
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
