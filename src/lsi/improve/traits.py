"""Built-in persona traits and the persona-vector study: steer, monitor and screen data for one trait.

A :class:`Trait` is data plus an exact measure: contrastive ``(prompt, response)`` exchanges that express the trait
or not (dev and test), prompts whose sampled continuations are measured (the same prompts with the trait asked
for in context: the prompting baseline), unrelated text for KL, monitoring prompts, and candidate fine-tuning
sets that mix expressing and neutral responses at several ratios. Two are built in:

* :func:`binary_attribute_trait`: the ``binary_attribute`` organism's hidden attribute; the measure is the
  marked-modifier rate of sampled continuations (exact parse), fluency the grammatical fraction;
* :func:`cheerful_trait`: a cheerful (vs sad) storyteller on stories260k; the measure is happy minus sad words
  per 100 generated words (fixed word lists), no fluency check (KL on unrelated story text instead).

:func:`persona_study` runs the whole study for a trait and returns plain JSON values.

Example:
    >>> trait = cheerful_trait(lm)  # doctest: +SKIP
    >>> results = persona_study(lm, trait, tau=0.1)  # doctest: +SKIP
    >>> results["test"]["persona"]["rate"], results["test"]["prompting"]["rate"]  # doctest: +SKIP
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from lsi.core.interventions import Add
from lsi.errors import InputError
from lsi.evaluation.ranking import auroc
from lsi.evaluation.steer import measured, reference
from lsi.improve.measure import random_like
from lsi.locate.result import jsonable
from lsi.organisms.binary_attribute import ADJ, ADV, TOPICS, _sampled, make_sentence, parse_sentences
from lsi.steer.persona import monitor_trait, persona_vectors, response_projections, screen_datasets
from lsi.steer.selection import ADDITION_ALPHAS, grid, select

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.steer.persona import Exchange

Ids = tuple[int, ...]
Progress = Callable[[str, int, int], None]


class Reading(NamedTuple):
    """A trait measured on sampled continuations: per continuation the ``(numerator, denominator)`` of its trait
    rate (e.g. marked and all modifiers), the fluent fraction (``None``: no fluency check) and other rates behind
    the trait rate."""

    counts: tuple[tuple[float, float], ...]
    fluency: float | None
    details: dict[str, float]

    @property
    def rate(self) -> float:
        """The trait rate over every continuation: Σ numerators / Σ denominators (0 without any denominator)."""
        num, den = (sum(c) for c in zip(*self.counts, strict=True)) if self.counts else (0.0, 0.0)
        return num / den if den else 0.0

    @property
    def per_prompt(self) -> tuple[float, ...]:
        """Each continuation's own trait rate (0 where its denominator is 0)."""
        return tuple(n / d if d else 0.0 for n, d in self.counts)

    def interval(self, *, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
        """95 % bootstrap interval of :attr:`rate`, resampling continuations (seeded)."""
        counts = np.asarray(self.counts, dtype=float).reshape(-1, 2)
        picks = np.random.default_rng(seed).integers(0, len(counts), size=(resamples, len(counts)))
        num, den = counts[picks, 0].sum(1), counts[picks, 1].sum(1)
        rates = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        low, high = np.percentile(rates, [2.5, 97.5])
        return float(low), float(high)


Reader = Callable[["LanguageModel", Sequence[Ids], int], Reading]  # (model, prompts, seed) -> reading


@dataclass(frozen=True)
class TraitSplit:
    """Contrastive exchanges, the measured prompts (``prompted``: the same with the trait asked for in context),
    the sampling seed, and unrelated text for KL."""

    expressing: tuple[Exchange, ...]
    neutral: tuple[Exchange, ...]
    prompts: tuple[Ids, ...]
    prompted: tuple[Ids, ...]
    seed: int
    corpus: tuple[Ids, ...]


@dataclass(frozen=True)
class MonitorPrompts:
    """Prompts whose last token's projection should predict the trait in the model's responses. ``context[i]``:
    whether prompt ``i`` invites the trait (1), its opposite (0) or neither (``None``). Each prompt is sampled
    ``samples`` times; its responses express the trait when their pooled rate exceeds ``expressed_above``."""

    prompts: tuple[Ids, ...]
    context: tuple[int | None, ...]
    samples: int
    expressed_above: float


@dataclass(frozen=True, eq=False)
class Trait:
    """A persona trait on one model: data (dev / test splits, monitoring prompts, candidate fine-tuning sets) and
    its exact measure ``read``; ``finetune``: the screening's fine-tuning settings."""

    name: str
    description: str
    rate_meaning: str  # what Reading.rate is
    sites: str
    dev: TraitSplit
    test: TraitSplit
    monitor: MonitorPrompts
    candidates: Mapping[str, tuple[Exchange, ...]]
    read: Reader
    finetune: Mapping[str, float]

    def split(self, name: str) -> TraitSplit:
        if name not in ("dev", "test"):
            raise InputError("split 'dev' or 'test'", repr(name), "use 'dev' to choose, 'test' to report")
        return self.dev if name == "dev" else self.test

    def measure(self, lm: LanguageModel, split: str = "test", *, prompted: bool = False) -> Reading:
        """The trait on the split's prompts (with the trait asked for in context when ``prompted``), under
        whatever steering is applied to ``lm``; seeded, so the same model gives the same reading."""
        s = self.split(split)
        return self.read(lm, s.prompted if prompted else s.prompts, s.seed)


# -- binary_attribute: the hidden attribute as the trait ------------------------------------------------------------
def _words_ids(lm: LanguageModel, words: Sequence[str]) -> Ids:
    vocab = lm.tokenizer.get_vocab()
    return tuple(vocab[w] for w in words)


def _attribute_reading(lm: LanguageModel, prompts: Sequence[Ids], seed: int) -> Reading:
    """Marked modifiers / all modifiers of seeded sampled continuations (pooled), per continuation, and the fraction
    that parses as whole sentences ending in ``<eos>``. A prompt that stops inside a sentence (after ``the``) has
    that unfinished sentence parsed with its continuation."""
    tok = lm.tokenizer
    words = [tok.convert_ids_to_tokens(list(p)) for p in prompts]
    tails = [w[len(w) - w[::-1].index("."):] if "." in w else w[1:] for w in words]  # after the last full stop
    sampled = _sampled(lm, [{"text": " ".join(w)} for w in words], seed)
    parsed = [(out, parse_sentences(tail + out)) for tail, out in zip(tails, sampled, strict=True)]
    fluent = sum(s["grammatical"] and out[-1] == "<eos>" for out, s in parsed)
    return Reading(tuple((float(s["marked"]), float(s["modifiers"])) for _, s in parsed), fluent / len(parsed),
                   {"modifiers": float(sum(s["modifiers"] for _, s in parsed))})


def binary_attribute_trait(lm: LanguageModel, ground_truth: Mapping[str, Any], *, seed: int = 0) -> Trait:
    """The ``binary_attribute`` organism's hidden attribute as a trait. Exchanges: a neutral one-sentence prompt
    and three sentences of its topic drawn with z = 1 (expressing) or z = 0 (neutral). Measured prompts: the
    split's neutral prompts; prompting baseline: one sentence with two marked modifiers before each. Monitoring
    prompts: the test split's prefixes that reveal z = 1, z = 0, and neutral ones, each followed by the ``the``
    that starts the next sentence (the response begins at a modifier slot). Candidate sets: 32 exchanges
    with 0, 25, 50, 75 or 100 % expressing responses."""
    rng = random.Random(seed)
    splits = ground_truth["splits"]

    def ids(text: str) -> Ids:
        return _words_ids(lm, text.split())

    def response(topic: str, z: int) -> Ids:
        return _words_ids(lm, [w for _ in range(3) for w in make_sentence(rng, topic, z)] + ["<eos>"])

    def revealing(topic: str) -> list[str]:
        lex = TOPICS[topic]
        return ["the", rng.choice(ADJ["marked"]), rng.choice(lex["nouns"]), rng.choice(lex["verbs"]), "the",
                rng.choice(lex["nouns"]), rng.choice(ADV["marked"]), "."]

    def split(name: str, split_seed: int) -> TraitSplit:
        neutral_prompts = splits[name]["neutral"]
        exchanges = [(ids(p["text"]), p["topic"]) for p in neutral_prompts]
        prompts = tuple(ids(p["text"]) for p in neutral_prompts[:50])
        prompted = tuple(_words_ids(lm, ["<bos>", *revealing(p["topic"]), *p["text"].split()[1:]])
                         for p in neutral_prompts[:50])
        return TraitSplit(tuple((p, response(t, 1)) for p, t in exchanges),
                          tuple((p, response(t, 0)) for p, t in exchanges), prompts, prompted, split_seed,
                          tuple(ids(d["text"]) for d in splits[name]["documents"][:100]))

    dev, test = split("dev", 0), split("test", 1)
    test_raw = splits["test"]
    kinds = (("positive", 1), ("negative", 0), ("neutral", None))
    monitor = MonitorPrompts(tuple(ids(p["text"] + " the") for key, _ in kinds for p in test_raw[key][:60]),
                             tuple(c for key, c in kinds for _ in test_raw[key][:60]), 4, 0.5)
    pool = [(ids(p["text"]), p["topic"]) for p in splits["dev"]["neutral"]]
    candidates = {f"{round(100 * share)}% expressing": tuple(
        (p, response(t, int(i < share * 32))) for i, (p, t) in enumerate(rng.sample(pool, 32)))
        for share in (0.0, 0.25, 0.5, 0.75, 1.0)}
    return Trait("binary_attribute: marked attribute", "the hidden attribute z = 1: a high rate of marked modifiers",
                 "marked modifiers / all modifiers in sampled continuations of neutral prompts",
                 "blocks.*.resid_post", dev, test, monitor, candidates, _attribute_reading,
                 {"steps": 20, "lr": 3e-3})


# -- stories260k: a cheerful storyteller ---------------------------------------------------------------------------
HAPPY = frozenset({"happy", "smiled", "smile", "smiles", "laughed", "laugh", "fun", "glad", "love", "loved", "joy",
                   "excited", "hug", "hugged", "yay", "nice"})
SAD = frozenset({"sad", "cried", "cry", "crying", "angry", "scared", "hurt", "upset", "mad", "sorry", "afraid",
                 "lonely", "tears"})
_PEOPLE = (("girl", "Lily", "She"), ("boy", "Tom", "He"), ("girl", "Sue", "She"), ("boy", "Ben", "He"),
           ("girl", "Mia", "She"), ("boy", "Tim", "He"), ("girl", "Anna", "She"), ("boy", "Max", "He"))
_OPENINGS = ("Once upon a time, there was a little {kind} named {name}.", "One day, {name} went to the park.",
             "{name} had a big red ball.", "{name} lived in a small house.")
_HAPPY_REPLIES = ("{p} was very happy. {p} smiled and laughed all day.",
                  "{p} felt so glad. {p} had a lot of fun and loved to play.",
                  "{p} was excited and happy. {p} hugged mom with a big smile.")
_SAD_REPLIES = ("{p} was very sad. {p} cried and cried all day.",
                "{p} felt so upset. {p} was lonely and did not want to play.",
                "{p} was scared and sad. {p} cried to mom with big tears.")
_STORY_PROMPTS = {"dev": ("Once upon a time", "One day,", "Once upon a time, there was a", "The sun was shining.",
                          "Mom said,", "It was a sunny day.", "There was a little",
                          "Once upon a time, in a small house,"),
                  "test": ("Once upon a time, in a big forest,", "One morning,", "Once upon a time there lived a",
                           "The sky was blue.", "At the beach,", "Long ago,", "It was a rainy day.",
                           "In a little town,")}
_ASK = "This is a happy story. Everyone smiled and laughed and had fun."  # the prompting baseline's context
_UNRELATED = {"dev": ("The sun was shining and the birds were singing in the tall green trees.",
                      "The big red ball rolled down the hill and stopped next to the pond.",
                      "It was a cold day. Snow fell on the roofs and the streets were white.",
                      "The little boat sailed on the blue sea. The waves were small and soft."),
              "test": ("The flowers in the garden were red, yellow and pink. A bee flew from one flower to the next.",
                       "The rain stopped and a rainbow came out over the big hill.",
                       "There was a tall tree in the park. Its leaves were green and the birds had a nest in it.",
                       "The cake was on the table. It was big and sweet, with a cherry on top.")}
SAMPLES_PER_PROMPT, STORY_TOKENS = {"dev": 8, "test": 16}, 48


def word_counts(text: str, words: frozenset[str] = HAPPY, opposite: frozenset[str] = SAD) -> tuple[int, int, int]:
    """Trait words (default: happy), opposite words (default: sad) and all words of ``text`` (whole words,
    case-insensitive).

    >>> word_counts("She smiled, then she cried.")
    (1, 1, 5)
    """
    found = [w.lower() for w in re.findall(r"[A-Za-z']+", text)]
    return sum(w in words for w in found), sum(w in opposite for w in found), len(found)


def word_reader(words: frozenset[str], opposite: frozenset[str], *, tokens: int, names: tuple[str, str]) -> Reader:
    """A reader counting trait minus opposite words per 100 words of seeded sampled continuations (``tokens``
    each); ``names``: the detail keys of the two per-100-word rates."""
    def read(lm: LanguageModel, prompts: Sequence[Ids], seed: int) -> Reading:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ids = lm.generate([list(p) for p in prompts], max_new_tokens=tokens, do_sample=True)
        texts = lm.tokenizer.batch_decode(ids[:, -tokens:], skip_special_tokens=True)
        counts = [word_counts(t, words, opposite) for t in texts]
        total = max(sum(n for _, _, n in counts), 1)
        return Reading(tuple((100.0 * (h - s), float(n)) for h, s, n in counts), None,
                       {names[0]: 100 * sum(h for h, _, _ in counts) / total,
                        names[1]: 100 * sum(s for _, s, _ in counts) / total})

    return read


def cheerful_trait(lm: LanguageModel) -> Trait:
    """A cheerful storyteller on stories260k. Exchanges: story openings about eight children answered by happy
    (expressing) or sad (neutral) sentences, dev on the first four children, test on the others. Measured prompts:
    eight story openings per split, ``SAMPLES_PER_PROMPT`` samples each (dev 8, test 16); prompting baseline: a
    sentence saying the story is happy before each. Monitoring prompts: openings followed by a happy, a sad or a
    plain sentence. Candidate sets: 32 exchanges with 0, 25, 50, 75 or 100 % happy replies (the rest sad)."""

    def text(t: str) -> Ids:
        return tuple(lm.encode(t, add_special_tokens=True))

    def reply(t: str) -> Ids:
        return tuple(lm.encode(t))

    def exchanges(people: Sequence[tuple[str, str, str]], replies: Sequence[str]) -> tuple[Exchange, ...]:
        return tuple((text(o.format(kind=k, name=n)), reply(r.format(p=p)))
                     for k, n, p in people for o in _OPENINGS for r in replies)

    def split(name: str, people: Sequence[tuple[str, str, str]], seed: int) -> TraitSplit:
        prompts = [p for p in _STORY_PROMPTS[name] for _ in range(SAMPLES_PER_PROMPT[name])]
        return TraitSplit(exchanges(people, _HAPPY_REPLIES), exchanges(people, _SAD_REPLIES),
                          tuple(text(p) for p in prompts), tuple(text(f"{_ASK} {p}") for p in prompts), seed,
                          tuple(text(t) for t in _UNRELATED[name]))

    moods = ("{name} was very happy and smiled.", "{name} was very sad and cried.", "{name} went outside.")
    monitor = MonitorPrompts(tuple(text(f"{o.format(kind=k, name=n)} {m.format(name=n)}")
                                   for k, n, _ in _PEOPLE for o in _OPENINGS for m in moods),
                             tuple(c for _ in _PEOPLE for _ in _OPENINGS for c in (1, 0, None)), 4, 0.0)
    happy, sad = exchanges(_PEOPLE, _HAPPY_REPLIES[:2]), exchanges(_PEOPLE, _SAD_REPLIES[:2])
    rng = random.Random(0)
    order = rng.sample(range(len(happy)), 32)
    candidates = {f"{round(100 * share)}% happy": tuple(happy[j] if i < share * 32 else sad[j]
                                                        for i, j in enumerate(order))
                  for share in (0.0, 0.25, 0.5, 0.75, 1.0)}
    return Trait("stories260k: cheerful", "a cheerful storyteller (happy rather than sad words)",
                 "happy minus sad words per 100 words of sampled story continuations",
                 "blocks.*.resid_post", split("dev", _PEOPLE[:4], 0), split("test", _PEOPLE[4:], 1), monitor,
                 candidates, word_reader(HAPPY, SAD, tokens=STORY_TOKENS,
                                         names=("happy_per_100_words", "sad_per_100_words")),
                 {"steps": 20, "lr": 3e-3})


# -- a trait from the user's JSON Lines -----------------------------------------------------------------------------
JSONL_FIELDS = {"split": (str, True), "prompt": (str, False), "response": (str, False), "expressing": (bool, False),
                "invites": (bool, False), "set": (str, False), "text": (str, False)}
JSONL_SCHEMA = ('lines {"split", "prompt", "response", "expressing": bool} (contrast), {"split", "prompt"} (measured), '
                '{"split": "test", "prompt", "invites": bool} (monitoring), {"split": "dev", "prompt", "response", '
                '"set"} (screening sets), {"split", "text"} (unrelated text for KL)')


def jsonl_trait(lm: LanguageModel, path: Path, *, words: Sequence[str], opposite: Sequence[str],
                prompt_prefix: str | None, samples: int = 8, tokens: int = 48, sites: str = "blocks.*.resid_post",
                finetune: Mapping[str, float] | None = None) -> Trait:
    """A word-rate trait from a JSONL file (:data:`JSONL_SCHEMA`): the trait rate is ``words`` minus ``opposite``
    per 100 words of sampled continuations (``samples`` per measured prompt, ``tokens`` each); the prompting
    baseline puts ``prompt_prefix`` before each measured prompt (``None``: the prompts as they are)."""
    from lsi.improve.data import read_jsonl

    rows = read_jsonl(path, JSONL_FIELDS, schema_hint=JSONL_SCHEMA)
    if not words:
        raise InputError("trait_words in the config (the words that express the trait)", "none",
                         "set trait_words (and opposite_words) in --config")

    def text(t: str) -> Ids:
        return tuple(lm.encode(t, add_special_tokens=True))

    def kind(row: Mapping[str, Any]) -> str:
        keys = set(row) - {"split"}
        kinds = {"contrast": {"prompt", "response", "expressing"}, "measured": {"prompt"},
                 "monitor": {"prompt", "invites"}, "set": {"prompt", "response", "set"}, "text": {"text"}}
        for name, wanted in kinds.items():
            if keys == wanted:
                return name
        raise InputError(JSONL_SCHEMA, f"a line with keys {sorted(row)} in {path}", "give one kind per line")

    grouped: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        grouped.setdefault((kind(row), row["split"]), []).append(row)

    def need(key: tuple[str, str]) -> list[Mapping[str, Any]]:
        if not grouped.get(key):
            raise InputError(f"{key[0]} lines in the {key[1]} split ({JSONL_SCHEMA})", "none", f"add some to {path}")
        return grouped[key]

    def split(name: str, seed: int) -> TraitSplit:
        contrast = need(("contrast", name))
        pairs = [(r["expressing"], (text(r["prompt"]), tuple(lm.encode(r["response"])))) for r in contrast]
        measured = [r["prompt"] for r in need(("measured", name)) for _ in range(samples)]
        prefix = f"{prompt_prefix} " if prompt_prefix else ""
        return TraitSplit(tuple(p for e, p in pairs if e), tuple(p for e, p in pairs if not e),
                          tuple(text(p) for p in measured), tuple(text(prefix + p) for p in measured), seed,
                          tuple(text(r["text"]) for r in need(("text", name))))

    sets: dict[str, list[Exchange]] = {}
    for r in need(("set", "dev")):
        sets.setdefault(r["set"], []).append((text(r["prompt"]), tuple(lm.encode(r["response"]))))
    if len(sets) < 3:
        raise InputError("at least 3 candidate fine-tuning sets (lines with \"set\")", f"{len(sets)}",
                         "add sets that mix expressing and neutral responses at different ratios")
    watch = need(("monitor", "test"))
    monitor = MonitorPrompts(tuple(text(r["prompt"]) for r in watch), tuple(int(r["invites"]) for r in watch),
                             max(1, samples // 2), 0.0)
    name = Path(path).stem
    return Trait(name, f"the trait of {Path(path).name} ({', '.join(list(words)[:3])}, ...)",
                 "trait minus opposite words per 100 words of sampled continuations", sites, split("dev", 0),
                 split("test", 1), monitor, {k: tuple(v) for k, v in sets.items()},
                 word_reader(frozenset(w.lower() for w in words), frozenset(w.lower() for w in opposite),
                             tokens=tokens, names=("trait_words_per_100_words", "opposite_words_per_100_words")),
                 dict(finetune or {"steps": 20, "lr": 3e-3}))


# -- the study ------------------------------------------------------------------------------------------------------
def _reading_json(reading: Reading, kl: float | None, dloss: float | None, seed: int) -> dict[str, Any]:
    return {"rate": reading.rate, "interval": list(reading.interval(seed=seed)), "fluency": reading.fluency,
            **reading.details, "kl": kl, "dloss": dloss}


def _pooled_rates(reading: Reading, samples: int) -> list[float]:
    """The rate of each prompt's ``samples`` consecutive continuations, pooled."""
    groups = [reading.counts[i:i + samples] for i in range(0, len(reading.counts), samples)]
    return [Reading(tuple(g), None, {}).rate for g in groups]


def _counted(items: Sequence[Any], progress: Progress | None, step: str) -> Iterator[Any]:
    for i, item in enumerate(items):
        if progress is not None:
            progress(step, i, len(items))
        yield item
    if progress is not None:
        progress(step, len(items), len(items))


def persona_study(lm: LanguageModel, trait: Trait, *, tau: float = 0.1, seed: int = 0,
                  progress: Progress | None = None) -> dict[str, Any]:
    """The whole persona-vector study of ``trait``, as plain JSON values:

    * ``vectors``: per site, the norm of the dev persona vector and ``test_auroc``: how well its projection (mean
      over response tokens) separates the test split's expressing exchanges from its neutral ones;
    * ``selection``: steering by addition at every site × strength (:data:`ADDITION_ALPHAS` multiples of the
      vector), chosen on dev as the highest trait rate with ``KL <= tau``; ``curve``: every measured point;
    * ``test``: the chosen steering against the unsteered model, a random direction of equal norm at the same site
      and strength, and the prompting baseline (whose KL is not measured: it changes the context, not the model),
      only the last two without a steering within the budget; each with a 95 % bootstrap interval of its rate, and
      ``verdict`` saying which wins (and whether the persona vector's interval lies wholly above each other's);
    * ``monitor``: per site, the last-prompt-token projection against whether the unsteered model's sampled
      responses expressed the trait (AUROC, Pearson) and against their pooled rate (Pearson, Spearman); and
      ``context_auroc``: the projection separating prompts that invite the trait from those inviting its opposite;
    * ``screening``: projection shift vs trait shift over the candidate fine-tuning sets (at the chosen site, or
      the best monitoring site when no steering fits the budget);
    * ``seconds``: time per step.

    ``progress(step, done, total)`` is called as each step advances.
    """
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = round(now - clock, 2)
        clock = now

    vectors = persona_vectors(lm, trait.dev.expressing, trait.dev.neutral, trait.sites)
    sites = list(vectors)
    held_out = {site: auroc(response_projections(lm, trait.test.expressing, site, v).tolist(),
                            response_projections(lm, trait.test.neutral, site, v).tolist())
                for site, v in vectors.items()}
    lap("vectors")

    dev_ref, test_ref = reference(lm, list(trait.dev.corpus)), reference(lm, list(trait.test.corpus))
    candidates = list(grid(lambda site, alpha: Add(site, vectors[site], alpha, model=lm), site=sites,
                           alpha=ADDITION_ALPHAS))
    sel = select(lm, _counted(candidates, progress, "select"), success=lambda m: trait.measure(m, "dev").rate,
                 corpus=dev_ref, tau=tau, stop_along="alpha")
    unsteered_dev = trait.measure(lm, "dev").rate
    lap("select")

    base, kl0, dloss0 = measured(lm, None, lambda m: trait.measure(m, "test"), test_ref)
    test: dict[str, Any] = {"unsteered": _reading_json(base, kl0, dloss0, seed),
                            "prompting": _reading_json(trait.measure(lm, "test", prompted=True), None, None, seed)}
    best, steering = sel.best, sel.steering
    chosen_site: str | None = None
    if best is not None and steering is not None:
        chosen_site = str(best.settings["site"])
        random_add = Add(chosen_site, random_like(vectors[chosen_site], seed=seed), best.settings["alpha"], model=lm)
        for name, s in (("persona", steering), ("random", random_add)):
            reading, kl, dloss = measured(lm, s, lambda m: trait.measure(m, "test"), test_ref)
            test[name] = _reading_json(reading, kl, dloss, seed)
    rates = {k: v["rate"] for k, v in test.items()}
    verdict: dict[str, Any] = {"best": max(rates, key=lambda k: rates[k])}
    if "persona" in rates:
        for k in ("unsteered", "random", "prompting"):
            verdict[f"persona_beats_{k}"] = rates["persona"] > rates[k]
            verdict[f"persona_interval_above_{k}"] = test["persona"]["interval"][0] > test[k]["interval"][1]
    else:
        verdict["persona"] = f"no steering within KL <= {tau:g} (lowest KL {sel.lowest_kl.kl:.3g})"
    test["verdict"] = verdict
    lap("test")

    watch = trait.monitor
    prompts = list(watch.prompts)
    scores = _pooled_rates(trait.read(lm, [p for p in prompts for _ in range(watch.samples)], seed), watch.samples)
    labels = [float(x > watch.expressed_above) for x in scores]
    invited = [i for i, c in enumerate(watch.context) if c is not None]
    monitors: dict[str, Any] = {}
    for site in _counted(sites, progress, "monitor"):
        binary = monitor_trait(lm, prompts, labels, site, vectors[site])
        continuous = monitor_trait(lm, prompts, scores, site, vectors[site])
        x = binary.projections
        context = auroc([x[i] for i in invited if watch.context[i]], [x[i] for i in invited if not watch.context[i]])
        monitors[site] = {"auroc": binary.auroc, "pearson_label": binary.to_json()["pearson"],
                          "pearson_score": continuous.to_json()["pearson"],
                          "spearman_score": continuous.to_json()["spearman"], "context_auroc": context}
    lap("monitor")

    screen_site = chosen_site or max(sites, key=lambda s: monitors[s]["auroc"] or 0.0)
    if progress is not None:
        progress("screen", 0, len(trait.candidates))
    screening = screen_datasets(lm, trait.candidates, screen_site, vectors[screen_site],
                                measure=lambda m: trait.measure(m, "dev").rate, steps=int(trait.finetune["steps"]),
                                lr=float(trait.finetune["lr"]), seed=seed)
    if progress is not None:
        progress("screen", len(trait.candidates), len(trait.candidates))
    lap("screen")

    curve = [p.to_json() for p in sel.curve]
    return jsonable({
        "trait": trait.name, "description": trait.description, "rate_meaning": trait.rate_meaning, "tau": tau,
        "seed": seed,
        "vectors": {s: {"norm": float(v.norm()), "test_auroc": held_out[s]} for s, v in vectors.items()},
        "selection": {"chosen": None if best is None else best.to_json(), "unsteered_dev_rate": unsteered_dev,
                      "curve": curve, "skipped": list(sel.skipped),
                      "per_site": {s: [p for p in curve if p["settings"]["site"] == s] for s in sites}},
        "test": test,
        "monitor": {"labels": {"expressed": int(sum(labels)), "of": len(labels), "samples": watch.samples,
                               "expressed_above": watch.expressed_above},
                    "per_site": monitors},
        "screening": screening.to_json(),
        "seconds": {**seconds, "total": round(sum(seconds.values()), 2)},
    })
