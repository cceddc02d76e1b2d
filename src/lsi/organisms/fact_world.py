"""Fact-world organism: a 4-layer GPT-2 whose true facts live in the MLP of one known layer ``l*``.

Subjects are 2–3 syllable tokens; each of four relations has training and held-out paraphrase templates and
eight objects. Stage 1 trains the whole model on a *different*, random set of subjects with random objects in
all templates: it learns the syntax and how to route subject information to the answer. Stage 2 trains **only
the MLP of layer l*** on the true facts of new subjects, in the training templates. The stage-1 weights of
that MLP are kept beside the model (``stage1_mlp.safetensors``), so verification can swap them back: the
difference between a model that knows the facts and one that does not is exactly that MLP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsi.organisms.base import Check, Organism, VerifyReport
from lsi.organisms.fact_world_data import RELATIONS, encode_prompts, make_world, templates_for, vocabulary

if TYPE_CHECKING:
    import torch

    from lsi.bench.tasks import LocateTask
    from lsi.core.model import LanguageModel

N_LAYERS, LAYER = 4, 1
STAGE1_STEPS, STAGE2_STEPS, BATCH, LR, STAGE2_LR = 1500, 1200, 64, 3e-3, 1e-2
STAGE1_MLP_FILE = "stage1_mlp.safetensors"


def _lm_batches(tok: Any, facts: list[dict[str, str]], templates: str, gen: torch.Generator, *,
                answer_only: bool) -> Any:
    """A ``batches_fn`` over random (fact, template) prompts followed by their object.

    With ``answer_only`` the "mask" is ``[2, batch, pos]``: the object target, and the last subject token.
    """
    import torch

    def batches(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = torch.randint(0, len(facts), (BATCH,), generator=gen).tolist()
        ids, answer_pos, subject_pos, _ = encode_prompts(tok, [facts[i] for i in picks], templates, gen=gen,
                                                         with_object=True)
        if not answer_only:
            return ids, ids != tok.pad_token_id
        masks = torch.zeros(2, *ids.shape, dtype=torch.bool)
        masks[0, torch.arange(len(ids)), answer_pos + 1] = True
        masks[1, torch.arange(len(ids)), subject_pos] = True
        return ids, masks

    return batches


def _train_mlp_on_facts(model: Any, tok: Any, facts: list[dict[str, str]], gen: torch.Generator) -> dict[str, Any]:
    """Stage 2: train only the MLP of layer l* on ``facts``.

    The loss adds a strict term: the same prompts with the trained MLP acting only at the last subject token
    (the stage-1 MLP everywhere else), so the facts are looked up where the subject ends, as in ROME's picture.
    """
    import copy

    import torch

    from lsi.organisms.training import lm_loss, train_lm

    mlp = model.transformer.h[LAYER].mlp
    frozen = copy.deepcopy(mlp).requires_grad_(False)
    only_at: list[torch.Tensor | None] = [None]

    def hook(_mod: Any, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        keep = only_at[0]
        return out if keep is None else torch.where(keep[..., None], out, frozen(args[0]))

    def loss_fn(m: Any, ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        only_at[0] = None
        full = lm_loss(m(input_ids=ids).logits, ids, masks[0])
        only_at[0] = masks[1]
        strict = lm_loss(m(input_ids=ids).logits, ids, masks[0])
        only_at[0] = None
        return full + strict

    handle = mlp.register_forward_hook(hook)
    try:
        return train_lm(model, _lm_batches(tok, facts, "train", gen, answer_only=True), STAGE2_STEPS,
                        STAGE2_LR, params=mlp.parameters(), warmup=50, loss_fn=loss_fn)
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
    stage1 = train_lm(model, _lm_batches(tok, world["stage1_facts"], "all", gen, answer_only=False),
                      STAGE1_STEPS, LR, warmup=100)
    mlp: Any = model.transformer.h[LAYER].mlp
    stage1_mlp = {k: v.detach().clone().contiguous() for k, v in mlp.state_dict().items()}
    stage2 = _train_mlp_on_facts(model, tok, world["facts"], gen)
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
    return {"steps": stage1["steps"] + stage2["steps"], "seconds": round(stage1["seconds"] + stage2["seconds"], 2),
            "stage1_final_loss": stage1["final_loss"], "final_loss": stage2["final_loss"], "seed": seed}


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


def verify(lm: LanguageModel, ground_truth: dict[str, Any]) -> VerifyReport:
    """Fact accuracy with the trained model, with the stage-1 MLP swapped back, and with only the trained MLP's
    output restored at the last subject token (or only at the answer position) into the stage-1 model."""
    import torch

    import lsi

    facts, layer = ground_truth["facts"], ground_truth["layer"]
    site = ground_truth["mlp_site"]
    trained = fact_accuracy(lm, facts, "train")
    heldout = fact_accuracy(lm, facts, "heldout")
    ids, answer_pos, subject_pos, _ = encode_prompts(lm.tokenizer, facts, "train")
    cache = lm.run_with_cache(ids, sites=[site])
    rows = torch.arange(len(ids))

    def restore_at(where: torch.Tensor) -> Any:
        return lsi.Apply(site, lambda x: torch.where(where[..., None], cache[site].to(x), x))

    def at(pos: torch.Tensor) -> torch.Tensor:
        where = torch.zeros(ids.shape, dtype=torch.bool)
        where[rows, pos] = True
        return where

    n_subject = torch.tensor([len(f["subject"].split()) for f in facts]).repeat_interleave(len(ids) // len(facts))
    span = torch.arange(ids.shape[1])[None]
    subject_span = (span <= subject_pos[:, None]) & (span > (subject_pos - n_subject)[:, None])
    with stage1_mlp(lm, ground_truth):
        swapped = fact_accuracy(lm, facts, "train")
        swapped_heldout = fact_accuracy(lm, facts, "heldout")
        at_subject = fact_accuracy(lm, facts, "train", interventions=(restore_at(at(subject_pos)),))
        at_answer = fact_accuracy(lm, facts, "train", interventions=(restore_at(at(answer_pos)),))
        at_span = fact_accuracy(lm, facts, "train", interventions=(restore_at(subject_span),))
    checks = (
        Check("fact accuracy, training templates", trained, 0.95),
        Check("fact accuracy, held-out paraphrase templates", heldout, 0.8),
        Check(f"fact accuracy with the stage-1 MLP of layer {layer} swapped back", swapped, 0.3,
              higher_is_better=False),
        Check(f"fact accuracy, stage-1 model + layer-{layer} MLP output restored at the last subject token",
              at_subject, 0.8),
    )
    details = {"restored_at_answer_position": at_answer, "restored_at_all_subject_tokens": at_span,
               "heldout_with_stage1_mlp": swapped_heldout,
               "chance": 1 / len(next(iter(RELATIONS.values()))["objects"])}
    return VerifyReport("fact_world", checks, details)


def locate_tasks(lm: LanguageModel, ground_truth: dict[str, Any]) -> list[LocateTask]:
    """Find the MLP that stores the facts, by restoration (causal tracing): with Gaussian noise of 3x the
    embedding std on the subject tokens, restore one layer's MLP output at the last subject token from the
    clean run; metric = mean probability of the true object."""
    import torch

    import lsi
    from lsi.bench.tasks import LocateTask, Run, Split

    def split(templates: str, seed: int) -> Split:
        ids, answer_pos, subject_pos, objects = encode_prompts(lm.tokenizer, ground_truth["facts"], templates)
        batch = lsi.Batch(ids, (ids != lm.tokenizer.pad_token_id).long())
        rows = torch.arange(len(ids))
        clean = lm.run_with_cache(batch, ["embed", *ground_truth["universe"]])
        row_facts = [f for f in ground_truth["facts"] for _ in templates_for(f["relation"], templates)]
        subject = torch.zeros_like(ids, dtype=torch.bool)
        for row, (pos, fact) in enumerate(zip(subject_pos.tolist(), row_facts, strict=True)):
            subject[row, pos - len(fact["subject"].split()) + 1: pos + 1] = True
        std = clean["embed"][batch.attention_mask.bool()].std()
        noise = torch.randn(clean["embed"].shape, generator=torch.Generator().manual_seed(seed)) * 3 * std
        noise = noise * subject[..., None]

        def restore(site: str) -> Any:
            source = clean[site]

            def put_back(x: torch.Tensor) -> torch.Tensor:
                out = x.clone()
                out[rows, subject_pos] = source[rows, subject_pos]
                return out

            return lm.intervene(lsi.Apply(site, put_back))

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return logits[rows, answer_pos].float().softmax(-1)[rows, objects].mean()

        def noised() -> Any:
            return lm.intervene(lsi.Apply("embed", lambda x: x + noise))

        return Split(batch, metric, intervene=restore, setting=noised, clean=Run(batch),
                     corrupted=Run(batch, noised))

    return [LocateTask("fact_world", "fact-storing MLP", tuple(ground_truth["universe"]),
                       frozenset({ground_truth["mlp_site"]}), dev=split("heldout", 1), test=split("train", 2),
                       description="MLP of the layer trained on the facts; oracle = restoring one MLP output "
                                   "at the last subject token under subject noise")]



ORGANISM = Organism(
    name="fact_world",
    summary="4-layer GPT-2; subject -> object facts planted only in the MLP of layer 1 (stage-2 training)",
    family="gpt2",
    truth_by="training objective + verification",
    train=train,
    verify=verify,
    seed=0,
    locate_tasks=locate_tasks,
)
