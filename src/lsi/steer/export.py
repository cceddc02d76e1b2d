"""Fold steering into weights and export a plain HF checkpoint that runs without ``lsi``.

Each leaf says how it folds (:meth:`~lsi.core.steering.Steering.folding`, a :class:`~lsi.core.folding.Folding`);
a leaf that cannot fold raises :class:`NotFoldableError` naming itself. What folds (exactly, up to float rounding):

* :class:`~lsi.core.weight_edit.WeightEdit` (rank-one edits, task vectors, merges, masked fine-tuning) -> its deltas
  added to the weights (first: applying also adds weight deltas before any hook runs);
* :class:`~lsi.core.interventions.Add` of one vector at all positions with ``scope="all"`` on a residual-stream
  site -> a bias on the module that writes just before it (:func:`lsi.core.folding.add_to_stream`). Where the
  projection has no bias, one is added only through the model config's own switch (``mlp_bias`` /
  ``attention_bias``, e.g. Llama), every other new bias zero, so plain ``transformers`` builds the same modules;
  families without such a switch (Mistral, Qwen2, Phi-3, ...) are refused;
* :class:`~lsi.core.interventions.Zero` / :class:`~lsi.core.interventions.Scale` of heads or neurons at every
  position -> the matching columns of the output / down projection (:func:`lsi.core.folding.scale_units`);
* :class:`~lsi.steer.heads.HeadShift` at all positions with ``scope="all"`` -> a bias ``W_O s`` on each shifted
  layer's attention output projection;
* :class:`~lsi.steer.directional.DirectionalAblation` with the default sites ->
  :func:`~lsi.steer.directional.orthogonalize`;
* :class:`~lsi.steer.pruning.DeleteLayers` -> a checkpoint without those layers (folded last; other steering
  inside a deleted layer is refused).

Composition folds additions first, then ablations; an addition that follows an ablation in the composition and
has a component along its direction is refused (the hooks let that component into the addition's own layer), and
so is a fold that reads projection weights another leaf rescales in the same layer (the order would matter).

:func:`export_hf` writes ``save_pretrained`` + tokenizer into a new directory, reloads it with plain
``AutoModelForCausalLM.from_pretrained`` and refuses the export unless its logits match the hooked model's.

Example:
    >>> import lsi, tempfile, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> out = export_hf(lm, lsi.Add("blocks.1.resid_pre", torch.ones(32)), tempfile.mkdtemp() + "/steered")
    >>> sorted(p.name for p in out.iterdir())[:2]
    ['config.json', 'generation_config.json']
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lsi.core.folding import HOOKS_FIX, Folding
from lsi.core.model_copy import copy_model
from lsi.core.steering import Steering
from lsi.errors import InputError, NotFoldableError
from lsi.steer.pruning import delete_layers

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

def foldings(lm: LanguageModel, steering: Steering) -> list[Folding]:
    """Each leaf's folding, in composition order, after refusing compositions whose folds would not equal the
    hooks (see the module docstring). Call it after ``steering.prepare(lm)`` has checked model, widths and
    strengths."""
    leaves = steering.leaves()
    plans = [leaf.folding(lm) for leaf in leaves]
    removed: list[torch.Tensor] = []
    for leaf, plan in zip(leaves, plans, strict=True):
        if plan.adds is not None:
            v = plan.adds
            if any(abs(float(v @ r)) > 1e-6 * float(v.norm()) for r in removed):
                raise NotFoldableError(
                    "additions before ablations, or additions orthogonal to the ablated directions",
                    f"{leaf!r} after an ablation, with a component along its direction",
                    "compose the addition first (add + ablation), or remove its component along the direction")
        if plan.removes is not None:
            removed.append(plan.removes)
    deleted = frozenset().union(*(p.deletes for p in plans))
    read = frozenset().union(*(p.reads for p in plans))
    for leaf, plan in zip(leaves, plans, strict=True):
        if plan.rewrites & read:
            raise NotFoldableError("projection weights either read by one leaf's fold or rescaled by another's, "
                                   "per layer", f"{leaf!r} rescales layers {sorted(plan.rewrites & read)}, which "
                                   "another leaf's fold reads (e.g. heads both shifted and scaled)", HOOKS_FIX)
        if plan.layers & deleted:
            raise NotFoldableError("steering outside the deleted layers", f"{leaf!r} in deleted layers "
                                   f"{sorted(plan.layers & deleted)}", HOOKS_FIX)
    return plans


def fold(lm: LanguageModel, steering: Steering) -> LanguageModel:
    """A new model (deep copy) with ``steering`` folded into its weights; ``lm`` is left as it is.

    Raises :class:`NotFoldableError` for what does not fold (see the module docstring).

    Example:
        >>> import lsi, torch
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
        >>> add = lsi.Add("blocks.1.resid_post", torch.ones(32), 0.5)
        >>> with lm.intervene(add):
        ...     hooked = lm.forward([[5, 6, 7]])
        >>> torch.allclose(fold(lm, add).forward([[5, 6, 7]]), hooked, atol=1e-5)
        True
    """
    _, deltas = steering.prepare(lm)  # checks model, widths and strengths; weight fingerprints hashed once
    plans = foldings(lm, steering)
    target = copy_model(lm)
    params = dict(target.model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta.to(device=params[name].device, dtype=params[name].dtype))
    for plan in sorted(plans, key=lambda p: p.stage):  # stable: composition order within a stage
        if plan.edit is not None:
            plan.edit(target)
    deleted = frozenset().union(*(p.deletes for p in plans))
    return delete_layers(target, deleted) if deleted else target


def _probe_ids(lm: LanguageModel) -> torch.Tensor:
    config = lm.model.config
    n_ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 16
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, lm.dims.vocab, (2, min(16, int(n_ctx))), generator=gen)


def export_hf(lm: LanguageModel, steering_or_model: Steering | LanguageModel, out_dir: str | Path, *,
              atol: float = 1e-4) -> Path:
    """Write a plain HF checkpoint (``save_pretrained`` + tokenizer) of ``lm`` with ``steering_or_model`` folded
    in, or of an already edited model (e.g. from :func:`~lsi.steer.directional.orthogonalize`), into the new
    directory ``out_dir``.

    The checkpoint is reloaded with plain ``transformers`` and must reproduce the reference logits (the hooked
    ``lm``, or the given model) on random token ids to ``atol``; otherwise nothing is written and
    :class:`NotFoldableError` says by how much it missed. ``lsi_export.json`` records what was folded.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("a new or empty output directory", f"{out} (not empty)", "choose another directory")
    ids = _probe_ids(lm)
    if isinstance(steering_or_model, Steering):
        folded, what = fold(lm, steering_or_model), [repr(leaf) for leaf in steering_or_model.leaves()]
        with steering_or_model.apply(lm):
            reference = lm.forward(ids)
    else:
        folded, what = steering_or_model, ["an edited model"]
        reference = folded.forward(ids)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        folded.model.save_pretrained(staging)
        if hasattr(folded.tokenizer, "save_pretrained"):
            folded.tokenizer.save_pretrained(staging)
        plain = AutoModelForCausalLM.from_pretrained(staging, dtype=folded.model.dtype).eval()
        with torch.no_grad():
            logits = plain(input_ids=ids.to(plain.device)).logits
        error = float((logits.float().cpu() - reference.float().cpu()).abs().max())
        if not error <= atol:
            raise NotFoldableError(f"the exported checkpoint to reproduce the steered logits to {atol:g}",
                                   f"max |Δlogit| = {error:.3g}", HOOKS_FIX)
        record = {"folded": what, "max_abs_logit_error": error, "checked_on": list(ids.shape)}
        (staging / "lsi_export.json").write_text(json.dumps(record, indent=1) + "\n")
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
