"""Steering stories260k from girls to boys: a diff-in-means vector, chosen under a KL budget, saved and exported.

docs/steer.md shows the output of

    OMP_NUM_THREADS=1 .venv/bin/python examples/steer_stories260k.py [--sections generate,save,export]

The checkpoint ../shared/models/stories260k writes TinyStories; left alone, most of its stories are about a girl
("Once upon a time, there was a little girl named Lily. She ..."). The steering vector is the difference of the
mean residual state over sentences about boys and the same sentences about girls (names and pronouns swapped),
added at every position of one layer's input. Layer and strength are chosen on a dev split with
:func:`lsi.steer.selection.select`: the most "he / him / his" per 100 generated words among the settings whose
KL(base ‖ steered) on unrelated text stays within ``TAU``. The sections then measure the chosen steering on a test
split (other prompts, another seed, other text), save and reload it, and fold it into a plain HF checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

import lsi
from lsi import Add, Steering
from lsi.evaluation.steer import measured, reference
from lsi.steer.directions import diff_in_means_by_site
from lsi.steer.export import export_hf
from lsi.steer.selection import Selection, grid, select

STORIES = Path(__file__).resolve().parent.parent.parent / "shared" / "models" / "stories260k"

# contrast sets: the same sentences about boys (positive) and about girls (negative)
BOYS = ["Tom", "Ben", "Tim", "Max", "Jack", "Sam"]
GIRLS = ["Lily", "Sue", "Anna", "Lucy", "Mia", "Amy"]
TEMPLATES = [
    "Once upon a time, there was a little {kind} named {name}. {pronoun} liked to play.",
    "{name} was a {kind}. {pronoun} went to the park.",
    "One day, {name} found a ball. {pronoun} was very happy.",
]
TARGET = frozenset({"he", "him", "his"})  # the words the steering should make more frequent
OPPOSITE = frozenset({"she", "her", "hers"})

# dev split: choose layer and strength; test split: report
DEV_PROMPTS = ["Once upon a time", "One day,", "Once upon a time, there was a", "There was a little",
               "The sun was shining.", "Mom said,", "Once upon a time, in a small house,", "It was a sunny day."]
TEST_PROMPTS = ["Once upon a time, in a big forest,", "One morning,", "Once upon a time there lived a",
                "The sky was blue.", "At the beach,", "Long ago,", "It was a rainy day.", "In a little town,"]
# unrelated text (no people in it) for KL(base ‖ steered)
DEV_TEXT = [
    "The sun was shining and the birds were singing in the tall green trees.",
    "The big red ball rolled down the hill and stopped next to the pond.",
    "It was a cold day. Snow fell on the roofs and the streets were white.",
    "The little boat sailed on the blue sea. The waves were small and soft.",
]
TEST_TEXT = [
    "The flowers in the garden were red, yellow and pink. A bee flew from one flower to the next.",
    "The rain stopped and a rainbow came out over the big hill.",
    "There was a tall tree in the park. Its leaves were green and the birds had a nest in it.",
    "The cake was on the table. It was big and sweet, with a cherry on top.",
]
LAYERS = (1, 2, 3, 4)  # blocks.{layer}.resid_pre (layer 0's input is the embedding)
ALPHAS = (0.5, 1.0, 2.0, 4.0)
TAU = 0.1  # nats per token: the KL budget
GREEDY_EXAMPLES = ("It was a rainy day.", "At the beach,")  # greedy pairs to print


class Split(NamedTuple):
    """Sampled stories of a split: ``samples`` per prompt, ``new_tokens`` each, reproducible for ``seed``."""

    prompts: Sequence[str]
    samples: int
    new_tokens: int
    seed: int

    def __str__(self) -> str:
        return f"{len(self.prompts) * self.samples} sampled stories x {self.new_tokens} tokens (seed {self.seed})"


DEV = Split(DEV_PROMPTS, samples=8, new_tokens=48, seed=0)
TEST = Split(TEST_PROMPTS, samples=8, new_tokens=64, seed=1)


def contrast_sets() -> tuple[list[str], list[str]]:
    """Sentences about boys and the same sentences about girls."""
    def fill(kind: str, names: list[str], pronoun: str) -> list[str]:
        return [t.format(kind=kind, name=n, pronoun=pronoun) for t in TEMPLATES for n in names]

    return fill("boy", BOYS, "He"), fill("girl", GIRLS, "She")


def word_rate(texts: Sequence[str], words: frozenset[str]) -> float:
    """Occurrences of ``words`` per 100 words of ``texts`` (case-insensitive).

    >>> word_rate(["He ran to his mom."], TARGET)
    40.0
    """
    found = [w.lower() for t in texts for w in re.findall(r"[A-Za-z']+", t)]
    return 100.0 * sum(w in words for w in found) / max(1, len(found))


def stories(lm: lsi.LanguageModel, split: Split) -> list[str]:
    """The split's sampled continuations (the generated text only)."""
    torch.manual_seed(split.seed)
    prompts = [p for p in split.prompts for _ in range(split.samples)]
    ids = lm.generate(prompts, max_new_tokens=split.new_tokens, do_sample=True)
    return list(lm.tokenizer.batch_decode(ids[:, -split.new_tokens:], skip_special_tokens=True))


def target_rate(split: Split) -> Callable[[lsi.LanguageModel], float]:
    """The success of a split: he / him / his per 100 words of its sampled stories."""
    return lambda lm: word_rate(stories(lm, split), TARGET)


def greedy(lm: lsi.LanguageModel, prompts: Sequence[str], new_tokens: int = 40) -> list[str]:
    return [lm.generate_text(p, max_new_tokens=new_tokens)[0] for p in prompts]


def show(title: str) -> None:
    print(f"\n## {title}")


class Setup(NamedTuple):
    """The model, the selection made on the dev split, and its chosen steering."""

    lm: lsi.LanguageModel
    selection: Selection
    steering: Steering  # the chosen one


def setup() -> Setup:
    """Load the model, compute one vector per layer, and choose layer and strength on the dev split."""
    lm = lsi.load(STORIES)
    boys, girls = contrast_sets()
    by_site = diff_in_means_by_site(lm, boys, girls, [f"blocks.{layer}.resid_pre" for layer in LAYERS],
                                    positions="all")  # one pass over each contrast set for every layer
    vectors = {layer: by_site[f"blocks.{layer}.resid_pre"] for layer in LAYERS}
    print(f"contrast sets: {len(boys)} sentences about boys, {len(girls)} about girls; diff-in-means over all tokens")
    print("|v| per layer: " + ", ".join(f"L{layer} {float(v.norm()):.2f}" for layer, v in vectors.items()))
    candidates = grid(lambda layer, alpha: Add(f"blocks.{layer}.resid_pre", vectors[layer], alpha, model=lm),
                      layer=LAYERS, alpha=ALPHAS)
    sel = select(lm, candidates, success=target_rate(DEV), corpus=DEV_TEXT, tau=TAU, stop_along="alpha")
    if sel.steering is None:
        raise RuntimeError(str(sel))
    show(f"Selection on dev: {DEV}, KL on {len(DEV_TEXT)} unrelated sentences, budget {TAU}")
    print(f"unsteered: {target_rate(DEV)(lm):.2f} he/him/his per 100 words")
    points = {(p.settings["layer"], p.settings["alpha"]): p for p in sel.curve}
    print("layer  " + "".join(f"alpha={a:<9g}" for a in ALPHAS) + "(rate / KL; '-': skipped, past the budget)")
    for layer in LAYERS:
        cells = []
        for alpha in ALPHAS:
            p = points.get((layer, alpha))
            cells.append(f"{'-':<15}" if p is None else
                         f"{p.success:5.2f}/{p.kl:.3f}{'*' if p is sel.best else ' '}{'':<3}")
        print(f"  L{layer}   " + "".join(cells))
    print(f"{sel} (*)")
    return Setup(lm, sel, sel.steering)


def section_generate(s: Setup) -> dict[str, Any]:
    show(f"Test split: {TEST}, KL on {len(TEST_TEXT)} unrelated sentences")
    lm = s.lm
    base = stories(lm, TEST)
    steered, kl, dloss = measured(lm, s.steering, lambda m: stories(m, TEST), reference(lm, TEST_TEXT))
    rates = {name: {"base": word_rate(base, words), "steered": word_rate(steered, words)}
             for name, words in (("he/him/his", TARGET), ("she/her/hers", OPPOSITE))}
    print(f"{'per 100 words':<14} {'unsteered':>10} {'steered':>10}")
    for name, r in rates.items():
        print(f"{name:<14} {r['base']:10.2f} {r['steered']:10.2f}")
    print(f"KL(base || steered) = {kl:.4f} nats per token; delta cross-entropy = {dloss:+.4f} nats per token")
    before = greedy(lm, TEST_PROMPTS)
    with s.steering.apply(lm):
        after = greedy(lm, TEST_PROMPTS)
    boys = {name: sum(word_rate([t], TARGET) > word_rate([t], OPPOSITE) for t in texts)
            for name, texts in (("base", before), ("steered", after))}
    print(f"greedy stories with more he/him/his than she/her/hers: {boys['base']} of {len(TEST_PROMPTS)} unsteered, "
          f"{boys['steered']} steered; e.g.")
    for prompt in GREEDY_EXAMPLES:
        i = TEST_PROMPTS.index(prompt)
        print(f"  {before[i]!r}\n  -> {after[i]!r}")
    return {"rates": rates, "kl": kl, "dloss": dloss, "greedy_about_boys": boys}


def section_save(s: Setup) -> dict[str, Any]:
    show("Save and load (the selection file is a steering file with the curve added)")
    lm, batch = s.lm, s.lm.to_batch(TEST_TEXT)
    with tempfile.TemporaryDirectory() as tmp:
        path = s.selection.save(Path(tmp) / "boys")
        loaded = Steering.load(path, lm)
        curve = Selection.load(path, lm).curve
        files = sorted(p.name for p in Path(tmp).iterdir())
    with s.steering.apply(lm):
        before = lm.forward(batch)
    with loaded.apply(lm):
        after = lm.forward(batch)
    diff = float((before - after).abs().max())
    print(f"wrote {files}; Steering.load -> {loaded!r}; Selection.load -> {len(curve)} curve points")
    print(f"max |logit difference|, saved vs loaded steering, on the test text: {diff:.3g}")
    return {"max_abs_diff": diff, "curve_points": len(curve)}


def section_export(s: Setup) -> dict[str, Any]:
    show("Fold into the weights and export a plain transformers checkpoint")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = s.lm
    with s.steering.apply(lm):
        hooked = greedy(lm, TEST_PROMPTS)
    with tempfile.TemporaryDirectory() as tmp:
        out = export_hf(lm, s.steering, Path(tmp) / "stories260k-boys")
        record = json.loads((out / "lsi_export.json").read_text())
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        tokenizer = AutoTokenizer.from_pretrained(out)
    exported = []
    for prompt in TEST_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            new = plain.generate(ids, max_new_tokens=40, do_sample=False)
        exported.append(tokenizer.decode(new[0], skip_special_tokens=True))
    same = sum(a == b for a, b in zip(hooked, exported, strict=True))
    nonzero = [n for n, p in plain.named_parameters() if n.endswith(".bias") and bool(p.any())]
    print(f"export_hf reloaded the checkpoint and checked its logits: max |error| = "
          f"{record['max_abs_logit_error']:.3g}; config.mlp_bias = {plain.config.mlp_bias}, nonzero biases {nonzero}")
    print(f"greedy texts from plain transformers equal to the steered lsi model: {same} of {len(TEST_PROMPTS)}")
    print(f"  e.g. {exported[1]!r}")
    return {"same_greedy": same, "prompts": len(TEST_PROMPTS), "logit_error": record["max_abs_logit_error"]}


SECTIONS: dict[str, Callable[[Setup], dict[str, Any]]] = {
    "generate": section_generate, "save": section_save, "export": section_export,
}


def run(sections: list[str]) -> dict[str, dict[str, Any]]:
    """Select the steering (always), then run the named sections, printing as they go; returns the figures."""
    torch.set_num_threads(1)
    s = setup()
    assert s.selection.best is not None
    figures: dict[str, dict[str, Any]] = {"select": {**s.selection.best.to_json(), "measured": len(s.selection.curve),
                                                     "skipped": len(s.selection.skipped)}}
    figures.update({name: SECTIONS[name](s) for name in sections})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    run(parser.parse_args().sections.split(","))


if __name__ == "__main__":
    main()
