"""Scenario ``persona``: persona vectors (Chen et al. 2025) to steer a trait, monitor it and screen training data.

Recipe (:func:`lsi.improve.traits.persona_study`): per layer, the mean activation over trait-expressing responses
minus over neutral ones; addition at every layer × strength, chosen on dev as the highest trait rate with KL ≤
``tau``; on test against the unsteered model, a random direction of the same norm and strength, and prompting
(the trait asked for in the context). Monitoring: does the projection at the last prompt token predict whether the
model's sampled response expresses the trait (AUROC per layer)? Screening: does the projection shift of a
fine-tuning set predict how far fine-tuning on it moves the trait (correlation over candidate sets)? The chosen
steering is folded into the weights and exported.

Data: built in for the ``binary_attribute`` organism (the hidden attribute as the trait) and for stories260k (a
directory named ``stories260k``: a cheerful storyteller, happy minus sad words); otherwise a JSONL file
(:data:`lsi.improve.traits.JSONL_SCHEMA`) with the trait's words in the config.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lsi.errors import InputError
from lsi.improve.config import RecipeConfig
from lsi.improve.measure import export_checkpoint
from lsi.improve.recipe import Recipe, RunContext, register_recipe
from lsi.improve.record import Curve, Export, Generation, Heatmap, Metric, Point, Result, Row, Series
from lsi.improve.rundir import Checkpoint, sha256_file, sha256_json
from lsi.improve.stats import Estimate
from lsi.improve.traits import JSONL_SCHEMA

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.improve.traits import Trait

BUILTIN = ("binary_attribute", "stories260k")
DETAILS = {  # word rates some traits report next to their rate: (label, higher is better)
    "happy_per_100_words": ("happy words / 100", True), "sad_per_100_words": ("sad words / 100", False),
    "trait_words_per_100_words": ("trait words / 100", True),
    "opposite_words_per_100_words": ("opposite words / 100", False)}


@dataclass(frozen=True)
class PersonaConfig(RecipeConfig):
    """``generations``: sampled continuations shown before / after; ``max_new_tokens``: their length. For user
    data (``--data``): ``trait_words`` / ``opposite_words`` define the trait rate (trait minus opposite words per
    100 words), ``prompt_prefix`` the prompting baseline, ``samples`` continuations of ``sample_tokens`` tokens per
    measured prompt, ``sites`` where persona vectors are read."""

    generations: int = 4
    max_new_tokens: int = 24
    trait_words: tuple[str, ...] = ()
    opposite_words: tuple[str, ...] = ()
    prompt_prefix: str | None = None
    samples: int = 8
    sample_tokens: int = 48
    sites: str = "blocks.*.resid_post"


def _trait_hash(trait: Trait) -> str:
    splits = {name: {"expressing": s.expressing, "neutral": s.neutral, "prompts": s.prompts, "prompted": s.prompted,
                     "corpus": s.corpus, "seed": s.seed} for name, s in (("dev", trait.dev), ("test", trait.test))}
    return sha256_json({"name": trait.name, "splits": splits, "monitor": vars(trait.monitor),
                        "candidates": dict(trait.candidates)})


def load_data(spec: str, lm: LanguageModel, path: Path | None, config: PersonaConfig) -> tuple[Trait,
                                                                                                 dict[str, str]]:
    """The built-in trait of ``binary_attribute`` or of a stories260k directory, else the JSONL file ``path``."""
    from lsi.improve.traits import binary_attribute_trait, cheerful_trait, jsonl_trait
    from lsi.organisms.registry import ground_truth

    if path is not None:
        trait = jsonl_trait(lm, path, words=config.trait_words, opposite=config.opposite_words,
                            prompt_prefix=config.prompt_prefix, samples=config.samples, tokens=config.sample_tokens,
                            sites=config.sites)
        return trait, {"data": sha256_file(path)}
    if spec == "binary_attribute":
        trait = binary_attribute_trait(lm, ground_truth(spec))
    elif Path(spec).name == "stories260k":
        trait = cheerful_trait(lm)
    else:
        raise InputError(f"a model with built-in persona data: {' or '.join(BUILTIN)} (a directory of that name)",
                         f"{spec!r} with no --data", "pass --data FILE.jsonl (schema: lsi improve --list)")
    return trait, {trait.name: _trait_hash(trait)}


def run(ctx: RunContext) -> Result:
    from lsi.core.interventions import Add
    from lsi.improve.traits import persona_study
    from lsi.steer.persona import persona_vectors

    lm, trait, config = ctx.lm, ctx.data, ctx.config
    assert isinstance(config, PersonaConfig)

    def study() -> Checkpoint:
        bar: dict[str, Any] = {}

        def progress(step: str, done: int, total: int) -> None:
            if ctx.progress.bars:
                from tqdm.auto import tqdm

                if step not in bar:
                    bar[step] = tqdm(total=total, desc=step, leave=False)
                bar[step].n = done
                bar[step].refresh()
            elif done == 0:
                ctx.progress.message(f"    {step}: {total} items")

        try:
            return Checkpoint(persona_study(lm, trait, tau=config.tau, seed=config.seed, progress=progress))
        finally:
            for b in bar.values():
                b.close()

    found = ctx.step("study", study).data
    chosen = found["selection"]["chosen"]
    steering = None
    if chosen is not None:
        site, alpha = chosen["settings"]["site"], chosen["settings"]["alpha"]
        vector = persona_vectors(lm, trait.dev.expressing, trait.dev.neutral, site)[site]
        steering = Add(site, vector, alpha, model=lm)

    def samples() -> Checkpoint:
        prompts = [list(p) for p in trait.test.prompts[:: max(1, len(trait.test.prompts) // config.generations)]]
        prompts = prompts[: config.generations]

        def sample() -> list[str]:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                ids = lm.generate(prompts, max_new_tokens=config.max_new_tokens, do_sample=True)
            return lm.tokenizer.batch_decode(ids[:, -config.max_new_tokens:], skip_special_tokens=True)

        before = sample()
        with steering.apply(lm) if steering is not None else nullcontext():
            after = sample() if steering is not None else before
        return Checkpoint({"prompts": [lm.tokenizer.decode(p, skip_special_tokens=True) for p in prompts],
                           "before": before, "after": after})

    shown = ctx.step("samples", samples).data
    exported = ctx.step("export", lambda: Checkpoint(
        export_checkpoint(ctx.run.file("export"), lm, steering, "the chosen addition folded into the weights")
        if steering is not None else
        {"files": None, "note": "nothing to export: no steering within the KL budget", "params": 0}))
    return _result(ctx, trait, found, shown, exported.data)


def _result(ctx: RunContext, trait: Trait, found: dict[str, Any], shown: dict[str, Any],
            exported: dict[str, Any]) -> Result:
    test = found["test"]
    names = {"unsteered": ("unsteered", "baseline", "the model as it is"),
             "persona": ("persona vector", "method", ""),
             "random": ("random direction", "baseline", "a random direction of the same norm and strength"),
             "prompting": ("prompting", "baseline", "the trait asked for in the context (KL not measured: it "
                                                    "changes the input, not the model)")}
    chosen = found["selection"]["chosen"]
    if chosen is not None:
        names["persona"] = ("persona vector", "method", f"addition at {chosen['settings']['site']} with alpha "
                                                        f"{chosen['settings']['alpha']:g} (dev KL {chosen['kl']:.3f})")
    rows = []
    for key, (variant, kind, text) in names.items():
        if key not in test:
            continue
        t = test[key]
        values = {"rate": Estimate(t["rate"], t["interval"][0], t["interval"][1])}
        for metric in ("fluency", "kl", "dloss", *DETAILS):
            if t.get(metric) is not None:
                values[metric] = Estimate(t[metric])
        if key == "persona":
            values["params"] = Estimate(float(exported["params"]))
        rows.append(Row(variant, kind, values, text))
    candidates = (
        *(Metric(key, label, "target", higher, "per 100 words of the test continuations")
          for key, (label, higher) in DETAILS.items()),
        Metric("rate", "trait rate", "target", True, trait.rate_meaning + " (test prompts; interval: bootstrap over "
                                                                          "continuations)"),
        Metric("fluency", "fluency", "side effect", True, "grammatical continuations, where the data can check it"),
        Metric("kl", "KL (nats)", "side effect", False, "KL(base ‖ steered) on unrelated text"),
        Metric("dloss", "Δ cross-entropy (nats)", "side effect", False, "change of the unrelated text's cross-entropy"),
        Metric("params", "parameters changed", "cost", False, "weights edited by the export"),
    )
    metrics = tuple(m for m in candidates if any(m.key in r.values for r in rows))
    chosen_variant = "persona vector" if chosen is not None else "unsteered"
    monitor, screening = found["monitor"]["per_site"], found["screening"]
    best_monitor = max(monitor, key=lambda s: monitor[s]["auroc"] or 0.0)
    verdict = test["verdict"]
    rate = {k: test[k]["rate"] for k in ("unsteered", "persona", "random", "prompting") if k in test}
    headline = (f"{trait.description}: the persona vector moves the trait rate from {rate['unsteered']:.2f} to "
                f"{rate['persona']:.2f} (random direction {rate['random']:.2f}, prompting {rate['prompting']:.2f}); "
                f"monitoring AUROC {monitor[best_monitor]['auroc']:.2f} at {best_monitor}; screening correlation "
                f"{screening['pearson']:.2f}." if chosen is not None else
                f"{trait.description}: no persona steering fits KL ≤ {found['tau']}; prompting gives "
                f"{rate['prompting']:.2f} vs {rate['unsteered']:.2f} unsteered.")
    notes = [_verdict_note(verdict)] if chosen is not None else [str(verdict.get("persona"))]
    notes += [f"monitoring: the last-prompt-token projection predicts whether the sampled response expresses the "
              f"trait with AUROC {monitor[best_monitor]['auroc']:.2f} at {best_monitor} ("
              f"{found['monitor']['labels']['expressed']} of {found['monitor']['labels']['of']} prompts expressed it); "
              f"it separates prompts inviting the trait from those inviting its opposite with AUROC "
              f"{max((m['context_auroc'] or 0.0) for m in monitor.values()):.2f} at best.",
              f"screening at {screening['site']}: projection shift vs trait shift after fine-tuning on "
              f"{len(screening['sets'])} candidate sets, Pearson {screening['pearson']:.2f}, Spearman "
              f"{screening['spearman']:.2f}."]
    if chosen is not None and test["persona"].get("fluency") is not None and test["unsteered"].get("fluency"):
        drop = test["unsteered"]["fluency"] - test["persona"]["fluency"]
        if drop > 0.05:
            notes.append(f"the persona vector costs fluency: {test['unsteered']['fluency']:.2f} → "
                         f"{test['persona']['fluency']:.2f} (selection is under KL only).")
    if exported["files"] is None:
        notes.append(exported["note"])
    per_site = found["selection"]["per_site"]
    series = tuple(Series(site, tuple(Point(p["kl"], p["success"], f"alpha {p['settings']['alpha']:g}")
                                      for p in points)) for site, points in per_site.items())
    chosen_point = None
    if chosen is not None:
        points = per_site[chosen["settings"]["site"]]
        chosen_point = (chosen["settings"]["site"], next(i for i, p in enumerate(points)
                                                         if p["settings"] == chosen["settings"]))
    sites = list(monitor)
    curves = (
        Curve("persona-vector addition on dev: trait rate vs KL per layer", "KL (nats)", "trait rate", series,
              chosen_point),
        Curve("monitoring by layer: AUROC of the last-prompt-token projection", "layer (site index)", "AUROC",
              (Series("sampled response expressed the trait", tuple(Point(i, monitor[s]["auroc"] or 0.0, s)
                                                                    for i, s in enumerate(sites))),
               Series("prompt invites the trait vs its opposite", tuple(Point(i, monitor[s]["context_auroc"] or 0.0, s)
                                                                        for i, s in enumerate(sites))))),
        Curve("data screening: projection shift of each fine-tuning set vs the trait shift fine-tuning causes",
              "projection shift", "trait shift",
              (Series("candidate sets", tuple(Point(s["projection_shift"], s["trait_shift"], s["name"])
                                              for s in screening["sets"])),)),
    )
    alphas = sorted({p["settings"]["alpha"] for pts in per_site.values() for p in pts})
    cells = {(site, p["settings"]["alpha"]): p for site, pts in per_site.items() for p in pts}
    heatmap = Heatmap("trait rate on dev by layer and strength (blank: skipped past the KL budget)", "alpha", "site",
                      tuple(f"{a:g}" for a in alphas), tuple(per_site),
                      tuple(tuple(cells[(s, a)]["success"] if (s, a) in cells else None for a in alphas)
                            for s in per_site),
                      tuple(tuple(f"KL {cells[(s, a)]['kl']:.3f}" if (s, a) in cells else "" for a in alphas)
                            for s in per_site))
    generations = tuple(Generation(p, b, a, "sampled, same seed") for p, b, a in
                        zip(shown["prompts"], shown["before"], shown["after"], strict=True))
    export = None if exported["files"] is None else Export("export", exported["files"], exported["note"])
    return Result(headline, metrics, tuple(rows), chosen_variant, curves, (heatmap,), generations, export,
                  tuple(notes))


def _verdict_note(verdict: dict[str, Any]) -> str:
    parts = []
    for other in ("unsteered", "random", "prompting"):
        beats, above = verdict[f"persona_beats_{other}"], verdict[f"persona_interval_above_{other}"]
        relation = "higher, intervals apart" if above else "higher, intervals overlap" if beats else "NOT higher"
        parts.append(f"{other} ({relation})")
    lead = "prompting does better than the persona vector. " if not verdict["persona_beats_prompting"] else ""
    return f"{lead}the persona vector's trait rate vs " + ", ".join(parts) + "."


RECIPE = register_recipe(Recipe(
    name="persona", area="alignment",
    summary="persona vectors per layer: steer the trait under a KL budget (vs a random direction and prompting), "
            "monitor it from the prompt, screen fine-tuning data by projection shift",
    config=PersonaConfig, load_data=load_data, run=run, default_model="binary_attribute", builtin_models=BUILTIN,
    data_schema=JSONL_SCHEMA + " with trait_words / opposite_words in --config"))
