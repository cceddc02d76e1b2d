"""Worked examples of every locate family on the real checkpoint ../shared/models/stories260k.

Each section is a function that prints what it measured; docs/locate.md shows the output of

    OMP_NUM_THREADS=1 .venv/bin/python examples/locate_stories260k.py [--sections lens,patching,...]

The running example: "Once upon a time, there was a little girl named Lily. Lily liked to play with her ball.
One day," — the model's next token is " Lily" (or "she"). The counterfactual swaps the name for "Tim" (one token
as well, so the prompts align token by token), and the metric is logit(Lily) − logit(Tim) at the last token.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import lsi
from lsi.evaluation.ranking import rank_correlation
from lsi.locate import circuits, gradients, heads, layers, patching, probing, tuned_lens, vocab
from lsi.locate.metrics import logit_diff

STORIES = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "stories260k"
TEMPLATE = "Once upon a time, there was a little girl named {name}. {name} liked to play with her ball. One day,"
TEXTS = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park.",
    "Tom had a big red ball. He liked to throw it high in the sky. One day, the ball got stuck in a tree.",
    "The sun was shining and the birds were singing. Sue and her mom went for a walk in the garden.",
    "Once upon a time, there was a small dog named Spot. Spot was very happy because he had a new bone.",
]


def setup() -> tuple[lsi.LanguageModel, list[int], list[int], object]:
    lm = lsi.load(STORIES, attn_implementation="eager")  # head scores read attention patterns
    clean, corrupt = (lm.to_batch(TEMPLATE.format(name=n)).input_ids[0].tolist() for n in ("Lily", "Tim"))
    return lm, clean, corrupt, logit_diff(*metric_tokens(lm))


def metric_tokens(lm: lsi.LanguageModel) -> tuple[int, int]:
    """The token ids of the two names: the metric is logit(Lily) - logit(Tim)."""
    return lm.encode("Lily")[0], lm.encode("Tim")[0]


def show(title: str) -> None:
    print(f"\n## {title}")


def tokens(lm: lsi.LanguageModel, ids: list[int]) -> list[str]:
    return [lm.tokenizer.decode([i]) for i in ids]


def section_lens(lm, clean, corrupt, metric) -> dict[str, Any]:
    show("Vocabulary projection: logit lens and tuned lens")
    lens = vocab.logit_lens(lm, [clean])
    top = lens.probs()[:, 0, -1].topk(3)
    for label, p, ids in zip(lens.labels, top.values, top.indices, strict=True):
        best = [f"{lm.tokenizer.decode([int(i)])!r} {float(q):.3f}" for q, i in zip(p, ids, strict=True)]
        print(f"{label:<20} " + "  ".join(best))
    lens_fit = tuned_lens.TunedLens.train(lm, TEXTS[:3], steps=60, seed=0)
    kl = tuned_lens.lens_kl(lm, TEXTS[3:], lens_fit)
    print("per-layer KL to the final distribution on a held-out story (nats):")
    for row, name in enumerate(kl.axes[0][1]):
        print(f"  {name:<6} " + " ".join(f"{v:6.2f}" for v in kl.scores[row].tolist()))
    dla = vocab.direct_logit_attribution(lm, [clean], metric_tokens(lm))
    print("direct logit attribution to logit(Lily) - logit(Tim), top 5 components:")
    for label, score in dla.top(5, by="abs"):
        print(f"  {label:<28} {score:+.3f}")
    total = float(dla.scores.sum()) + dla.settings["constant"]
    print(f"  (sum of all components + constant = {total:.3f}; model logit difference = {dla.settings['logit']:.3f})")
    return {"dla_total": total, "logit_diff": dla.settings["logit"],
            "tuned_kl": kl.scores[1].tolist(), "logit_kl": kl.scores[0].tolist()}


def section_patching(lm, clean, corrupt, metric) -> dict[str, Any]:
    show("Causal attribution: activation patching (denoising, resid_pre x layers x positions)")
    r = patching.activation_patching(lm, [clean], [corrupt], metric, "blocks.*.resid_pre", positions="each")
    print(f"F_clean = {r.settings['f_clean']:.3f}, F_corrupt = {r.settings['f_corrupt']:.3f}; "
          f"{r.settings['patched_runs']} patched runs")
    names = tokens(lm, clean)
    print("normalized score per layer (rows) at the name tokens and the last three positions:")
    cols = [i for i, t in enumerate(names) if t == "Lily"] + [len(names) - 3, len(names) - 2, len(names) - 1]
    print("        " + " ".join(f"{names[c]!r:>8}@{c:<2}" for c in cols))
    for layer in range(r.shape[0]):
        print(f"  L{layer}    " + " ".join(f"{float(r.scores[layer, c]):11.3f}" for c in cols))
    heads_r = patching.activation_patching(lm, [clean], [corrupt], metric, "blocks.*.attn.head_out")
    print("top heads (all positions at once): " + ", ".join(f"{k} {v:+.3f}" for k, v in heads_r.top(4, by="abs")))
    return {"name_layer0": float(r.scores[0, cols[0]]), "last_layer4": float(r.scores[4, cols[-1]]),
            "top_head": heads_r.top(1, by="abs")[0][0]}


def section_gradients(lm, clean, corrupt, metric) -> dict[str, Any]:
    show("Gradient detection: attribution patching vs exact patching on every head; integrated gradients")
    exact = patching.activation_patching(lm, [clean], [corrupt], metric, "blocks.*.attn.head_out")
    approx = gradients.attribution_patching(lm, [clean], [corrupt], metric, "blocks.*.attn.head_out")
    rho = rank_correlation(exact.scores.flatten().tolist(), approx.scores.flatten().tolist())
    print(f"Spearman(attribution, exact) over {exact.scores.numel()} heads = {rho:.3f}")
    print("top 4 by attribution patching: " + ", ".join(f"{k} {v:+.3f}" for k, v in approx.top(4, by="abs")))
    ig = gradients.integrated_gradients(lm, [clean], metric, "blocks.2.mlp.post", steps=32)
    print(f"integrated gradients over layer-2 neurons (zero baseline, 32 steps): relative completeness error "
          f"{gradients.completeness_error(ig, relative=True):.4f}; top neurons "
          + ", ".join(f"{k} {v:+.3f}" for k, v in ig.top(3, by="abs")))
    return {"spearman": rho, "ig_completeness": gradients.completeness_error(ig, relative=True)}


def section_magnitude(lm, clean, corrupt, metric) -> dict[str, Any]:
    show("Magnitude analysis: Block Influence, angular distance, head scores")
    bi = layers.block_influence(lm, TEXTS)
    ang = layers.angular_distance(lm, TEXTS)
    print("layer      " + " ".join(f"{x:>9}" for x in bi.axes[0][1]))
    print("BI         " + " ".join(f"{v:9.3f}" for v in bi.scores.tolist()))
    print("angular    " + " ".join(f"{v:9.3f}" for v in ang.scores.tolist()))
    ids = heads.repeated_random_tokens(16, 20, vocab=(100, 500), bos=1, seed=0)
    ind, prev = heads.induction_scores(lm, ids), heads.previous_token_scores(lm, ids)
    print("induction score, top 3: " + ", ".join(f"L{k.replace('@', ' H')} {v:.3f}" for k, v in ind.top(3)))
    print("previous-token score, top 3: " + ", ".join(f"L{k.replace('@', ' H')} {v:.3f}" for k, v in prev.top(3)))
    return {"block_influence": bi.scores.tolist(), "best_induction": ind.top(1)[0][1]}


def section_probing(lm, clean, corrupt, metric) -> dict[str, Any]:
    show("Probing: is the main character a girl or a boy? (last token, resid_post per layer, control task)")
    names = {"girl": ["Lily", "Sue", "Anna", "Lucy", "Mia", "Amy"], "boy": ["Tom", "Tim", "Ben", "Max", "Jack", "Sam"]}
    places = ["park", "garden", "forest", "beach", "house"]
    texts, labels, types = [], [], []
    for label, group in names.items():
        for name in group:
            for place in places:
                texts.append(f"Once upon a time, there was a {label} named {name}. {name} went to the {place}. Then")
                labels.append(label)
                types.append(name)
    r = probing.probe(lm, texts, labels, ["embed", "blocks.*.resid_post"], types=types, folds=4, seed=0)
    print(f"{len(texts)} prompts; control task: random labels per name (Hewitt & Liang)")
    print("site                  held-out  control  selectivity")
    for label in r.labels:
        acc, control = r.settings["accuracy"][label], r.settings["control_accuracy"][label]
        print(f"{label:<22} {acc:8.3f} {control:8.3f} {r.settings['selectivity'][label]:12.3f}")
    return {"accuracy": r.settings["accuracy"], "selectivity": r.settings["selectivity"]}


def section_circuits(lm, clean, corrupt, metric) -> dict[str, Any]:
    show("Circuit discovery: EAP-IG edges, node scores and faithfulness")
    edges = circuits.eap_ig(lm, [clean], [corrupt], metric, steps=10)
    done = edges.settings["completeness"]
    print(f"{edges.scores.numel()} edges; completeness: edges out of embed sum to {done['embed_edges_sum']:.3f}, "
          f"F_clean - F_corrupt = {done['f_clean_minus_f_corrupt']:.3f}")
    for label, score in edges.top(5, by="abs"):
        print(f"  {label:<50} {score:+.3f}")
    nodes = circuits.node_scores(edges)
    print("top nodes: " + ", ".join(f"{k} {v:.2f}" for k, v in nodes.top(5)))
    faithful = {}
    for k in (10, 30, 100):
        faithful[k] = circuits.faithfulness(lm, [clean], [corrupt], metric, edges.select(k=k, by="abs"))
        print(f"faithfulness of the top {k} edges: {faithful[k]:.3f}")
    return {"faithfulness": faithful, "top_node": nodes.top(1)[0][0]}


SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "lens": section_lens, "patching": section_patching, "gradients": section_gradients,
    "magnitude": section_magnitude, "probing": section_probing, "circuits": section_circuits,
}


def run(sections: list[str]) -> dict[str, dict[str, Any]]:
    """Run the named sections, printing as they go; returns each section's key figures."""
    torch.set_num_threads(1)
    lm, clean, corrupt, metric = setup()
    batch_clean, batch_corrupt = lm.to_batch([clean]), lm.to_batch([corrupt])
    print(f"prompt: {lm.tokenizer.decode(clean, skip_special_tokens=True)!r} ({len(clean)} tokens)")
    print(f"metric: {metric.name} (Lily vs Tim), clean {float(metric(lm.forward(batch_clean), batch_clean)):.3f}, "
          f"corrupted {float(metric(lm.forward(batch_corrupt), batch_corrupt)):.3f}")
    return {name: SECTIONS[name](lm, clean, corrupt, metric) for name in sections}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    run(parser.parse_args().sections.split(","))


if __name__ == "__main__":
    main()
