"""Fold steering into weights and export a plain HF checkpoint that runs without ``lsi``.

What folds (exactly, up to float rounding):

* :class:`~lsi.steer.base.WeightEdit` (rank-one edits, task vectors, merges, masked fine-tuning) -> its deltas
  added to the weights (first: ``apply`` also adds weight deltas before any hook runs);
* :class:`DirectionalAblation` with the default sites -> :func:`orthogonalize`;
* an :class:`~lsi.steer.amplitude.Amplitude` zeroing or scaling heads or neurons at every position -> the
  matching columns of the output / down projection (:func:`lsi.steer.pruning.scale_units`);
* :class:`~lsi.steer.pruning.DeleteLayers` -> a checkpoint without those layers (folded last; other steering
  inside a deleted layer is refused);
* :class:`AddVector` at all positions with ``scope="all"`` on a residual-stream site -> a bias on the module that
  writes just before it: ``blocks.{l}.resid_pre`` (l > 0) and ``resid_post`` / ``mlp.out`` -> the MLP down
  projection's bias of the layer that wrote last; ``resid_mid`` / ``attn.out`` -> the attention output
  projection's bias; ``embed`` / ``blocks.0.resid_pre`` -> every row of the token embedding (a tied unembedding
  is untied first). Where the projection has no bias, one is added only through the model config's own switch
  (``mlp_bias`` / ``attention_bias``, e.g. Llama), every other new bias zero, so plain ``transformers`` builds the
  same modules; families without such a switch (Mistral, Qwen2, Phi-3, ...) are refused.
* :class:`~lsi.steer.heads.HeadShift` at all positions with ``scope="all"`` -> a bias on each shifted layer's
  attention output projection: ``W_O s`` for the layer's concatenated head shifts ``s`` (the same bias rule;
  exact also under a post-attention norm, which acts after the projection).

Composition folds additions first, then ablations; an addition that follows an ablation in the composition and
has a component along its direction is refused (the hooks let that component into the addition's own layer).
Anything else (other positions or scopes, other sites, custom ablation sites) raises :class:`NotFoldableError`.

:func:`export_hf` writes ``save_pretrained`` + tokenizer into a new directory, reloads it with plain
``AutoModelForCausalLM.from_pretrained`` and refuses the export unless its logits match the hooked model's.

Example:
    >>> import lsi, tempfile, torch
    >>> from lsi.testing import tiny_model
    >>> from lsi.steer.ablation import AddVector
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> out = export_hf(lm, AddVector("blocks.1.resid_pre", torch.ones(32)), tempfile.mkdtemp() + "/steered")
    >>> sorted(p.name for p in out.iterdir())[:2]
    ['config.json', 'generation_config.json']
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lsi.arch.dims import get_module
from lsi.core.positions import All
from lsi.core.sites import Site
from lsi.errors import InputError, NotFoldableError
from lsi.steer.ablation import (
    DEFAULT_ABLATION_SITES,
    AddVector,
    DirectionalAblation,
    Writer,
    copy_model,
    orthogonalize,
    residual_writers,
    untie_embeddings,
)
from lsi.steer.amplitude import Amplitude
from lsi.steer.base import Steering, WeightEdit
from lsi.steer.heads import HeadShift
from lsi.steer.pruning import DeleteLayers, check_unit_amplitude, delete_layers, scale_units

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

BIAS_SWITCHES = ("mlp_bias", "attention_bias")  # HF config switches that give projections a bias
_HOOKS_FIX = "apply it with hooks (with steer.apply(lm): ...) instead of exporting it"


def _check_foldable(lm: LanguageModel, steering: Steering) -> None:
    steering.interventions(lm)  # model, widths and strengths
    ablated: list[torch.Tensor] = []
    for leaf in steering.leaves():
        if isinstance(leaf, DirectionalAblation):
            if set(lm.resolve_sites(list(leaf.sites))) != set(lm.resolve_sites(list(DEFAULT_ABLATION_SITES))):
                raise NotFoldableError(f"an ablation at the default sites {list(DEFAULT_ABLATION_SITES)}",
                                       f"sites {list(leaf.sites)}", _HOOKS_FIX)
            ablated.append(leaf.unit)
        elif isinstance(leaf, (AddVector, HeadShift)):
            if not isinstance(leaf.positions, All) or leaf.scope != "all":
                raise NotFoldableError("an addition at every position of prompt and generated tokens",
                                       f"positions={leaf.positions}, scope={leaf.scope} (position-dependent)",
                                       _HOOKS_FIX)
            if isinstance(leaf, HeadShift):  # acts inside attention, before any ablation of its output
                continue
            for s in lm.resolve_sites(leaf.site):
                _writer_name(s)
            v = leaf.vector.double()
            if any(abs(float(v @ r)) > 1e-6 * float(v.norm()) for r in ablated):
                raise NotFoldableError(
                    "additions before ablations, or additions orthogonal to the ablated directions",
                    f"{leaf!r} after an ablation, with a component along its direction",
                    "compose the addition first (add + ablation), or remove its component along the direction")
        elif isinstance(leaf, Amplitude):
            check_unit_amplitude(lm, leaf)
        elif not isinstance(leaf, (WeightEdit, DeleteLayers)):
            raise NotFoldableError("a DirectionalAblation, an AddVector, a HeadShift, an Amplitude on heads or "
                                   "neurons, DeleteLayers or a WeightEdit", type(leaf).__name__, _HOOKS_FIX)
    _check_layers_kept(lm, steering)


def _check_layers_kept(lm: LanguageModel, steering: Steering) -> None:
    """Refuse a composition that adds or shifts inside a layer it also deletes (the hooks keep that change, a
    deleted layer cannot), or that both shifts and scales heads of one layer (the order would matter)."""
    leaves = steering.leaves()
    deleted = {layer for leaf in leaves if isinstance(leaf, DeleteLayers) for layer in leaf.layers}
    shifted = {layer for leaf in leaves if isinstance(leaf, HeadShift) for layer in leaf.layer_shifts(lm)}
    for leaf in leaves:
        layers: set[int]
        if isinstance(leaf, AddVector):  # folded into the bias of the layer that writes just before its site
            writers = {_writer_name(s) for s in lm.resolve_sites(leaf.site)} - {"embed"}
            layers = {int(name.split(".")[1]) for name in writers}
        elif isinstance(leaf, Amplitude):
            layers = {s.layer for s in lm.resolve_sites(list(leaf.sites)) if isinstance(s.layer, int)}
            if layers & shifted:
                raise NotFoldableError("heads either shifted (HeadShift) or scaled (Amplitude) in one layer",
                                       f"both in layers {sorted(layers & shifted)}", _HOOKS_FIX)
        elif isinstance(leaf, HeadShift):
            layers = set(leaf.layer_shifts(lm))
        else:
            continue
        if layers & deleted:
            raise NotFoldableError("steering outside the deleted layers", f"{leaf!r} in deleted layers "
                                   f"{sorted(layers & deleted)}", _HOOKS_FIX)


def _writer_name(site: Site) -> str:
    """The residual writer whose output a constant added at a concrete ``site`` can be folded into."""
    kind, layer = site.kind, site.layer
    if kind == "embed" or (kind == "resid_pre" and layer == 0):
        return "embed"
    if isinstance(layer, int) and kind == "resid_pre":
        return f"blocks.{layer - 1}.mlp.out"
    if isinstance(layer, int) and kind in ("resid_post", "mlp.out"):
        return f"blocks.{layer}.mlp.out"
    if isinstance(layer, int) and kind in ("resid_mid", "attn.out"):
        return f"blocks.{layer}.attn.out"
    raise NotFoldableError("an addition at a residual-stream site (embed, resid_pre/mid/post, attn.out, mlp.out)",
                           f"{site} (its value is transformed before it reaches the stream)", _HOOKS_FIX)


def _bias(lm: LanguageModel, writer: Writer) -> torch.Tensor:
    """The writer's bias, adding zero biases through a config switch when it has none."""
    if writer.bias is not None:
        return writer.bias
    config = lm.model.config
    for switch in BIAS_SWITCHES:
        if getattr(config, switch, None) is not False:
            continue
        shadow_config = copy.deepcopy(config)
        setattr(shadow_config, switch, True)
        with torch.device("meta"):
            shadow = type(lm.model)(shadow_config)
        added = sorted(set(shadow.state_dict()) - set(lm.model.state_dict()))
        modules = [get_module(lm.model, name.rsplit(".", 1)[0]) for name in added]
        if f"{writer.path}.bias" not in added or not all(
                n.endswith(".bias") and isinstance(m, nn.Linear) for n, m in zip(added, modules, strict=True)):
            continue
        for m in modules:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
        setattr(config, switch, True)
        assert writer.bias is not None
        return writer.bias
    raise NotFoldableError(f"a bias on {writer.path} (or a config switch {list(BIAS_SWITCHES)} that adds one)",
                           f"none in {lm.family}", "plain transformers would not load an added bias; " + _HOOKS_FIX)


def _fold_addition(lm: LanguageModel, add: AddVector) -> None:
    writers = {w.name: w for w in residual_writers(lm)}
    delta = add.alpha * add.vector.double()
    for s in lm.resolve_sites(add.site):
        name = _writer_name(s)
        if name == "embed":
            untie_embeddings(lm)
            target = writers[name].weight  # [d_model, vocab]: every token's row gets delta
            shift = delta[:, None]
        else:
            target, shift = _bias(lm, writers[name]), delta
        with torch.no_grad():
            target.copy_((target.double() + shift.to(target.device)).to(target.dtype))


def _fold_head_shift(lm: LanguageModel, shift: HeadShift) -> None:
    for layer, z_shift in shift.layer_shifts(lm).items():
        path = lm.spec.layer_path(layer, lm.spec.o_proj)
        writer = Writer(f"blocks.{layer}.attn.out", path, get_module(lm.model, path), lm.spec.conv1d)
        bias = _bias(lm, writer)
        delta = writer.weight.detach().double() @ (shift.alpha * z_shift.double().flatten()).to(bias.device)
        with torch.no_grad():
            bias.copy_((bias.double() + delta).to(bias.dtype))


def fold(lm: LanguageModel, steering: Steering) -> LanguageModel:
    """A new model (deep copy) with ``steering`` folded into its weights; ``lm`` is left as it is.

    Raises :class:`NotFoldableError` for what does not fold (see the module docstring).

    Example:
        >>> import lsi, torch
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
        >>> add = AddVector("blocks.1.resid_post", torch.ones(32), 0.5)
        >>> with add.apply(lm):
        ...     hooked = lm.forward([[5, 6, 7]])
        >>> torch.allclose(fold(lm, add).forward([[5, 6, 7]]), hooked, atol=1e-5)
        True
    """
    _check_foldable(lm, steering)
    deltas = steering.weight_deltas(lm)
    target = copy_model(lm)
    params = dict(target.model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta.to(device=params[name].device, dtype=params[name].dtype))
    leaves = steering.leaves()
    for leaf in leaves:
        if isinstance(leaf, AddVector):
            _fold_addition(target, leaf)
        elif isinstance(leaf, HeadShift):
            _fold_head_shift(target, leaf)
        elif isinstance(leaf, Amplitude):
            scale_units(target, leaf)
    for leaf in leaves:
        if isinstance(leaf, DirectionalAblation):
            orthogonalize(target, leaf.direction, copy=False)
    deleted = {layer for leaf in leaves if isinstance(leaf, DeleteLayers) for layer in leaf.layers}
    return delete_layers(target, deleted) if deleted else target


def _probe_ids(lm: LanguageModel) -> torch.Tensor:
    config = lm.model.config
    n_ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 16
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, lm.dims.vocab, (2, min(16, int(n_ctx))), generator=gen)


def export_hf(lm: LanguageModel, steering_or_model: Steering | LanguageModel, out_dir: str | Path, *,
              atol: float = 1e-4) -> Path:
    """Write a plain HF checkpoint (``save_pretrained`` + tokenizer) of ``lm`` with ``steering_or_model`` folded
    in, or of an already edited model (e.g. from :func:`orthogonalize`), into the new directory ``out_dir``.

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
                                   f"max |Δlogit| = {error:.3g}", _HOOKS_FIX)
        record = {"folded": what, "max_abs_logit_error": error, "checked_on": list(ids.shape)}
        (staging / "lsi_export.json").write_text(json.dumps(record, indent=1) + "\n")
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
