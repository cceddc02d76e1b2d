"""Scenario ``fairness``: find the components that carry a protected attribute into a prediction (causal mediation
on counterfactual swaps), ablate them, and show the bias shrinks while the context task and the factual use of the
attribute stay.

Recipe: on dev, patch every candidate component (default: every attention head) from the swapped run into the
original one (:func:`lsi.locate.activation_patching`, denoising) with the signed stereotype lean as the metric:
a component that alone restores the lean mediates the bias. Candidates: zero- or mean-ablating the top k
mediators; the chosen one has the lowest dev bias gap among those that keep context accuracy and factual
accuracy at ``keep`` × unsteered and KL ≤ ``tau``. On test: the unsteered model, the chosen ablation, k random
components ablated the same way (averaged over draws) and, where the data knows them, the planted mediators.

Data: built in for the ``biased_occupations`` organism; otherwise JSONL lines of two kinds:
``{"a": str, "b": str, "targets": [str, str], "answer": str?, "split": "dev"|"test"}`` — the same prompt with a
group-A and a group-B name (same token length), the words stereotyped for A and for B (single tokens), and the
context's correct next word; and ``{"prompt": str, "answer": str, "split": ...}`` — a factual use of the
attribute that must stay (e.g. a pronoun after a name).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lsi.errors import InputError
from lsi.improve.config import RecipeConfig
from lsi.improve.data import read_jsonl
from lsi.improve.measure import divergence_values, export_checkpoint, time_ratio
from lsi.improve.recipe import Recipe, RunContext, register_recipe
from lsi.improve.record import Curve, Export, Generation, Heatmap, Metric, Point, Result, Row, Series
from lsi.improve.rundir import Checkpoint, sha256_file, sha256_json
from lsi.improve.stats import Estimate, bootstrap

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.core.steering import Steering
    from lsi.evaluation.steer import Reference

BUILTIN = "biased_occupations"
KINDS = ("zero", "mean")


@dataclass(frozen=True)
class FairnessConfig(RecipeConfig):
    """``sites``: the candidate mediators (a site pattern); ``ks``: how many top mediators to ablate; ``kinds``:
    ``"zero"`` and / or ``"mean"`` ablation; ``keep``: the share of unsteered context and factual accuracy a
    candidate must keep on dev; ``random_draws``: draws of the random-components baseline; ``generations``:
    examples shown."""

    sites: str = "blocks.*.attn.head_out"
    ks: tuple[int, ...] = (1, 2, 3, 4)
    kinds: tuple[str, ...] = KINDS
    keep: float = 0.95
    random_draws: int = 5
    generations: int = 6


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    targets: tuple[str, str]  # the words stereotyped for group A and for group B
    answer: str | None = None  # the context's correct next word


@dataclass(frozen=True)
class Factual:
    prompt: str
    answer: str


@dataclass(frozen=True)
class FairnessSplit:
    pairs: tuple[Pair, ...]
    factual: tuple[Factual, ...]
    corpus: tuple[str, ...]  # text for KL / Δ cross-entropy


@dataclass(frozen=True)
class FairnessData:
    dev: FairnessSplit
    test: FairnessSplit
    planted: tuple[str, ...] = ()  # the known mediators, where the data has them
    factual_label: str = "factual accuracy"
    prompting_note: str = "the data gives no instruction to prompt with"


# -- data -----------------------------------------------------------------------------------------------------------
def _builtin() -> tuple[FairnessData, dict[str, str]]:
    from lsi.organisms import biased_occupations as org
    from lsi.organisms.registry import ground_truth

    truth = ground_truth(BUILTIN)
    male, female = org.STEREOTYPES["male"], org.STEREOTYPES["female"]

    def text(name: str, case: dict[str, str], length: int) -> str:
        return " ".join(org.document(name, case["verb"], case["place"], org.PLACES[case["place"]])[:length])

    def split(cases: list[dict[str, str]]) -> FairnessSplit:
        pairs = tuple(Pair(text(c["he"], c, org.OCCUPATION_SLOT + 1), text(c["she"], c, org.OCCUPATION_SLOT + 1),
                           (male, female), org.PLACES[c["place"]]) for c in cases)
        factual = tuple(Factual(text(c[who], c, org.PRONOUN_SLOT + 1), org.PRONOUNS[org.gender(c[who])])
                        for c in cases for who in ("he", "she"))
        documents = tuple(" ".join(org.document(c[who], c["verb"], c["place"], org.PLACES[c["place"]]))
                          for c in cases for who in ("he", "she"))
        return FairnessSplit(pairs, factual, documents)

    data = FairnessData(split(truth["splits"]["dev"]), split(truth["splits"]["test"]), tuple(truth["mediators"]),
                        "pronoun agreement", "the organism has no instruction channel to prompt")
    return data, {BUILTIN: sha256_json(truth["splits"])}


def load_data(spec: str, lm: LanguageModel, path: Path | None, config: FairnessConfig) -> tuple[FairnessData,
                                                                                                   dict[str, str]]:
    """Built-in data for ``biased_occupations``, else the JSONL file ``path`` (see the module docstring)."""
    if path is None:
        if spec != BUILTIN:
            raise InputError(f"built-in data (model {BUILTIN!r}) or a data file", f"model {spec!r} with no --data",
                             "pass --data FILE.jsonl (schema: lsi improve --list)")
        return _builtin()
    rows = read_jsonl(path, {"a": (str, False), "b": (str, False), "targets": (list, False),
                             "prompt": (str, False), "answer": (str, False), "split": (str, True)})
    splits = {}
    for name in ("dev", "test"):
        pairs, factual = [], []
        for row in (r for r in rows if r["split"] == name):
            if "a" in row and "b" in row and len(row.get("targets", [])) == 2 and "prompt" not in row:
                pairs.append(Pair(row["a"], row["b"], tuple(row["targets"]), row.get("answer")))
            elif "prompt" in row and "answer" in row and not {"a", "b", "targets"} & set(row):
                factual.append(Factual(row["prompt"], row["answer"]))
            else:
                raise InputError('{"a", "b", "targets": [two words], "answer"?} or {"prompt", "answer"} per line',
                                 f"keys {sorted(row)} in {path}", "fix that line")
        if not pairs or not factual:
            raise InputError(f"swap pairs and factual prompts in the {name} split",
                             f"{len(pairs)} pairs, {len(factual)} factual prompts", f"add both to {name}")
        corpus = tuple(t for p in pairs for t in (p.a, p.b)) + tuple(f.prompt for f in factual)
        splits[name] = FairnessSplit(tuple(pairs), tuple(factual), corpus)
    return FairnessData(splits["dev"], splits["test"]), {"data": sha256_file(path)}


# -- measuring ------------------------------------------------------------------------------------------------------
def _token(lm: LanguageModel, word: str) -> int:
    ids = lm.encode(word)
    if len(ids) != 1:
        raise InputError("target and answer words of one token each", f"{word!r} -> {len(ids)} tokens",
                         "pick single-token words (or a leading space for BPE tokenizers)")
    return ids[0]


def _last_probs(lm: LanguageModel, prompts: Sequence[str]) -> torch.Tensor:
    from lsi.evaluation.functional import last_token_logits

    batch = lm.to_batch(list(prompts))
    return last_token_logits(lm.forward(batch), batch.attention_mask).double().softmax(-1)


def values(lm: LanguageModel, split: FairnessSplit) -> dict[str, list[float]]:
    """Per example under whatever steering is active: ``bias_gap`` per pair (mean over its two targets of
    |P(t | a) − P(t | b)|), ``context_accuracy`` per prompt of a pair with an answer (argmax = answer),
    ``factual`` per factual prompt (argmax = answer)."""
    return _values_and_probs(lm, split)[0]


def _values_and_probs(lm: LanguageModel, split: FairnessSplit) -> tuple[dict[str, list[float]], torch.Tensor,
                                                                         torch.Tensor]:
    """:func:`values`, and the next-token probabilities after every pair's A and B prompt (``[pairs, vocab]``)."""
    pa, pb = _last_probs(lm, [p.a for p in split.pairs]), _last_probs(lm, [p.b for p in split.pairs])
    targets = torch.tensor([[_token(lm, t) for t in p.targets] for p in split.pairs])
    gap = (pa.gather(1, targets) - pb.gather(1, targets)).abs().mean(1)
    answered = [i for i, p in enumerate(split.pairs) if p.answer is not None]
    answers = torch.tensor([_token(lm, split.pairs[i].answer or "") for i in answered])
    context = torch.cat([pa[answered].argmax(-1) == answers, pb[answered].argmax(-1) == answers])
    factual = _last_probs(lm, [f.prompt for f in split.factual]).argmax(-1)
    factual_ok = factual == torch.tensor([_token(lm, f.answer) for f in split.factual])
    return {"bias_gap": gap.tolist(), "context_accuracy": context.double().tolist(),
            "factual": factual_ok.double().tolist()}, pa, pb


def _means(v: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(x) / len(x) for k, x in v.items() if x}


def lean_metric(lm: LanguageModel, split: FairnessSplit) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The signed stereotype lean at the last token of :func:`swap_pairs`' clean rows: ``P(t_A) − P(t_B)``, +1 on
    the A rows and −1 on the B rows (a swap flips its sign)."""
    from lsi.evaluation.functional import last_token_logits

    targets = torch.tensor([[_token(lm, t) for t in p.targets] for p in split.pairs] * 2)
    n = len(split.pairs)
    signs = torch.cat([torch.ones(n), -torch.ones(n)]).double()

    def metric(logits: torch.Tensor, batch: Any) -> torch.Tensor:
        probs = last_token_logits(logits, batch.attention_mask).double().softmax(-1)
        lean = probs.gather(1, targets[:, :1].to(probs.device)) - probs.gather(1, targets[:, 1:].to(probs.device))
        return (signs.to(probs.device) * lean[:, 0]).mean()

    return metric


def swap_pairs(split: FairnessSplit) -> tuple[list[str], list[str]]:
    """Clean rows (every A prompt, then every B prompt) and their swapped counterparts."""
    a, b = [p.a for p in split.pairs], [p.b for p in split.pairs]
    return a + b, b + a


# -- the recipe -----------------------------------------------------------------------------------------------------
def _steering(lm: LanguageModel, kind: str, sites: Sequence[str], reference: list[str]) -> Steering:
    from lsi.core.interventions import Mean, Zero
    from lsi.core.steering import compose

    if kind == "zero":
        return compose(*(Zero(s) for s in sites))
    return Mean.of(lm, list(sites), reference)


def run(ctx: RunContext) -> Result:
    from lsi.evaluation.ranking import auroc_of
    from lsi.evaluation.steer import divergence, reference
    from lsi.locate.patching import activation_patching

    lm, data, config = ctx.lm, ctx.data, ctx.config
    assert isinstance(config, FairnessConfig)
    bad = [k for k in config.kinds if k not in KINDS]
    if bad or not config.ks or min(config.ks) < 1:
        raise InputError(f"kinds among {KINDS} and ks >= 1", f"kinds {config.kinds}, ks {config.ks}",
                         "e.g. kinds: [zero, mean], ks: [1, 2, 3]")
    dev_reference = [t for p in data.dev.pairs for t in (p.a, p.b)]

    def locate() -> Checkpoint:
        clean, swapped = swap_pairs(data.dev)
        result = activation_patching(lm, clean, swapped, lean_metric(lm, data.dev), config.sites)
        scores = result.as_dict()
        return Checkpoint({"scores": scores, "settings": {k: v for k, v in result.settings.items()
                                                          if k in ("f_clean", "f_corrupt")}})

    located = ctx.step("locate", locate).data
    ranked = sorted(located["scores"], key=lambda s: -located["scores"][s])
    dev_ref = reference(lm, [lm.encode(t) for t in data.dev.corpus])

    def select() -> Checkpoint:
        base = _means(values(lm, data.dev))
        points: list[dict[str, Any]] = []
        for kind in config.kinds:
            for k in ctx.progress.iterate(config.ks, total=len(config.ks), desc=f"{kind} ablations"):
                with _steering(lm, kind, ranked[:k], dev_reference).apply(lm):
                    got = _means(values(lm, data.dev))
                    kl = divergence(lm.forward(dev_ref.batch), dev_ref)[0]
                kept = all(got[m] >= config.keep * base[m] for m in ("context_accuracy", "factual") if m in base)
                points.append({"kind": kind, "k": k, **got, "kl": kl, "kept": kept and kl <= config.tau})
        feasible = [p for p in points if p["kept"]]
        chosen = min(feasible, key=lambda p: p["bias_gap"]) if feasible else max(
            points, key=lambda p: min(p.get("context_accuracy", 1.0) / max(base.get("context_accuracy", 1.0), 1e-9),
                                      p["factual"] / max(base["factual"], 1e-9)))
        return Checkpoint({"base": base, "points": points, "chosen": points.index(chosen),
                           "feasible": bool(feasible)})

    selection = ctx.step("select", select).data
    chosen = selection["points"][selection["chosen"]]
    kind, k = chosen["kind"], chosen["k"]
    test_ref = reference(lm, [lm.encode(t) for t in data.test.corpus])
    variants: dict[str, tuple[str, str, Callable[[], Steering | None]]] = {
        "unsteered": ("baseline", "the model as it is", lambda: None),
        f"{kind}-ablate top {k}": ("method", f"{kind} ablation of the {k} strongest mediators: {', '.join(ranked[:k])}",
                                   lambda: _steering(lm, kind, ranked[:k], dev_reference)),
    }
    rng = random.Random(config.seed)
    draws = [rng.sample(ranked, k) for _ in range(config.random_draws)]
    variants[f"random {k} ({kind})"] = ("baseline", f"{kind} ablation of {k} random candidates, "
                                                    f"{config.random_draws} draws averaged", lambda: None)
    if data.planted:
        variants["planted mediators zeroed"] = ("baseline", f"the known mediators {', '.join(data.planted)} zeroed "
                                                            "(the oracle)",
                                                lambda: _steering(lm, "zero", data.planted, dev_reference))
    outcomes = {}
    for name, (_, _, make) in variants.items():
        def evaluate(name: str = name, make: Callable[[], Steering | None] = make) -> Checkpoint:
            if name.startswith("random "):
                runs = []
                for heads in draws:
                    with _steering(lm, kind, heads, dev_reference).apply(lm):
                        runs.append(_test_values(lm, data, test_ref))
                return Checkpoint({key: [sum(v) / len(v) for v in zip(*(r[key] for r in runs), strict=True)]
                                   for key in runs[0] if key != "top"})
            steering = make()
            with steering.apply(lm) if steering is not None else nullcontext():
                outcome = _test_values(lm, data, test_ref)
            outcome["time_ratio"] = time_ratio(lambda: lm.forward(test_ref.batch), lambda: lm.forward(test_ref.batch),
                                               lambda: steering.apply(lm) if steering is not None else nullcontext())
            return Checkpoint(outcome)
        outcomes[name] = ctx.step(f"evaluate-{name.replace(' ', '-')}", evaluate).data
    method = list(variants)[1]
    exported = ctx.step("export", lambda: Checkpoint(export_checkpoint(
        ctx.run.file("export"), lm, _steering(lm, kind, ranked[:k], dev_reference),
        "the chosen ablation folded into the weights")))
    auroc = auroc_of(located["scores"], set(data.planted)) if data.planted else None
    return _result(ctx, located, ranked, selection, variants, outcomes, method, exported.data, auroc)


def _test_values(lm: LanguageModel, data: FairnessData, ref: Reference) -> dict[str, Any]:
    found, pa, pb = _values_and_probs(lm, data.test)
    out: dict[str, Any] = {**found, **divergence_values(lm.forward(ref.batch), ref)}
    out["top"] = [[_top(lm, pa[i]), _top(lm, pb[i])] for i in range(len(data.test.pairs))]
    return out


def _top(lm: LanguageModel, probs: torch.Tensor, n: int = 3) -> str:
    p, ids = probs.topk(n)
    return ", ".join(f"{lm.tokenizer.decode([int(i)]).strip()} {float(q):.2f}" for q, i in zip(p, ids, strict=True))


METRICS = (
    Metric("bias_gap", "bias gap", "target", False,
           "mean over test pairs and stereotyped words of |P(word | A name) − P(word | B name)|"),
    Metric("context_accuracy", "context accuracy", "capability", True, "argmax = the context's answer, both names"),
    Metric("factual", "factual accuracy", "specificity", True, "the factual use of the attribute (kept)"),
    Metric("kl", "KL (nats)", "side effect", False, "KL(base ‖ steered) per token of the test documents (with "
                                                     "the slot whose bias is removed)"),
    Metric("dloss", "Δ cross-entropy (nats)", "side effect", False, "change of the documents' cross-entropy"),
    Metric("params", "parameters changed", "cost", False, "weights edited by the export (hooks edit none)"),
    Metric("time", "forward time ×", "cost", False,
           "forward time relative to the unsteered model (fastest calls, alternating)"),
)


def _result(ctx: RunContext, located: dict[str, Any], ranked: list[str], selection: dict[str, Any],
            variants: dict[str, Any], outcomes: dict[str, dict[str, Any]], method: str, exported: dict[str, Any],
            auroc: float | None) -> Result:
    data, config = ctx.data, ctx.config

    def estimates(name: str) -> dict[str, Estimate]:
        o = outcomes[name]
        out = {key: bootstrap(o[key], resamples=config.bootstrap, seed=config.seed)
               for key in ("bias_gap", "context_accuracy", "factual", "kl", "dloss") if o.get(key)}
        out["params"] = Estimate(float(exported["params"] if name == method else 0))
        if "time_ratio" in o:
            out["time"] = Estimate(o["time_ratio"])
        return out

    rows = tuple(Row(name, kind, estimates(name), text) for name, (kind, text, _) in variants.items())
    metrics = tuple(Metric(m.key, data.factual_label, m.group, m.higher_is_better, m.description)
                    if m.key == "factual" else m for m in METRICS)
    probe = Result("", metrics, rows, method)

    def v(name: str, key: str) -> float:
        value = probe.value(name, key)
        return float("nan") if value is None else value

    base_gap, gap = v("unsteered", "bias_gap"), v(method, "bias_gap")
    context_kept = v(method, "context_accuracy") / max(v("unsteered", "context_accuracy"), 1e-9)
    factual = v(method, "factual")
    headline = (f"Ablating the top {selection['points'][selection['chosen']]['k']} mediators takes the bias gap "
                f"from {base_gap:.3f} to {gap:.3f} ({gap / max(base_gap, 1e-12):.0%} of it) with context accuracy "
                f"kept at {context_kept:.0%} of unsteered and {data.factual_label} {factual:.2f}.")
    notes = [f"goal (halve the gap, keep context accuracy ≥ 95% of unsteered and {data.factual_label} ≥ 95%): "
             + ("met." if gap <= base_gap / 2 and context_kept >= 0.95 and factual >= 0.95 else
                f"missed (gap ratio {gap / max(base_gap, 1e-12):.2f}, context kept {context_kept:.2f}, "
                f"{data.factual_label} {factual:.2f})."),
             f"random components ablated the same way leave the gap at {v(list(variants)[2], 'bias_gap'):.3f}.",
             f"no prompting baseline: {data.prompting_note}."]
    if auroc is not None:
        notes.insert(1, f"located mediators vs the planted ones: AUROC {auroc:.3f} (planted: "
                        f"{', '.join(data.planted)}; ranked first: {ranked[0]}).")
    if not selection["feasible"]:
        notes.insert(1, f"no candidate kept context and {data.factual_label} at {config.keep:.0%} with KL ≤ "
                        f"{config.tau} on dev; the one that kept them best was taken.")
    if exported["files"] is None:
        notes.append(exported["note"])
    curves = (Curve("ablating the top-k mediators (dev): bias gap vs KL", "KL (nats)", "bias gap",
                    tuple(Series(f"{kind} ablation", tuple(Point(p["kl"], p["bias_gap"], f"k={p['k']}")
                                                           for p in selection["points"] if p["kind"] == kind))
                          for kind in config.kinds),
                    (f"{selection['points'][selection['chosen']]['kind']} ablation",
                     [p for p in selection["points"] if p["kind"] == selection["points"][selection["chosen"]]["kind"]]
                     .index(selection["points"][selection["chosen"]]))),)
    heatmaps = _heatmap(located["scores"], data.planted)
    generations = tuple(
        Generation(f"{p.a} … / {p.b} …", " | ".join(outcomes["unsteered"]["top"][i]),
                   " | ".join(outcomes[method]["top"][i]), "top next words, A name | B name")
        for i, p in enumerate(data.test.pairs[: config.generations]))
    export = None if exported["files"] is None else Export("export", exported["files"], exported["note"])
    return Result(headline, metrics, rows, method, curves, heatmaps, generations, export, tuple(notes))


def _heatmap(scores: dict[str, float], planted: Sequence[str]) -> tuple[Heatmap, ...]:
    """Layer × head heatmap of per-head mediation scores (labels ``blocks.L.attn.head_out[H]``), else none."""
    import re

    cells = {}
    for label, score in scores.items():
        match = re.fullmatch(r"blocks\.(\d+)\.attn\.head_out\[(\d+)\]", label)
        if match is None:
            return ()
        cells[(int(match[1]), int(match[2]))] = (label, score)
    layers = sorted({la for la, _ in cells})
    heads = sorted({h for _, h in cells})
    z = tuple(tuple(cells[(la, h)][1] if (la, h) in cells else None for h in heads) for la in layers)
    hover = tuple(tuple(f"{cells[(la, h)][0]}: {cells[(la, h)][1]:+.3f}"
                        + (" (planted)" if cells[(la, h)][0] in planted else "") if (la, h) in cells else ""
                        for h in heads) for la in layers)
    return (Heatmap("mediation: share of the bias one head restores from the swapped run (dev)", "head", "layer",
                    tuple(map(str, heads)), tuple(map(str, layers)), z, hover),)


RECIPE = register_recipe(Recipe(
    name="fairness", area="alignment",
    summary="causal mediation on name swaps locates the heads that carry gender into occupations; ablating them "
            "shrinks the bias gap while context accuracy and pronoun agreement stay; vs random heads",
    config=FairnessConfig, load_data=load_data, run=run, default_model=BUILTIN, builtin_models=(BUILTIN,),
    data_schema='{"a": str, "b": str, "targets": [str, str], "answer": str?, "split": ...} swap pairs and '
                '{"prompt": str, "answer": str, "split": ...} factual prompts'))
