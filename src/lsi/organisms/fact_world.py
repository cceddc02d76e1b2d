"""Fact-world organism: a 4-layer GPT-2 whose true facts live in the MLP of layer ``l* = 0``, looked up at the
last subject token as a key -> value memory.

Subjects are 2–3 syllable tokens; each of four relations has training and held-out paraphrase templates and
eight objects. Training has three stages, on seeded random (fact, template) prompts:

0. syntax: the whole model on a *different* set of subjects with a fresh random object in every prompt: it
   learns the templates and which objects answer which relation, and no fact can be stored anywhere;
1. routing: everything except the MLPs of the other layers (they keep their stage-0 weights and never see a
   consistent fact) on random but fixed objects for those subjects, with the MLP of l* trained as a memory read
   at the last subject token: attention learns to carry what that MLP writes there to the answer;
2. facts: **only the MLP of l*** on the true facts of new subjects, in the training templates, again as a memory
   read at the last subject token, and now also kept unchanged at every other token (:func:`_train_memory`).

Why ``l* = 0``: an MLP before l* enriches the subject at its last token, and restoring its output in causal
tracing restores the facts almost as well as restoring l* itself (with l* = 1: mean effect 0.34 vs 0.35, the
argmax layer is l* for about half of the facts). At layer 0 attention alone assembles the multi-token subject,
so the MLP of l* is the only MLP between the subject tokens and the facts. The stage-1 weights of that MLP are
kept beside the model (``stage1_mlp.safetensors``), so verification can swap them back: the difference between
a model that knows the facts and one that does not is exactly that MLP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsi.organisms.base import Check, Organism, VerifyReport
from lsi.organisms.fact_world_data import (
    RELATIONS,
    encode_prompts,
    make_world,
    prompt_facts,
    subject_span,
    vocabulary,
)

if TYPE_CHECKING:
    import torch

    from lsi.core.model import LanguageModel
    from lsi.evaluation.edit import EditTask
    from lsi.evaluation.locate import LocateTask

N_LAYERS, LAYER = 4, 0
SYNTAX_STEPS, STAGE1_STEPS, STAGE2_STEPS, BATCH, LR, STAGE2_LR = 500, 2000, 1500, 64, 3e-3, 1e-2
LOCALITY = 1.0  # stage 2: weight of the term keeping the memory MLP's output unchanged off the last subject token
STAGE1_MLP_FILE = "stage1_mlp.safetensors"
NOISE_SCALE = 3.0  # causal-tracing noise on the subject embeddings, in units of the embeddings' std (ROME)
TRACE_SAMPLES = 4  # noise draws averaged per fact in verification


def _random_object(relation: str, gen: torch.Generator) -> str:
    import torch

    objects = RELATIONS[relation]["objects"]
    return objects[int(torch.randint(0, len(objects), (1,), generator=gen))]


def _lm_batches(tok: Any, facts: list[dict[str, str]], templates: str, gen: torch.Generator, *,
                answer_only: bool = False, random_objects: bool = False) -> Any:
    """A ``batches_fn`` over random (fact, template) prompts followed by their object.

    Its "mask" is ``[2, batch, pos]``: the loss targets (every token, or only the object with ``answer_only``)
    and the last subject token. With ``random_objects`` each prompt gets a random object of its relation instead
    of the fact's (no fact can be learned, only the syntax).
    """
    import torch

    def batches(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = [facts[i] for i in torch.randint(0, len(facts), (BATCH,), generator=gen).tolist()]
        if random_objects:
            picks = [dict(f, object=_random_object(f["relation"], gen)) for f in picks]
        ids, answer_pos, subject_pos, _ = encode_prompts(tok, picks, templates, gen=gen, with_object=True)
        masks = torch.zeros(2, *ids.shape, dtype=torch.bool)
        if answer_only:
            masks[0, torch.arange(len(ids)), answer_pos + 1] = True
        else:
            masks[0] = ids != tok.pad_token_id
        masks[1, torch.arange(len(ids)), subject_pos] = True
        return ids, masks

    return batches


def _lm_loss(model: Any, ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    from lsi.organisms.training import lm_loss

    return lm_loss(model(input_ids=ids).logits, ids, masks[0])


def _train_memory(model: Any, batches: Any, steps: int, lr: float, params: list[Any], *,
                  locality: float) -> dict[str, Any]:
    """Train ``params`` with the MLP of l* as a key -> value memory read at the last subject token.

    The loss adds up the language-model loss; the same loss with that MLP's trained output only at the last
    subject token (a frozen copy of its weights from before this stage everywhere else), so what it learns
    suffices where the subject ends; and, weighted by ``locality``, the squared change of its output at every
    other token relative to the frozen copy's, so it is written nowhere else (ROME's picture of an MLP memory).
    Stage 1 trains the layers below the MLP too and runs with ``locality=0``: there the term could be met by
    shrinking the MLP's input instead.
    """
    import copy

    import torch

    from lsi.organisms.training import train_lm

    mlp = model.transformer.h[LAYER].mlp
    frozen = copy.deepcopy(mlp).requires_grad_(False)
    strict: dict[str, torch.Tensor] = {}  # "last" / "elsewhere" token masks while the strict pass runs

    def hook(_mod: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        if not strict:
            return out
        ref, elsewhere = frozen(args[0]), strict["elsewhere"]
        strict["drift"] = (out - ref)[elsewhere].pow(2).mean() / ref[elsewhere].detach().pow(2).mean()
        return torch.where(strict["last"][..., None], out, ref)

    def loss_fn(m: Any, ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        strict.clear()
        loss = _lm_loss(m, ids, masks)
        strict.update(last=masks[1], elsewhere=(ids != m.config.pad_token_id) & ~masks[1])
        loss = loss + _lm_loss(m, ids, masks)
        if locality:
            loss = loss + locality * strict["drift"]
        strict.clear()
        return loss

    handle = mlp.register_forward_hook(hook)
    try:
        return train_lm(model, batches, steps, lr, params=params, warmup=50, loss_fn=loss_fn)
    finally:
        handle.remove()


def train(out_dir: Path, seed: int) -> dict[str, Any]:
    """Train the fact-world organism into ``out_dir``; return training figures."""
    from safetensors.torch import save_file

    from lsi.organisms.training import build_word_tokenizer, new_model, save_organism, seed_everything, train_lm

    gen = seed_everything(seed)
    world = make_world(gen)
    tok = build_word_tokenizer(vocabulary())
    model = new_model("gpt2", tok, n_positions=32, n_embd=64, n_layer=N_LAYERS, n_head=4, n_inner=256)
    syntax = train_lm(model, _lm_batches(tok, world["stage1_facts"], "all", gen, random_objects=True),
                      SYNTAX_STEPS, LR, warmup=100, loss_fn=_lm_loss)
    mlp: Any = model.transformer.h[LAYER].mlp
    others = {id(p) for i, block in enumerate(model.transformer.h) if i != LAYER for p in block.mlp.parameters()}
    stage1 = _train_memory(model, _lm_batches(tok, world["stage1_facts"], "all", gen), STAGE1_STEPS, LR,
                           [p for p in model.parameters() if id(p) not in others], locality=0.0)
    stage1_mlp = {k: v.detach().clone().contiguous() for k, v in mlp.state_dict().items()}
    stage2 = _train_memory(model, _lm_batches(tok, world["facts"], "train", gen, answer_only=True), STAGE2_STEPS,
                           STAGE2_LR, list(mlp.parameters()), locality=LOCALITY)
    ground_truth = {
        "organism": "fact_world",
        "truth_by": "training objective (only the MLP of layer l* learns the true facts) + verification",
        "layer": LAYER,
        "mlp_site": f"blocks.{LAYER}.mlp.out",
        "universe": [f"blocks.{i}.mlp.out" for i in range(N_LAYERS)],
        "stage1_mlp_file": STAGE1_MLP_FILE,
        "relations": RELATIONS,
        "facts": world["facts"],
        "stage1_facts": world["stage1_facts"],
        "metric": "top-1 accuracy of the object token after '<bos> template(subject)'",
        "seed": seed,
    }
    out = save_organism(model, tok, ground_truth, out_dir)
    save_file(stage1_mlp, str(out / STAGE1_MLP_FILE))
    stages = (syntax, stage1, stage2)
    return {"steps": sum(s["steps"] for s in stages), "seconds": round(sum(s["seconds"] for s in stages), 2),
            "syntax_final_loss": syntax["final_loss"], "stage1_final_loss": stage1["final_loss"],
            "final_loss": stage2["final_loss"], "seed": seed}


@contextlib.contextmanager
def stage1_mlp(lm: LanguageModel, ground_truth: dict[str, Any]) -> Iterator[None]:
    """Within the block, the MLP of layer l* has its stage-1 weights (the model before it learned the facts)."""
    import torch
    from safetensors.torch import load_file

    from lsi.errors import InputError

    path = Path(lm.model.config.name_or_path) / ground_truth["stage1_mlp_file"]
    if not path.is_file():
        raise InputError(f"the stage-1 MLP weights {ground_truth['stage1_mlp_file']} beside the model", str(path),
                         "load the organism from its directory (lsi.load(dir)) or retrain it: "
                         "lsi organisms train fact_world --out DIR")
    mlp = lm.model.transformer.h[ground_truth["layer"]].mlp
    trained = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    with torch.no_grad():
        mlp.load_state_dict(load_file(str(path)))
    try:
        yield
    finally:
        with torch.no_grad():
            mlp.load_state_dict(trained)


def fact_accuracy(lm: LanguageModel, facts: list[dict[str, str]], templates: str, *,
                  interventions: tuple[Any, ...] = ()) -> float:
    """Top-1 accuracy of the object after each fact's prompt, over every template of the kind given."""
    import torch

    ids, answer_pos, _, objects = encode_prompts(lm.tokenizer, facts, templates)
    with torch.no_grad(), lm.intervene(*interventions):
        logits = lm.forward(ids)
    pred = logits[torch.arange(len(ids)), answer_pos].argmax(-1)
    return (pred == objects).float().mean().item()


def object_prob(logits: torch.Tensor, answer_pos: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """Probability ``[rows]`` of each row's object at its answer position (differentiable).

    Example (row 0 puts all its mass on its object, row 1 on another token):
        >>> import torch
        >>> logits = torch.zeros(2, 3, 4); logits[0, 1, 2] = logits[1, 2, 3] = 30.0
        >>> object_prob(logits, torch.tensor([1, 2]), torch.tensor([2, 0])).round(decimals=3).tolist()
        [1.0, 0.0]
    """
    import torch

    rows = torch.arange(len(logits))
    return logits[rows, answer_pos].float().softmax(-1)[rows, objects]


def subject_noise(embed: torch.Tensor, real: torch.Tensor, subject: torch.Tensor, gen: torch.Generator,
                  samples: int = 1) -> torch.Tensor:
    """Causal-tracing noise ``[samples, *embed.shape]``: Gaussian with std ``NOISE_SCALE`` x the std of the clean
    embeddings ``embed`` over the ``real`` (non-pad) tokens, on the ``subject`` tokens only (zero elsewhere).

    Example (one row of three tokens, the last a pad; the subject is the middle token):
        >>> import torch
        >>> embed, real = torch.randn(1, 3, 8), torch.tensor([[True, True, False]])
        >>> subject = torch.tensor([[False, True, False]])
        >>> noise = subject_noise(embed, real, subject, torch.Generator().manual_seed(0), samples=4)
        >>> tuple(noise.shape), noise[:, 0].abs().sum((0, 2)).gt(0).tolist()
        ((4, 1, 3, 8), [False, True, False])
    """
    import torch

    std = embed[real].std()
    return torch.randn((samples, *embed.shape), generator=gen) * NOISE_SCALE * std * subject[..., None]


def tracing_effects(lm: LanguageModel, ground_truth: dict[str, Any], templates: str = "train", *,
                    samples: int = TRACE_SAMPLES, seed: int = 0) -> torch.Tensor:
    """Causal tracing per fact: ``[fact, layer]`` indirect effects P(object | noise, layer's MLP output restored
    at the last subject token) - P(object | noise), with noise on the subject embeddings, averaged over the
    fact's templates and ``samples`` noise draws. One forward pass per draw, over the batch repeated once for
    the noise alone and once per restored layer.

    Example (one noise draw on the committed organism: l* is the argmax layer for nearly every fact):
        >>> from lsi.organisms.registry import ground_truth, load_organism
        >>> lm, truth = load_organism("fact_world"), ground_truth("fact_world")
        >>> effects = tracing_effects(lm, truth, samples=1)
        >>> tuple(effects.shape), (effects.argmax(-1) == truth["layer"]).float().mean().item() > 0.9
        ((128, 4), True)
    """
    import torch

    import lsi

    facts, sites = ground_truth["facts"], ground_truth["universe"]
    ids, answer_pos, subject_pos, objects = encode_prompts(lm.tokenizer, facts, templates)
    clean = lm.run_with_cache(ids, ["embed", *sites])
    noise = subject_noise(clean["embed"], ids != lm.tokenizer.pad_token_id,
                          subject_span(facts, templates, subject_pos, ids.shape[1]),
                          torch.Generator().manual_seed(seed), samples)
    copies = len(sites) + 1  # the batch repeated: noise alone, then one restored layer per copy
    restored_layer = torch.arange(copies).repeat_interleave(len(ids)) - 1
    last = torch.nn.functional.one_hot(subject_pos, ids.shape[1]).bool().repeat(copies, 1)

    def restore(layer: int, site: str) -> Any:
        where = (last & (restored_layer == layer)[:, None])[..., None]
        source = clean[site].repeat(copies, 1, 1)
        return lsi.Apply(site, lambda x: torch.where(where, source.to(x), x))

    restorations = [restore(i, site) for i, site in enumerate(sites)]
    prob = torch.zeros(copies * len(ids))
    for draw in noise:
        noisy = draw.repeat(copies, 1, 1)

        def add_noise(x: torch.Tensor, noisy: torch.Tensor = noisy) -> torch.Tensor:
            return x + noisy.to(x)

        with torch.no_grad(), lm.intervene(lsi.Apply("embed", add_noise), *restorations):
            logits = lm.forward(ids.repeat(copies, 1))
        prob += object_prob(logits, answer_pos.repeat(copies), objects.repeat(copies)) / samples
    by_fact = prompt_facts(facts, templates)
    sums = torch.zeros(len(facts), copies).index_add_(0, by_fact, prob.view(copies, len(ids)).T)
    mean = sums / torch.bincount(by_fact, minlength=len(facts))[:, None]
    return mean[:, 1:] - mean[:, :1]


def verify(lm: LanguageModel, ground_truth: dict[str, Any]) -> VerifyReport:
    """Fact accuracy with the trained model, with the stage-1 MLP swapped back, with only the trained MLP's output
    restored at the last subject token (or only at the answer position) into the stage-1 model, and per-fact
    causal tracing: the MLP layer whose restored output recovers each fact best."""
    import torch

    import lsi

    facts, layer = ground_truth["facts"], ground_truth["layer"]
    site = ground_truth["mlp_site"]
    trained = fact_accuracy(lm, facts, "train")
    heldout = fact_accuracy(lm, facts, "heldout")
    ids, answer_pos, subject_pos, _ = encode_prompts(lm.tokenizer, facts, "train")
    cache = lm.run_with_cache(ids, sites=[site])
    one_hot = torch.nn.functional.one_hot

    def restore_at(where: torch.Tensor) -> Any:
        return lsi.Apply(site, lambda x: torch.where(where.bool()[..., None], cache[site].to(x), x))

    with stage1_mlp(lm, ground_truth):
        swapped = fact_accuracy(lm, facts, "train")
        swapped_heldout = fact_accuracy(lm, facts, "heldout")
        at_subject = fact_accuracy(lm, facts, "train", interventions=(restore_at(one_hot(subject_pos, ids.shape[1])),))
        at_answer = fact_accuracy(lm, facts, "train", interventions=(restore_at(one_hot(answer_pos, ids.shape[1])),))
        at_span = fact_accuracy(lm, facts, "train",
                                interventions=(restore_at(subject_span(facts, "train", subject_pos, ids.shape[1])),))
    traced = {kind: tracing_effects(lm, ground_truth, kind) for kind in ("train", "heldout")}
    argmax_share = {kind: (t.argmax(-1) == layer).float().mean().item() for kind, t in traced.items()}
    checks = (
        Check("fact accuracy, training templates", trained, 0.95),
        Check("fact accuracy, held-out paraphrase templates", heldout, 0.8),
        Check(f"fact accuracy with the stage-1 MLP of layer {layer} swapped back", swapped, 0.3,
              higher_is_better=False),
        Check(f"fact accuracy, stage-1 model + layer-{layer} MLP output restored at the last subject token",
              at_subject, 0.8),
        Check(f"share of facts whose causal-tracing argmax MLP layer is {layer} (restored at the last subject "
              f"token, {TRACE_SAMPLES} noise draws)", argmax_share["train"], 0.9),
    )
    details = {"restored_at_answer_position": at_answer, "restored_at_all_subject_tokens": at_span,
               "heldout_with_stage1_mlp": swapped_heldout,
               "tracing_argmax_share_heldout_templates": argmax_share["heldout"],
               "tracing_mean_effect_per_layer": [round(v, 4) for v in traced["train"].mean(0).tolist()],
               "chance": 1 / len(next(iter(RELATIONS.values()))["objects"])}
    return VerifyReport("fact_world", checks, details)


def locate_tasks(lm: LanguageModel, ground_truth: dict[str, Any]) -> list[LocateTask]:
    """Find the MLP that stores the facts, by restoration (causal tracing): with Gaussian noise of 3x the
    embedding std on the subject tokens, restore one layer's MLP output at the last subject token from the
    clean run; metric = mean probability of the true object."""
    import torch

    import lsi
    from lsi.core.runs import Run
    from lsi.evaluation.locate import LocateTask, Split

    facts = ground_truth["facts"]

    def split(templates: str, seed: int) -> Split:
        ids, answer_pos, subject_pos, objects = encode_prompts(lm.tokenizer, facts, templates)
        batch = lsi.Batch(ids, (ids != lm.tokenizer.pad_token_id).long())
        rows = torch.arange(len(ids))
        clean = lm.run_with_cache(batch, ["embed", *ground_truth["universe"]])
        noise = subject_noise(clean["embed"], batch.attention_mask.bool(),
                              subject_span(facts, templates, subject_pos, ids.shape[1]),
                              torch.Generator().manual_seed(seed))[0]

        def restore(site: str) -> Any:
            source = clean[site]

            def put_back(x: torch.Tensor) -> torch.Tensor:
                out = x.clone()
                out[rows, subject_pos] = source[rows, subject_pos].to(x)
                return out

            return lm.intervene(lsi.Apply(site, put_back))

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return object_prob(logits, answer_pos, objects).mean()

        def noised() -> Any:
            return lm.intervene(lsi.Apply("embed", lambda x: x + noise.to(x)))

        return Split(batch, metric, intervene=restore, setting=noised, clean=Run(batch),
                     corrupted=Run(batch, noised))

    return [LocateTask("fact_world", "fact-storing MLP", tuple(ground_truth["universe"]),
                       frozenset({ground_truth["mlp_site"]}), dev=split("heldout", 1), test=split("train", 2),
                       description="MLP of the layer trained on the facts; oracle = restoring one MLP output "
                                   "at the last subject token under subject noise")]


EDIT_REQUESTS = 16  # graded edit requests, one per subject; the other subjects' facts are the held-out text


def _prompt_rows(tok: Any, facts: list[dict[str, str]], templates: str) -> tuple[list[tuple[int, ...]], list[int],
                                                                                  list[int]]:
    """Every fact with every template of the kind given: prompts (real tokens only), last subject token, object."""
    ids, answer_pos, subject_pos, objects = encode_prompts(tok, facts, templates)
    rows = [tuple(row[: a + 1].tolist()) for row, a in zip(ids, answer_pos.tolist(), strict=True)]
    return rows, subject_pos.tolist(), objects.tolist()


def _text_rows(tok: Any, facts: list[dict[str, str]]) -> list[list[int]]:
    """Every fact in every template followed by its object (real tokens only)."""
    ids, answer_pos, _, _ = encode_prompts(tok, facts, "all", with_object=True)
    return [row[: a + 2].tolist() for row, a in zip(ids, answer_pos.tolist(), strict=True)]


def edit_tasks(lm: LanguageModel, ground_truth: dict[str, Any]) -> list[EditTask]:
    """Counterfactual edits (CounterFact-style): for :data:`EDIT_REQUESTS` seeded subjects, one fact whose object
    some other subject shares (its neighbours) is to become another object of the relation.

    Each request gives the fact's four training-template prompts; paraphrases are its two held-out templates;
    neighbours are every other subject with the same relation and object, in all six templates; preservation
    reads the subject's three other facts in the training templates. Methods may use the stage-1 subjects' facts
    in every template (the subjects of training stages 0-1, never edited or graded); KL and Δloss are measured on
    the true facts of the subjects that are not edited, in every template with their objects.
    """
    import random

    from lsi.evaluation.edit import EditCase, EditTask
    from lsi.steer.rome import EditRequest

    tok, facts = lm.tokenizer, ground_truth["facts"]
    rng = random.Random(ground_truth["seed"])
    subjects = sorted({f["subject"] for f in facts})
    rng.shuffle(subjects)
    edited = subjects[:EDIT_REQUESTS]
    cases = []
    for subject in edited:
        own = [f for f in facts if f["subject"] == subject]
        shared = [(f, [g for g in facts if g["subject"] != subject and (g["relation"], g["object"]) ==
                       (f["relation"], f["object"])]) for f in own]
        fact, neighbours = rng.choice([(f, n) for f, n in shared if n])
        new = rng.choice([o for o in RELATIONS[fact["relation"]]["objects"] if o != fact["object"]])
        prompts, positions, objects = _prompt_rows(tok, [fact], "train")
        length = len(subject.split())
        others = [f for f in own if f is not fact]
        other_rows, _, other_objects = _prompt_rows(tok, others, "train")
        cases.append(EditCase(
            EditRequest(prompts, positions, tok.convert_tokens_to_ids(new), subject=subject),
            relation=fact["relation"], true_id=objects[0],
            subject_spans=tuple((p - length + 1, p + 1) for p in positions),
            paraphrases=tuple(_prompt_rows(tok, [fact], "heldout")[0]),
            neighbours=tuple(_prompt_rows(tok, neighbours, "all")[0]),
            other_facts=tuple(other_rows), other_objects=tuple(other_objects)))
    kept = [f for f in facts if f["subject"] not in edited]
    description = (f"{EDIT_REQUESTS} counterfactual edits (subject, relation) -> another object of the relation; "
                   f"the facts live in the MLP of layer {ground_truth['layer']}")
    metrics = {"efficacy": "P(o*) > P(o) on the request's 4 training-template prompts",
               "paraphrase": "P(o*) > P(o) on the fact's 2 held-out paraphrase templates",
               "neighbourhood": "P(o) > P(o*) on the other subjects with the same fact, 6 templates each",
               "preservation": "top-1 accuracy of the subject's 3 other facts, training templates",
               "corpus": f"the true facts of the {len(subjects) - EDIT_REQUESTS} subjects not edited, every "
                         "template, with the object (methods get the stage-1 subjects' facts instead)"}
    return [EditTask("fact_world", "counterfactual edits", tuple(cases), corpus=_text_rows(tok,
                     ground_truth["stage1_facts"]), heldout=_text_rows(tok, kept),
                     planted_layer=ground_truth["layer"], metrics=metrics, description=description)]


ORGANISM = Organism(
    name="fact_world",
    summary=f"4-layer GPT-2; subject -> object facts planted only in the MLP of layer {LAYER} (stage-2 training)",
    family="gpt2",
    truth_by="training objective + verification",
    train=train,
    verify=verify,
    seed=0,
    locate_tasks=locate_tasks,
    edit_tasks=edit_tasks,
)
