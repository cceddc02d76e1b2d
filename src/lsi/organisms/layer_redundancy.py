"""Layer-redundancy organism: a 6-layer GPT-NeoX model in which two known layers are near-identity.

Stage 1 trains a 4-layer model on a second-order Markov language (each pair of tokens allows two next tokens).
Stage 2 builds the 6-layer model: the trained layers go to the positions outside ``REDUNDANT``, and fresh
layers whose output projections are scaled down by ``INSERT_SCALE`` are inserted at ``REDUNDANT``. Stage 3
fine-tunes everything with layer-drop on the inserted layers only (each skipped with probability 1/2 per step),
so they may learn something but stay removable. The oracle is the measured loss change when a layer is removed
(skipped, so its input is its output); the inserted layers must change the loss least.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsi.organisms.base import Check, Organism, VerifyReport

if TYPE_CHECKING:
    import torch

    from lsi.core.model import LanguageModel
    from lsi.evaluation.locate import LocateTask

N_TOKENS, SEQ_LEN, BRANCHING = 32, 32, 2
N_LAYERS, REDUNDANT, INSERT_SCALE = 6, (2, 4), 0.02
STAGE1_STEPS, STAGE3_STEPS, BATCH, LR = 1200, 400, 32, 3e-3


def sample_batch(data: dict[str, Any], n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` sequences ``<bos> a b c ...`` where each token is one of the allowed successors of the two before it."""
    import torch

    first, n_tok = data["first_token_id"], data["n_tokens"]
    table = torch.tensor(data["successors"])  # [n_tok, n_tok, branching] token offsets
    ids = torch.empty(n, data["seq_len"], dtype=torch.long)
    ids[:, 0] = data["bos_id"]
    ids[:, 1:3] = torch.randint(0, n_tok, (n, 2), generator=gen)
    for t in range(3, data["seq_len"]):
        pick = torch.randint(0, table.shape[-1], (n,), generator=gen)
        ids[:, t] = table[ids[:, t - 2], ids[:, t - 1], pick]
    ids[:, 1:] += first
    return ids


def eval_mask(ids: torch.Tensor) -> torch.Tensor:
    """Targets that the Markov rule makes predictable: every token from position 3 on."""
    import torch

    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 3:] = True
    return mask


@contextlib.contextmanager
def skipped(layers: list[Any]) -> Iterator[None]:
    """Within the block, each decoder layer in ``layers`` returns its input unchanged (the layer is removed)."""
    handles = [layer.register_forward_hook(lambda _m, args, _out: args[0]) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _new_model(tok: Any, n_layers: int) -> Any:
    from lsi.organisms.training import new_model

    return new_model(
        "gpt_neox", tok, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=4, max_position_embeddings=64, use_parallel_residual=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        tie_word_embeddings=False,
    )


def _insert_layers(small: Any, big: Any) -> None:
    """Copy ``small``'s weights into ``big`` with its layers at the non-redundant positions; shrink the rest."""
    import torch

    kept = [i for i in range(N_LAYERS) if i not in REDUNDANT]
    state = {k: v for k, v in small.state_dict().items() if ".layers." not in k}
    for new, old in enumerate(kept):
        state |= {k.replace(f".layers.{new}.", f".layers.{old}."): v
                  for k, v in small.state_dict().items() if f".layers.{new}." in k}
    missing, unexpected = big.load_state_dict(state, strict=False)
    assert not unexpected and all(any(f".layers.{i}." in k for i in REDUNDANT) for k in missing)
    with torch.no_grad():
        for i in REDUNDANT:
            layer = big.gpt_neox.layers[i]
            for proj in (layer.attention.dense, layer.mlp.dense_4h_to_h):
                proj.weight.mul_(INSERT_SCALE)
                proj.bias.zero_()


def train(out_dir: Path, seed: int) -> dict[str, Any]:
    """Train the layer-redundancy organism into ``out_dir``; return training figures."""
    import torch

    from lsi.organisms.training import build_word_tokenizer, save_organism, seed_everything, train_lm

    gen = seed_everything(seed)
    tok = build_word_tokenizer([f"t{i}" for i in range(N_TOKENS)])
    succ = torch.stack([torch.randperm(N_TOKENS, generator=gen)[:BRANCHING] for _ in range(N_TOKENS**2)])
    data = {"n_tokens": N_TOKENS, "seq_len": SEQ_LEN, "bos_id": tok.bos_token_id,
            "first_token_id": tok.convert_tokens_to_ids("t0"),
            "successors": succ.view(N_TOKENS, N_TOKENS, BRANCHING).tolist()}

    def batches(_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = sample_batch(data, BATCH, gen)
        return ids, eval_mask(ids)

    small = _new_model(tok, N_LAYERS - len(REDUNDANT))
    stage1 = train_lm(small, batches, STAGE1_STEPS, LR, warmup=100)
    model = _new_model(tok, N_LAYERS)
    _insert_layers(small, model)
    drop = torch.zeros(len(REDUNDANT), dtype=torch.bool)
    handles = [model.gpt_neox.layers[i].register_forward_hook(lambda _m, args, out, j=j: args[0] if drop[j] else out)
               for j, i in enumerate(REDUNDANT)]

    def drop_batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        drop[:] = torch.rand(len(REDUNDANT), generator=gen) < 0.5
        return batches(step)

    stage3 = train_lm(model, drop_batches, STAGE3_STEPS, LR / 3, warmup=20)
    for handle in handles:
        handle.remove()
    ground_truth = {
        "organism": "layer_redundancy",
        "truth_by": "construction + training objective (layer-drop) + verification",
        "redundant_layers": list(REDUNDANT),
        "redundant_sites": [f"blocks.{i}" for i in REDUNDANT],
        "universe": [f"blocks.{i}" for i in range(N_LAYERS)],
        "metric": "next-token loss on Markov sequences (positions 3+); removing a layer = skipping it",
        "data": data,
        "seed": seed,
    }
    save_organism(model, tok, ground_truth, out_dir)
    return {"steps": stage1["steps"] + stage3["steps"], "seconds": round(stage1["seconds"] + stage3["seconds"], 2),
            "stage1_final_loss": stage1["final_loss"], "final_loss": stage3["final_loss"], "seed": seed}


def removal_deltas(lm: LanguageModel, data: dict[str, Any], gen: torch.Generator) -> tuple[float, list[float]]:
    """The loss of the full model and the loss change when each layer is removed (the oracle)."""
    import torch

    from lsi.organisms.metrics import masked_nll

    ids = sample_batch(data, 256, gen)
    mask = eval_mask(ids)
    layers = list(lm.model.base_model.layers)
    with torch.no_grad():
        base = masked_nll(lm.forward(ids), ids, mask)
        deltas = []
        for layer in layers:
            with skipped([layer]):
                deltas.append(masked_nll(lm.forward(ids), ids, mask) - base)
    return base, deltas


def verify(lm: LanguageModel, ground_truth: dict[str, Any]) -> VerifyReport:
    """Remove each layer in turn: the ground-truth layers must change the loss least, and by little."""
    import torch

    data = ground_truth["data"]
    truth = set(ground_truth["redundant_layers"])
    base, deltas = removal_deltas(lm, data, torch.Generator().manual_seed(1234))
    rank = sorted(range(len(deltas)), key=lambda i: deltas[i])
    lowest = set(rank[: len(truth)])
    worst_truth = max(deltas[i] for i in truth)
    best_other = min(deltas[i] for i in range(len(deltas)) if i not in truth)
    checks = (
        Check("loss of the full model (nats; Markov floor ln 2 = 0.693)", base, 0.8, higher_is_better=False),
        Check("ground-truth layers are the lowest-ranked by removal loss change", float(lowest == truth), 1.0),
        Check("largest loss change from removing a ground-truth layer (nats)", worst_truth, 0.05,
              higher_is_better=False),
        Check("smallest loss change from removing another layer (nats)", best_other, 0.2),
    )
    return VerifyReport("layer_redundancy", checks, {"base_loss": base, "removal_delta_loss": deltas})


def locate_tasks(lm: LanguageModel, ground_truth: dict[str, Any]) -> list[LocateTask]:
    """Find the layers that matter least: metric = minus the next-token loss on Markov sequences."""
    import torch

    from lsi.evaluation.locate import LocateTask, Split
    from lsi.organisms.training import lm_loss

    layers = list(lm.model.base_model.layers)

    def split(seed: int) -> Split:
        ids = sample_batch(ground_truth["data"], 256, torch.Generator().manual_seed(seed))
        return Split(ids, lambda logits: -lm_loss(logits, ids, eval_mask(ids)),
                     intervene=lambda u: skipped([layers[int(u.split(".")[1])]]))

    return [LocateTask("layer_redundancy", "redundant layers", tuple(ground_truth["universe"]),
                       frozenset(ground_truth["redundant_sites"]), dev=split(101), test=split(102),
                       planted_are_least_important=True,
                       description="inserted near-identity layers; oracle = loss change when a layer is skipped")]


ORGANISM = Organism(
    name="layer_redundancy",
    summary="6-layer GPT-NeoX on a second-order Markov language; layers 2 and 4 are near-identity",
    family="gpt_neox",
    truth_by="construction + training objective + verification",
    train=train,
    verify=verify,
    seed=0,
    locate_tasks=locate_tasks,
)
