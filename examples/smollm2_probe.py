"""Probing SmolLM2-135M-Instruct: where is the sentiment of a short review linearly readable? A logistic probe per
layer (the residual stream after each layer at the closing full stop), with a control task (Hewitt & Liang: a random
label per adjective, which a probe can only learn by memorizing which adjective the state carries), so that
selectivity = accuracy - control accuracy credits sentiment, not word identity. docs/smollm2.md shows the output of

    OMP_NUM_THREADS=2 .venv/bin/python examples/smollm2_probe.py "$(scripts/get-smollm2)"

Every prompt ends in the same token ("The hotel was lovely."), so the probed token itself says nothing.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import lsi
from lsi.locate import probing

SUBJECTS = ["The hotel", "The movie", "Our dinner", "The concert", "This phone", "The service", "The book",
            "The trip"]
ADJECTIVES = {"positive": ["lovely", "wonderful", "great", "excellent", "delightful", "superb", "fantastic",
                           "charming", "brilliant", "pleasant", "perfect", "marvellous"],
              "negative": ["awful", "terrible", "dreadful", "horrible", "disappointing", "miserable", "boring",
                           "unpleasant", "mediocre", "annoying", "poor", "disgusting"]}
L2 = 1.0  # a constrained probe (Hewitt & Liang): with 1e-3 it also memorizes the control labels of every adjective


def run(model: str) -> dict[str, Any]:
    torch.set_num_threads(2)
    start = time.perf_counter()
    lm = lsi.load(model)
    texts, labels, types = [], [], []
    for label, adjectives in ADJECTIVES.items():
        for adjective in adjectives:
            for subject in SUBJECTS:
                texts.append(f"{subject} was {adjective}.")
                labels.append(label)
                types.append(adjective)
    print(f"{len(texts)} prompts ({len(SUBJECTS)} subjects x {sum(map(len, ADJECTIVES.values()))} adjectives); "
          f"control task: a random label per adjective; l2 = {L2}")
    r = probing.probe(lm, texts, labels, ["embed", "blocks.*.resid_post"], types=types, folds=4, seed=0,
                      l2=L2)
    print("site                    held-out  control  selectivity")
    for label in r.labels:
        acc, control = r.settings["accuracy"][label], r.settings["control_accuracy"][label]
        print(f"{label:<22} {acc:9.3f} {control:8.3f} {r.settings['selectivity'][label]:12.3f}")
    best = max(r.labels, key=lambda label: r.settings["selectivity"][label])
    print(f"most selective: {best} (selectivity {r.settings['selectivity'][best]:.3f}); "
          f"{time.perf_counter() - start:.1f} s in all")
    return {"accuracy": r.settings["accuracy"], "selectivity": r.settings["selectivity"], "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("model", help="the .gguf file (scripts/get-smollm2 prints its path)")
    run(parser.parse_args().model)


if __name__ == "__main__":
    main()
