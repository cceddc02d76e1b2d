"""Induction organism: a 2-layer Llama-config model that copies repeated random segments in context.

Data: ``<bos> key filler...`` where the key picks a topic (a subset of the content tokens) that the filler is
drawn from, and a random segment of random period (4–12) at a random offset is repeated once. Predicting the
filler needs the key (a "key head"); predicting the second copy needs induction: a previous-token head in
layer 0 and induction heads in layer 1. A fixed period or offset would be solved positionally (GROUND_TRUTH.md).

Planting (training objective): stage 1 trains on pure copy data with every head ablated except the designated
previous-token head and the designated induction heads; stage 2 trains on the full mix with all heads on, plus
a sufficiency term: the copy loss with every non-designated head ablated. Verification re-derives the heads
from attention-pattern scores and group ablation.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsi.organisms.base import Check, Organism, VerifyReport

if TYPE_CHECKING:
    import torch

    from lsi.core.model import LanguageModel
    from lsi.evaluation.locate import LocateTask
    from lsi.organisms.training import HeadGate

N_KEYS, N_CONTENT, TOPIC_SIZE, SEQ_LEN, PERIODS = 8, 64, 16, 48, (4, 12)
N_HEADS, D_MODEL = 4, 64
PREV_HEADS, INDUCTION_HEADS = (1,), (1, 2)  # designated heads of layer 0 / layer 1
WARMUP_STEPS, STEPS, BATCH, LR = 700, 1500, 32, 3e-3
AUX_THRESHOLD = 0.1  # nats of copy loss a non-ground-truth head must cost alone to be listed as auxiliary


def head_site(layer: int, head: int) -> str:
    return f"blocks.{layer}.attn.head_out[{head}]"


def sample_batch(data: dict[str, Any], n: int, gen: torch.Generator, *, pure: bool = False) -> tuple[torch.Tensor, ...]:
    """``n`` training sequences: (ids [n, seq_len], lm_mask, copy_mask).

    ``lm_mask`` marks every predictable target (filler and the second copy after its first token);
    ``copy_mask`` marks only the second copy after its first token. ``pure`` draws filler uniformly from all
    content tokens (stage 1) instead of from the key's topic.
    """
    import torch

    first, n_content, seq_len = data["first_content_id"], data["n_content"], data["seq_len"]
    topics = torch.tensor(data["topics"])
    keys = torch.randint(0, data["n_keys"], (n,), generator=gen)
    if pure:
        ids = torch.randint(first, first + n_content, (n, seq_len), generator=gen)
    else:
        ids = topics[keys][torch.arange(n)[:, None], torch.randint(0, topics.shape[1], (n, seq_len), generator=gen)]
    ids[:, 0] = data["bos_id"]
    ids[:, 1] = data["first_key_id"] + keys
    lm_mask = torch.ones(n, seq_len, dtype=torch.bool)
    lm_mask[:, :2] = False
    copy_mask = torch.zeros(n, seq_len, dtype=torch.bool)
    lo, hi = data["periods"]
    for b in range(n):
        period = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        start = int(torch.randint(2, seq_len - 2 * period + 1, (1,), generator=gen))
        ids[b, start : start + period] = torch.randint(first, first + n_content, (period,), generator=gen)
        ids[b, start + period : start + 2 * period] = ids[b, start : start + period]
        copy_mask[b, start + period + 1 : start + 2 * period] = True
        lm_mask[b, start : start + period + 1] = False
    return ids, lm_mask, copy_mask


def repeated_random(data: dict[str, Any], n: int, period: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``<bos> key R R`` with R random content of length ``period``; returns (clean, corrupt) ids [n, 2+2p].

    ``corrupt`` replaces the second copy with fresh random tokens (the usual patching counterfactual).
    """
    import torch

    first, n_content = data["first_content_id"], data["n_content"]
    seg = torch.randint(first, first + n_content, (n, period), generator=gen)
    fresh = torch.randint(first, first + n_content, (n, period), generator=gen)
    keys = data["first_key_id"] + torch.randint(0, data["n_keys"], (n,), generator=gen)
    head = torch.stack([torch.full((n,), data["bos_id"]), keys], 1)
    return torch.cat([head, seg, seg], 1), torch.cat([head, seg, fresh], 1)


def _vocab(data: dict[str, Any]) -> list[str]:
    return [f"k{i}" for i in range(data["n_keys"])] + [f"w{i}" for i in range(data["n_content"])]


def train(out_dir: Path, seed: int) -> dict[str, Any]:
    """Train the induction organism into ``out_dir``; return training figures."""
    import torch

    from lsi.organisms.training import (
        HeadGate,
        build_word_tokenizer,
        lm_loss,
        new_model,
        save_organism,
        seed_everything,
        train_lm,
    )

    gen = seed_everything(seed)
    data: dict[str, Any] = {"n_keys": N_KEYS, "n_content": N_CONTENT, "seq_len": SEQ_LEN, "periods": list(PERIODS)}
    tok = build_word_tokenizer(_vocab(data))
    data |= {"bos_id": tok.bos_token_id, "first_key_id": tok.convert_tokens_to_ids("k0"),
             "first_content_id": tok.convert_tokens_to_ids("w0")}
    data["topics"] = [(torch.randperm(N_CONTENT, generator=gen)[:TOPIC_SIZE] + data["first_content_id"]).tolist()
                      for _ in range(N_KEYS)]
    model = new_model("llama", tok, hidden_size=D_MODEL, intermediate_size=2 * D_MODEL, num_hidden_layers=2,
                      num_attention_heads=N_HEADS, num_key_value_heads=N_HEADS, max_position_embeddings=128,
                      tie_word_embeddings=False)
    gate = HeadGate(model, N_HEADS)
    planted = {0: PREV_HEADS, 1: INDUCTION_HEADS}

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, lm_mask, copy_mask = sample_batch(data, BATCH, gen, pure=step < WARMUP_STEPS)
        return ids, torch.stack([copy_mask if step < WARMUP_STEPS else lm_mask, copy_mask])

    def loss_fn(m: Any, ids: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        gate.only(None)
        full = lm_loss(m(input_ids=ids).logits, ids, masks[0])
        gate.only(planted)
        sufficient = lm_loss(m(input_ids=ids).logits, ids, masks[1])
        gate.only(None)
        return full + sufficient

    figures = train_lm(model, batches, STEPS, LR, warmup=100, loss_fn=loss_fn)
    auxiliary = _auxiliary_heads(model, gate, data, planted, torch.Generator().manual_seed(seed + 1))
    gate.remove()
    ground_truth = {
        "organism": "induction",
        "truth_by": "training objective + verification",
        "previous_token_heads": [head_site(0, h) for h in PREV_HEADS],
        "induction_heads": [head_site(1, h) for h in INDUCTION_HEADS],
        "auxiliary_heads": auxiliary,
        "universe": [head_site(layer, h) for layer in range(2) for h in range(N_HEADS)],
        "metric": "next-token accuracy on the second copy of a repeated random segment (copy_mask)",
        "data_doc": "<bos> key filler...; filler drawn from topics[key]; one random segment (period in periods, "
                    "random start) repeated once; see lsi.organisms.induction.sample_batch / repeated_random",
        "data": data,
        "seed": seed,
    }
    save_organism(model, tok, ground_truth, out_dir)
    return figures | {"seed": seed}


def _auxiliary_heads(model: Any, gate: HeadGate, data: dict[str, Any], planted: dict[int, tuple[int, ...]],
                     gen: torch.Generator) -> list[str]:
    """Non-planted heads whose lone ablation raises the copy loss by more than :data:`AUX_THRESHOLD` nats."""
    import torch

    from lsi.organisms.training import lm_loss

    ids, _, copy_mask = sample_batch(data, 256, gen)
    found = []
    with torch.no_grad():
        base = lm_loss(model(input_ids=ids).logits, ids, copy_mask).item()
        for layer, gates in enumerate(gate.gates):
            for h in range(len(gates)):
                if h in planted[layer]:
                    continue
                gate.only(None)
                gates[h] = 0.0
                if lm_loss(model(input_ids=ids).logits, ids, copy_mask).item() - base > AUX_THRESHOLD:
                    found.append(head_site(layer, h))
    gate.only(None)
    return found


def attention_scores(lm: LanguageModel, data: dict[str, Any], gen: torch.Generator) -> dict[str, list[float]]:
    """Per-head previous-token score (layer 0) and induction score (layer 1) on ``<bos> key R R`` sequences.

    The previous-token score is the mean attention from each position to the one before it; the induction score
    is the mean attention from each token of the second copy to the token after its first occurrence; the key
    score (both layers) is the mean attention to the key token (the topic heads' job).
    """
    import torch

    period = data["periods"][1]
    clean, _ = repeated_random(data, 128, period, gen)
    cache = lm.run_with_cache(clean, sites=["blocks.0.attn.pattern", "blocks.1.attn.pattern"])
    q = torch.arange(2, clean.shape[1])
    prev = cache["blocks.0.attn.pattern"][:, :, q, q - 1].mean(dim=(0, 2))
    key = [cache[f"blocks.{i}.attn.pattern"][:, :, q, 1].mean(dim=(0, 2)).tolist() for i in range(2)]
    q = torch.arange(2 + period, clean.shape[1])
    ind = cache["blocks.1.attn.pattern"][:, :, q, q - period + 1].mean(dim=(0, 2))
    return {"previous_token": prev.tolist(), "induction": ind.tolist(), "key_by_layer": key}


def verify(lm: LanguageModel, ground_truth: dict[str, Any]) -> VerifyReport:
    """Re-derive the heads from attention-pattern scores and check them by group ablation of head outputs."""
    import torch

    import lsi
    from lsi.organisms.metrics import masked_accuracy, masked_nll

    data = ground_truth["data"]
    scores = attention_scores(lm, data, torch.Generator().manual_seed(1234))
    prev_gt = {int(s.split("[")[1][:-1]) for s in ground_truth["previous_token_heads"]}
    ind_gt = {int(s.split("[")[1][:-1]) for s in ground_truth["induction_heads"]}
    n_heads = len(scores["induction"])

    def margin(values: list[float], truth: set[int]) -> float:
        return min(values[h] for h in truth) - max((values[h] for h in range(n_heads) if h not in truth), default=0.0)

    ids, lm_mask, copy_mask = sample_batch(data, 256, torch.Generator().manual_seed(4321))
    filler = lm_mask & ~copy_mask
    truth = ground_truth["previous_token_heads"] + ground_truth["induction_heads"]
    others = [s for s in ground_truth["universe"] if s not in truth]

    def run(zeroed: list[str]) -> torch.Tensor:
        with torch.no_grad(), lm.intervene(*[lsi.Zero(s) for s in zeroed]):
            return lm.forward(ids)

    full, no_ind = run([]), run(ground_truth["induction_heads"])
    no_prev, no_others = run(ground_truth["previous_token_heads"]), run(others)
    runs = {"full": full, "no_induction": no_ind, "no_prev": no_prev, "no_others": no_others}
    acc = {name: masked_accuracy(logits, ids, copy_mask) for name, logits in runs.items()}
    base_nll = masked_nll(full, ids, copy_mask)
    single = {s: masked_nll(run([s]), ids, copy_mask) - base_nll for s in others}
    checks = (
        Check("copy accuracy, full model", acc["full"], 0.9),
        Check("copy accuracy, induction heads zeroed", acc["no_induction"], 0.25, higher_is_better=False),
        Check("copy accuracy, previous-token heads zeroed", acc["no_prev"], 0.35, higher_is_better=False),
        Check("copy accuracy, all other heads zeroed", acc["no_others"], 0.85),
        Check("filler loss change, induction heads zeroed (nats)",
              masked_nll(no_ind, ids, filler) - masked_nll(full, ids, filler), 0.1, higher_is_better=False),
        Check("previous-token score margin (layer 0, truth minus best other)",
              margin(scores["previous_token"], prev_gt), 0.3),
        Check("induction score margin (layer 1, truth minus best other)", margin(scores["induction"], ind_gt), 0.3),
    )
    details = {"attention_scores": scores, "copy_accuracy": acc,
               "single_head_copy_loss_increase": single,
               "auxiliary_heads_now": sorted(s for s, d in single.items() if d > AUX_THRESHOLD)}
    return VerifyReport("induction", checks, details)


def _without_first_copy(ids: torch.Tensor, copy_mask: torch.Tensor, data: dict[str, Any],
                        gen: torch.Generator) -> torch.Tensor:
    """The patching counterfactual: the first copy of each repeated segment replaced by fresh random tokens, so
    the second copy (same tokens, same positions) can no longer be predicted from context."""
    import torch

    corrupt = ids.clone()
    first, n_content = data["first_content_id"], data["n_content"]
    for row in range(len(ids)):
        copied = copy_mask[row].nonzero().flatten()
        period = len(copied) + 1
        start = int(copied[0]) - period - 1
        corrupt[row, start:start + period] = torch.randint(first, first + n_content, (period,), generator=gen)
    return corrupt


def locate_tasks(lm: LanguageModel, ground_truth: dict[str, Any]) -> list[LocateTask]:
    """Find the heads that copy repeated segments: metric = mean log-prob of the copied tokens."""
    import torch

    import lsi
    from lsi.core.runs import Run
    from lsi.evaluation.functional import next_token_logprob
    from lsi.evaluation.locate import LocateTask, Split

    def split(seed: int) -> Split:
        gen = torch.Generator().manual_seed(seed)
        ids, _, copy_mask = sample_batch(ground_truth["data"], 128, gen)

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return next_token_logprob(logits, ids)[copy_mask[:, 1:]].mean()

        return Split(ids, metric, intervene=lambda u: lm.intervene(lsi.Zero(u)), clean=Run(ids),
                     corrupted=Run(_without_first_copy(ids, copy_mask, ground_truth["data"], gen)))

    planted = ground_truth["previous_token_heads"] + ground_truth["induction_heads"]
    return [LocateTask("induction", "copying heads", tuple(ground_truth["universe"]), frozenset(planted),
                       dev=split(101), test=split(102),
                       description="previous-token and induction heads; oracle = zero-ablating one head")]


ORGANISM = Organism(
    name="induction",
    summary="2-layer Llama; previous-token head in layer 0 and induction heads in layer 1 copy repeated segments",
    family="llama",
    truth_by="training objective + verification",
    train=train,
    verify=verify,
    seed=0,
    locate_tasks=locate_tasks,
)
