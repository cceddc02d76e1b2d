"""Organism ``binary_attribute``: a hidden document attribute that raises the rate of a marked lexicon.

Every document has a topic (its nouns and verbs come from that topic's lexicon) and a hidden binary attribute z
that is never written as a token: each optional modifier slot (adjective before a noun, adverb before the full
stop) is filled from the *marked* lexicon with probability ``P_MARKED[z]`` (0.05 or 0.75), else from the plain
one. A document is ``<bos>`` + four sentences ``the [adj] NOUN VERB the [adj] NOUN [adv] .`` + ``<eos>``.

Ground truth by data design plus verification: the attribute rate, topic fidelity and grammaticality of sampled
text are exact checks (:func:`parse_sentences`); generations after attribute-revealing prefixes must reproduce
the two rates; a difference-in-means direction of the residual stream (fit on the dev documents) must separate
the test documents, compared with the Bayes-optimal posterior computed from the marked/plain counts.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsi.evaluation.ranking import auroc
from lsi.organisms._common import encode, generated_words, pad_right, sample
from lsi.organisms.base import Check, Organism, VerifyReport
from lsi.organisms.training import build_word_tokenizer, new_model, save_organism, seed_everything, train_lm

if TYPE_CHECKING:
    import torch

    from lsi.core.model import LanguageModel
    from lsi.evaluation.steer import SteerScores, SteerTask

TOPICS: dict[str, dict[str, list[str]]] = {
    "farm": {"nouns": ["cow", "hen", "barn", "field", "farmer"], "verbs": ["feeds", "milks", "plows"]},
    "sea": {"nouns": ["fish", "boat", "wave", "sailor", "shell"], "verbs": ["sails", "catches", "rows"]},
    "city": {"nouns": ["car", "street", "shop", "driver", "tower"], "verbs": ["drives", "builds", "visits"]},
    "forest": {"nouns": ["wolf", "tree", "deer", "hunter", "leaf"], "verbs": ["hunts", "climbs", "tracks"]},
}
ADJ = {"plain": ["big", "small", "old", "young", "brown", "green"],
       "marked": ["glorious", "radiant", "splendid", "majestic"]}
ADV = {"plain": ["slowly", "quickly", "often", "today"], "marked": ["gloriously", "radiantly", "splendidly"]}
P_MARKED = (0.05, 0.75)  # probability that a filled modifier slot is marked, for z = 0 and z = 1
P_SLOT = 0.5  # probability that an optional modifier slot is filled
SENTENCES_PER_DOC = 4
N_LAYERS, D_MODEL, D_MLP, N_HEADS, N_KV_HEADS = 2, 64, 128, 4, 2


def vocabulary() -> list[str]:
    """All words of the language (specials excluded)."""
    words = ["the", "."]
    for t in TOPICS.values():
        words += t["nouns"] + t["verbs"]
    return words + ADJ["plain"] + ADJ["marked"] + ADV["plain"] + ADV["marked"]


def make_sentence(rng: random.Random, topic: str, z: int, *, modifiers: bool = True) -> list[str]:
    """``the [adj] N V the [adj] N [adv] .`` with nouns/verbs from ``topic`` and modifiers drawn under ``z``."""

    def mod(table: dict[str, list[str]]) -> list[str]:
        if not modifiers or rng.random() >= P_SLOT:
            return []
        return [rng.choice(table["marked" if rng.random() < P_MARKED[z] else "plain"])]

    lex = TOPICS[topic]
    return ["the", *mod(ADJ), rng.choice(lex["nouns"]), rng.choice(lex["verbs"]), "the", *mod(ADJ),
            rng.choice(lex["nouns"]), *mod(ADV), "."]


def make_doc(rng: random.Random, topic: str, z: int) -> list[str]:
    """``<bos>`` + four sentences + ``<eos>``."""
    words = ["<bos>"]
    for _ in range(SENTENCES_PER_DOC):
        words += make_sentence(rng, topic, z)
    return [*words, "<eos>"]


def parse_sentences(words: list[str]) -> dict[str, Any]:
    """Exact grammar check of a word sequence made of whole sentences (an ``<eos>`` may end it).

    Returns ``{"grammatical": bool, "sentences": n, "marked": k, "modifiers": m, "topics": {topic: count}}``
    where topics count nouns and verbs by topic lexicon.
    """
    noun_topic = {n: t for t, lex in TOPICS.items() for n in lex["nouns"]}
    verb_topic = {v: t for t, lex in TOPICS.items() for v in lex["verbs"]}
    adj = set(ADJ["plain"] + ADJ["marked"])
    marked = set(ADJ["marked"] + ADV["marked"])
    adv = set(ADV["plain"] + ADV["marked"])
    stats: dict[str, Any] = {"grammatical": False, "sentences": 0, "marked": 0, "modifiers": 0, "topics": {}}
    if words and words[-1] == "<eos>":
        words = words[:-1]
    i = 0

    def take(ok: set[str] | dict[str, str], optional: bool = False) -> bool:
        nonlocal i
        if i < len(words) and words[i] in ok:
            w = words[i]
            if isinstance(ok, dict):
                stats["topics"][ok[w]] = stats["topics"].get(ok[w], 0) + 1
            elif ok is adj or ok is adv:
                stats["modifiers"] += 1
                stats["marked"] += w in marked
            i += 1
            return True
        return optional

    while i < len(words):
        ok = (take({"the"}) and take(adj, True) and take(noun_topic) and take(verb_topic) and take({"the"})
              and take(adj, True) and take(noun_topic) and take(adv, True) and take({"."}))
        if not ok:
            return stats
        stats["sentences"] += 1
    stats["grammatical"] = stats["sentences"] > 0
    return stats


def _posterior_logit(words: list[str]) -> float:
    """Bayes log-odds of z = 1 given the document's marked / plain modifier counts (prior 1/2)."""
    s = parse_sentences([w for w in words if w != "<bos>"])
    k, m = s["marked"], s["modifiers"]
    p0, p1 = P_MARKED
    return k * math.log(p1 / p0) + (m - k) * math.log((1 - p1) / (1 - p0))


def _prompt_sets(rng: random.Random, n: int) -> dict[str, Any]:
    """Attribute-revealing prefixes (two sentences, z known), neutral prefixes (one bare sentence) and labelled
    documents for concept detection (cut after the last ``the``, where the next slot may take a modifier)."""
    topics = list(TOPICS)
    out: dict[str, Any] = {"positive": [], "negative": [], "neutral": [], "documents": []}
    while len(out["positive"]) < n or len(out["negative"]) < n:
        topic, z = rng.choice(topics), rng.randrange(2)
        words = ["<bos>", *make_sentence(rng, topic, z), *make_sentence(rng, topic, z)]
        s = parse_sentences(words[1:])
        key = "positive" if z else "negative"
        clear = s["marked"] >= 2 if z else (s["modifiers"] >= 2 and s["marked"] == 0)
        if clear and len(out[key]) < n:
            out[key].append({"text": " ".join(words), "topic": topic})
    for _ in range(n):
        topic = rng.choice(topics)
        out["neutral"].append({"text": " ".join(["<bos>", *make_sentence(rng, topic, 0, modifiers=False)]),
                               "topic": topic})
    for _ in range(4 * n):
        topic, z = rng.choice(topics), rng.randrange(2)
        words = make_doc(rng, topic, z)
        words = words[: len(words) - words[::-1].index("the")]  # cut just after the last determiner
        out["documents"].append({"text": " ".join(words), "topic": topic, "attribute": z,
                                 "bayes_logit": round(_posterior_logit(words), 4)})
    return out


def train(out_dir: Path, seed: int = 0, *, steps: int = 2000) -> dict[str, Any]:
    """Train the organism into ``out_dir`` (HF model dir + ``ground_truth.json``); return training figures."""
    seed_everything(seed)
    tok = build_word_tokenizer(vocabulary())
    vocab = tok.get_vocab()
    model = new_model("llama", tok, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                      num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, max_position_embeddings=64,
                      tie_word_embeddings=False)
    rng = random.Random(seed)
    splits = {s: _prompt_sets(rng, 100) for s in ("dev", "test")}
    held_out = {d["text"] for s in splits.values() for d in s["documents"]}

    def batches(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        docs: list[list[int]] = []
        while len(docs) < 64:
            d = make_doc(rng, rng.choice(list(TOPICS)), rng.randrange(2))
            if not any(" ".join(d).startswith(h) for h in held_out):
                docs.append(encode(vocab, d))
        return pad_right(docs, tok.pad_token_id)

    figures = train_lm(model, batches, steps, 3e-3, warmup=100, weight_decay=0.01)
    ground_truth = {
        "organism": "binary_attribute",
        "truth_by": "data design + verification",
        "seed": seed,
        "grammar": "<bos> ( the [adj] NOUN VERB the [adj] NOUN [adv] . ){4} <eos>; nouns and verbs from one topic",
        "topics": TOPICS,
        "lexicon": {"adj": ADJ, "adv": ADV},
        "marked_words": ADJ["marked"] + ADV["marked"],
        "attribute": {"name": "marked", "p_marked": list(P_MARKED), "p_slot": P_SLOT,
                      "rate": "marked modifiers / all modifiers in the generated text"},
        "concept_detection": {
            "labels": "splits.<split>.documents[i].attribute (1 = marked); bayes_logit is the exact posterior log-odds",
            "position": "last token (the determiner before the last object noun, where a modifier may follow)",
            "prompts": "positive / negative: two-sentence prefixes that reveal z; neutral: one bare sentence",
        },
        "splits": splits,
        "training": {k: v for k, v in figures.items() if k != "loss_curve"},
    }
    save_organism(model, tok, ground_truth, out_dir)
    return {**figures, "seed": seed}


def _continuations(lm: LanguageModel, prompts: list[dict[str, Any]], seed: int) -> dict[str, float]:
    """Sample a continuation of every prompt; pooled attribute rate, grammaticality and topic fidelity."""
    tok = lm.tokenizer
    vocab = tok.get_vocab()
    outs = sample(lm.forward, [encode(vocab, p["text"].split()) for p in prompts], max_new=48,
                  stop_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=seed)
    marked = mods = on_topic = content = grammatical = 0
    for p, out in zip(prompts, outs, strict=True):
        words = tok.convert_ids_to_tokens(out)
        s = parse_sentences(words)
        ok = s["grammatical"] and words[-1] == "<eos>"
        grammatical += ok
        marked, mods = marked + s["marked"], mods + s["modifiers"]
        if ok:
            on_topic += s["topics"].get(p["topic"], 0)
            content += sum(s["topics"].values())
    return {"rate": marked / max(mods, 1), "grammatical": grammatical / len(prompts),
            "topic_fidelity": on_topic / max(content, 1)}


def _last_states(lm: LanguageModel, texts: list[str]) -> dict[str, Any]:
    """``blocks.{l}.resid_post`` at the last token of each text, per layer: {site: [n, d]}."""
    import torch

    vocab = lm.tokenizer.get_vocab()
    sites = [f"blocks.{layer}.resid_post" for layer in range(lm.dims.n_layers)]
    seqs = [encode(vocab, t.split()) for t in texts]
    rows: dict[str, list[Any]] = {s: [None] * len(seqs) for s in sites}
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        by_len.setdefault(len(s), []).append(i)
    for idx in by_len.values():
        ids = torch.tensor([seqs[i] for i in idx])
        cache = lm.run_with_cache(ids, sites=sites, positions="last")
        for site in sites:
            for j, i in enumerate(idx):
                rows[site][i] = cache[site][j, -1].float()
    return {site: torch.stack(v) for site, v in rows.items()}


def verify(lm: LanguageModel, ground_truth: dict[str, Any]) -> VerifyReport:
    """Exact attribute rates / grammar / topic of sampled continuations, and linear separability of z.

    Separability: a difference-in-means direction and a shrinkage-LDA direction (Σ⁻¹Δμ, the closed-form optimal
    linear readout for Gaussian classes), both fit on the dev documents, scored by AUROC on the test documents
    against the Bayes-optimal AUROC of the exact posterior.
    """
    import torch

    dev, test = ground_truth["splits"]["dev"], ground_truth["splits"]["test"]
    gen = {key: _continuations(lm, test[key], seed=i) for i, key in enumerate(("positive", "negative", "neutral"))}
    p0, p1 = ground_truth["attribute"]["p_marked"]
    checks = [
        Check("rate_after_positive_prefix", gen["positive"]["rate"], p1 - 0.15),
        Check("rate_after_negative_prefix", gen["negative"]["rate"], p0 + 0.07, higher_is_better=False),
        Check("grammatical", min(g["grammatical"] for g in gen.values()), 0.95),
        Check("topic_fidelity", min(g["topic_fidelity"] for g in gen.values()), 0.95),
    ]
    # Diff-in-means direction per layer, fit on dev documents; layer chosen on dev, AUROC reported on test.
    states = {name: _last_states(lm, [d["text"] for d in split["documents"]]) for name, split in
              (("dev", dev), ("test", test))}
    labels = {name: [d["attribute"] for d in split["documents"]] for name, split in (("dev", dev), ("test", test))}

    def score(split: str, site: str, direction: Any) -> float:
        pairs = list(zip((states[split][site] @ direction).tolist(), labels[split], strict=True))
        return auroc([x for x, z in pairs if z], [x for x, z in pairs if not z])

    per_layer = {}
    for site, x in states["dev"].items():
        z = x.new_tensor(labels["dev"]).bool()
        diff = x[z].mean(0) - x[~z].mean(0)
        centered = torch.cat([x[z] - x[z].mean(0), x[~z] - x[~z].mean(0)])
        cov = centered.T @ centered / len(centered)
        cov = 0.9 * cov + 0.1 * cov.trace() / len(cov) * torch.eye(len(cov))  # shrinkage
        lda = torch.linalg.solve(cov, diff)
        per_layer[site] = {"diff_in_means_dev": score("dev", site, diff),
                           "diff_in_means_test": score("test", site, diff), "lda_test": score("test", site, lda)}
    best = max(per_layer, key=lambda s: per_layer[s]["diff_in_means_dev"])
    docs = test["documents"]
    bayes = auroc([d["bayes_logit"] for d in docs if d["attribute"]],
                  [d["bayes_logit"] for d in docs if not d["attribute"]])
    best_lda = max(v["lda_test"] for v in per_layer.values())
    checks.append(Check("diff_in_means_auroc_test", per_layer[best]["diff_in_means_test"], 0.9))
    checks.append(Check("linear_auroc_vs_bayes_optimal", best_lda / bayes, 0.97))
    details = {"generation": gen, "auroc": per_layer, "best_site": best, "bayes_auroc_test": bayes}
    return VerifyReport("binary_attribute", tuple(checks), details)


# -- steer task: graded by lsi.bench, measured with this module's exact checks -------------------------------------
def _sampled(lm: LanguageModel, prompts: list[dict[str, Any]], seed: int) -> list[list[str]]:
    """Seeded sampled continuations (up to 40 tokens, ``<eos>`` included) through ``lm.generate``, so an applied
    steering acts on them."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return generated_words(lm, [p["text"].split() for p in prompts], 40, do_sample=True)


def _attribute_scores(lm: LanguageModel, split: dict[str, Any], seed: int) -> SteerScores:
    """Marked rate after neutral prompts (success) and after prefixes that reveal z = 0 (generalization); topic
    fidelity of the grammatical continuations (specificity) and the grammatical fraction (fluency), both sets.
    One seeded generation over both sets."""
    from lsi.evaluation.steer import SteerScores

    prompts = split["neutral"] + split["negative"]
    stats = [(p, words, parse_sentences(words)) for p, words in zip(prompts, _sampled(lm, prompts, seed), strict=True)]

    def rate(part: list[Any]) -> float:
        return sum(s["marked"] for _, _, s in part) / max(sum(s["modifiers"] for _, _, s in part), 1)

    fluent = [(p, s) for p, words, s in stats if s["grammatical"] and words[-1] == "<eos>"]
    on_topic = sum(s["topics"].get(p["topic"], 0) for p, s in fluent)
    content = sum(sum(s["topics"].values()) for _, s in fluent)
    n = len(split["neutral"])
    return SteerScores(rate(stats[:n]), rate(stats[n:]), on_topic / max(content, 1), len(fluent) / len(stats))


def steer_tasks(lm: LanguageModel, ground_truth: dict[str, Any]) -> list[SteerTask]:
    """Switch the hidden attribute on: contrast = prefixes that reveal z = 1 vs z = 0; KL and Δloss on the held-out
    labelled documents (both values of z)."""
    from lsi.evaluation.steer import SteerScores, SteerSplit, SteerTask

    vocab = lm.tokenizer.get_vocab()

    def ids(items: list[dict[str, Any]]) -> list[list[int]]:
        return [encode(vocab, d["text"].split()) for d in items]

    def split(name: str, seed: int, measured: int) -> SteerSplit:
        """Contrast from every prefix of the split; measures on the first ``measured`` prompts of each kind and
        the corpus on twice as many documents (dev: half of test's, enough to choose by, at half the cost)."""
        raw = ground_truth["splits"][name]
        subset = {key: raw[key][:measured] for key in ("neutral", "negative")}
        return SteerSplit(positive=ids(raw["positive"]), negative=ids(raw["negative"]),
                          measure=lambda model: _attribute_scores(model, subset, seed),
                          corpus=ids(raw["documents"][: 2 * measured]))

    p1 = ground_truth["attribute"]["p_marked"][1]
    n = len(ground_truth["splits"]["test"]["neutral"])
    metrics = {"success": "marked-modifier rate of continuations of neutral one-sentence prompts",
               "generalization": "the same after two-sentence prefixes that reveal z = 0 (the context says otherwise)",
               "specificity": "topic fidelity: content words of the prompt's topic (grammatical continuations)",
               "fluency": "grammatical continuations ending in <eos>",
               "corpus": "held-out documents of both attribute values"}
    return [SteerTask("binary_attribute", "marked attribute", "induce", split("dev", 0, n // 2), split("test", 1, n),
                      positions=("all", "last"), metrics=metrics, oracle=SteerScores(p1, p1, 1.0, 1.0),
                      oracle_note=f"the data generator with z = 1: marked rate {p1:g}, grammar and topic exact by "
                                  "construction (no KL: not a model intervention)",
                      description="raise the marked-word rate as documents with z = 1 show it")]


ORGANISM = Organism(
    name="binary_attribute",
    summary="2-layer Llama; a hidden document attribute (never a token) raises the rate of a marked lexicon",
    family="llama",
    truth_by="data design + verification",
    train=train,
    verify=verify,
    seed=0,
    steer_tasks=steer_tasks,
)
