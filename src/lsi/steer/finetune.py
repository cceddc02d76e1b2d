"""Parameter masks over located components, and masked fine-tuning ``θ' = θ + M ⊙ Δθ``.

:func:`parameter_mask` turns components (the labels locate methods give) into a :class:`ParameterMask`: one
boolean tensor per parameter, shaped like it. Component strings:

* ``blocks.{l}``: every parameter of the layer (its norms included); ``blocks.{l}.attn`` (or ``.attn.out``): the
  attention module and, where the family has one, the norm after it; ``blocks.{l}.mlp`` (or ``.mlp.out``): the
  MLP and a norm after it; ``blocks.{l}.attn.bias``: the attention output projection's bias;
* a head ``blocks.{l}.attn.head_out[h]`` or ``blocks.{l}.attn.z[h]``: its rows of W_Q, the rows of W_K and W_V
  of the key/value head it reads, its columns of W_O, and the q/k/v bias entries of those rows. Under
  grouped-query attention the key/value rows are shared with the other query heads of the group, so an edit of
  them changes those heads too. ``attn.q[h]`` / ``attn.k[h]`` / ``attn.v[h]`` select one projection's rows
  (``k`` and ``v`` index key/value heads);
* a neuron ``blocks.{l}.mlp.post[j]`` (or ``mlp.pre[j]``): row ``j`` of the up and gate projections with its
  bias entries, and column ``j`` of the down projection;
* ``embed`` (token and learned positional embeddings), ``unembed``; a parameter name of
  ``model.named_parameters()``, or ``name[i]``: row ``i`` of it in the ``[out, in]`` layout (the labels of
  :func:`lsi.locate.gradients.parameter_gradients` with ``per="row"``).

Layers may be patterns as in site names (``blocks.*.mlp.post[3]``). GPT-2's Conv1D weights are stored
``[in, out]``: rows and columns are taken in the ``[out, in]`` layout whatever the storage. Tied parameters
(a tied unembedding) are one parameter, named as ``model.named_parameters()`` names it.

:func:`masked_finetune` trains only the masked entries of a loss plus ``kl_weight`` times the KL divergence from
the original model on ``preserve`` inputs, then puts the original weights back and returns the change as a
:class:`~lsi.core.weight_edit.WeightEdit` (zero outside the mask).

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> mask = parameter_mask(lm, ["blocks.1.mlp.post[3]"])
    >>> mask.count()  # row 3 of W_in (32) and its bias entry (1), column 3 of W_out (32)
    65
    >>> def loss(lm):  # make token 7 likely after [5, 6]
    ...     return -lm.logits_with_grad([[5, 6]])[0, -1].log_softmax(-1)[7]
    >>> result = masked_finetune(lm, loss, mask, steps=20, lr=0.05)
    >>> result.moved <= mask.count(), result.losses[-1].target < result.losses[0].target
    (True, True)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from lsi.arch.dims import get_module, out_in
from lsi.core.inputs import Batch, Inputs
from lsi.core.sites import Site
from lsi.core.weight_edit import WeightEdit
from lsi.errors import InputError, ModelMismatchError, NonFiniteSteeringError, SiteError
from lsi.evaluation.functional import kl_divergence
from lsi.locate.result import By, LocateResult

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

LossFn = Callable[["LanguageModel"], torch.Tensor]
COMPONENT_FORMS = ("blocks.{l}", "blocks.{l}.attn", "blocks.{l}.mlp", "blocks.{l}.attn.head_out[h]",
                   "blocks.{l}.mlp.post[j]", "embed", "unembed", "a parameter name", "a parameter name[row]")
_BLOCK_RE = re.compile(r"^blocks\.(?P<layer>[^.\[\]]+)(?:\.(?P<part>attn|mlp|attn\.bias))?$")
_ROW_RE = re.compile(r"^(?P<name>.+)\[(?P<row>\d+)\]$")


# -- masks ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ParameterMask:
    """Which parameter entries may change: ``{parameter name: bool tensor shaped like it}`` (only parameters with
    at least one selected entry), and the ``targets`` it was built from."""

    masks: Mapping[str, torch.Tensor]
    targets: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return list(self.masks)

    def count(self) -> int:
        """How many parameter entries are selected."""
        return sum(int(m.sum()) for m in self.masks.values())

    def restrict(self, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``deltas`` of the masked parameters, zero outside the mask (other parameters are dropped)."""
        return {n: torch.where(self.masks[n].to(d.device), d, torch.zeros_like(d))
                for n, d in deltas.items() if n in self.masks}

    def check(self, lm: LanguageModel) -> None:
        """Refuse a model without these parameters (names and shapes)."""
        params = dict(lm.model.named_parameters())
        for name, m in self.masks.items():
            if name not in params or params[name].shape != m.shape:
                found = "no such parameter" if name not in params else f"shape {tuple(params[name].shape)}"
                raise ModelMismatchError(f"parameter {name} of shape {tuple(m.shape)} (as in the mask)",
                                         f"{found} in this {lm.family} model",
                                         "build the mask on this model: parameter_mask(lm, targets)")

    def __repr__(self) -> str:
        return f"ParameterMask({len(self.masks)} parameters, {self.count()} entries, targets={list(self.targets)})"


class _MaskBuilder:
    """Accumulates selected entries per parameter (tied parameters under their first name)."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.params = dict(lm.model.named_parameters(remove_duplicate=False))
        first: dict[int, str] = {}
        self.canonical = {name: first.setdefault(id(p), name) for name, p in self.params.items()}
        self.masks: dict[str, torch.Tensor] = {}

    def mask(self, name: str) -> torch.Tensor:
        key = self.canonical[name]
        if key not in self.masks:
            self.masks[key] = torch.zeros(self.params[name].shape, dtype=torch.bool)
        return self.masks[key]

    def module(self, path: str) -> None:
        """Every parameter of the module at ``path``."""
        for name, _ in get_module(self.lm.model, path).named_parameters(prefix=path, remove_duplicate=False):
            self.mask(name).fill_(True)

    def _linear(self, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight mask in ``[out, in]`` layout (a view) and the bias mask, of the linear module at ``path``."""
        module = get_module(self.lm.model, path)
        weight = out_in(self.mask(f"{path}.weight"), module)
        bias = self.mask(f"{path}.bias") if getattr(module, "bias", None) is not None else None
        return weight, bias

    def rows(self, path: str, rows: list[int]) -> None:
        """Output rows of a linear module and their bias entries."""
        weight, bias = self._linear(path)
        weight[rows] = True
        if bias is not None:
            bias[rows] = True

    def columns(self, path: str, columns: list[int]) -> None:
        """Input columns of a linear module."""
        self._linear(path)[0][:, columns] = True

    def row(self, name: str, row: int) -> None:
        """Row ``row`` of a parameter in ``[out, in]`` layout (an entry of a 1-d parameter)."""
        view = out_in(self.mask(name), get_module(self.lm.model, name.rpartition(".")[0]))
        if not 0 <= row < view.shape[0]:
            raise InputError(f"a row in [0, {view.shape[0] - 1}] of {name}", str(row), "check the label")
        view[row] = True

    def result(self, targets: Sequence[str]) -> ParameterMask:
        return ParameterMask({n: m for n, m in self.masks.items() if bool(m.any())}, tuple(targets))


def _head_rows(lm: LanguageModel, which: int, heads: Iterable[int]) -> tuple[str, list[int]]:
    """The projection (per-layer path) holding q (which=0), k (1) or v (2) and the output rows of ``heads`` (query
    heads for q, key/value heads for k and v) in it, for separate, fused-concatenated and fused-per-head layouts
    (the layouts :class:`lsi.core.weights.Weights` reads)."""
    spec, dims = lm.spec, lm.dims
    dh = dims.d_head
    own = (spec.q_proj, spec.k_proj, spec.v_proj)[which]
    if own is not None:
        path, start, stride = own, 0, dh
    elif spec.qkv_layout == "per_head":  # [n_heads, 3, d_head] rows (GPT-NeoX)
        assert spec.qkv_proj is not None
        path, start, stride = spec.qkv_proj, which * dh, 3 * dh
    else:  # [q heads; k heads; v heads] rows (GPT-2, Phi-3)
        assert spec.qkv_proj is not None
        path, stride = spec.qkv_proj, dh
        start = (0, dims.n_heads * dh, (dims.n_heads + dims.n_kv_heads) * dh)[which]
    return path, [start + h * stride + i for h in heads for i in range(dh)]


def _add_heads(builder: _MaskBuilder, layer: int, kind: str, heads: list[int]) -> None:
    lm = builder.lm
    at = lm.spec.layer_path
    if kind in ("attn.q", "attn.k", "attn.v"):
        path, rows = _head_rows(lm, "qkv".index(kind[-1]), heads)
        builder.rows(at(layer, path), rows)
        return
    kv_heads = sorted({lm.weights.kv_head(h) for h in heads})
    for which, chosen in ((0, heads), (1, kv_heads), (2, kv_heads)):
        path, rows = _head_rows(lm, which, chosen)
        builder.rows(at(layer, path), rows)
    dh = lm.dims.d_head
    builder.columns(at(layer, lm.spec.o_proj), [h * dh + i for h in heads for i in range(dh)])


def _add_neurons(builder: _MaskBuilder, layer: int, units: list[int]) -> None:
    spec, d_mlp = builder.lm.spec, builder.lm.dims.d_mlp
    at = spec.layer_path
    if spec.mlp_gate_up is not None:  # fused [gate; up] rows
        builder.rows(at(layer, spec.mlp_gate_up), [*units, *(d_mlp + j for j in units)])
    else:
        for path in (spec.mlp_in, spec.mlp_gate):
            if path is not None:
                builder.rows(at(layer, path), units)
    builder.columns(at(layer, spec.mlp_down), units)


def _add_part(builder: _MaskBuilder, layer: int, part: str | None) -> None:
    spec = builder.lm.spec
    at = spec.layer_path
    if part is None:
        builder.module(at(layer))
    elif part == "attn.bias":
        bias = f"{at(layer, spec.o_proj)}.bias"
        if bias not in builder.params:
            raise InputError(f"a bias on {spec.o_proj}", f"none in this {builder.lm.family} model",
                             f"select blocks.{layer}.attn instead")
        builder.mask(bias).fill_(True)
    else:
        own, after = (spec.attn, spec.attn_out) if part == "attn" else (spec.mlp_down.rsplit(".", 1)[0], spec.mlp_out)
        builder.module(at(layer, own))
        builder.module(at(layer, after))


def _add_site(builder: _MaskBuilder, label: str) -> None:
    lm = builder.lm
    try:
        site = Site.parse(label)
    except SiteError:
        raise InputError(f"a component ({', '.join(COMPONENT_FORMS)})", repr(label),
                         "use a label of a locate result or a parameter name of model.named_parameters()") from None
    lm.resolve_sites(site)  # layer and index ranges
    if site.kind == "embed":
        builder.module(lm.spec.embed)
        if lm.spec.pos_embed is not None:
            builder.module(lm.spec.pos_embed)
        return
    size = {"attn.head_out": lm.dims.n_heads, "attn.z": lm.dims.n_heads, "attn.q": lm.dims.n_heads,
            "attn.k": lm.dims.n_kv_heads, "attn.v": lm.dims.n_kv_heads, "mlp.post": lm.dims.d_mlp,
            "mlp.pre": lm.dims.d_mlp}
    parts = {"attn.out": "attn", "mlp.out": "mlp"}
    if site.kind not in size and site.kind not in parts:
        raise InputError(f"a component with parameters ({', '.join(COMPONENT_FORMS)})",
                         f"{label} (a {site.info.definition!r} value, written by no parameters of its own)",
                         "select the modules that write it, e.g. blocks.{l}.attn or blocks.{l}.mlp")
    indices = list(site.indices() or range(size.get(site.kind, 0)))
    for layer in site.layers(lm.dims.n_layers):
        if site.kind in parts:
            _add_part(builder, layer, parts[site.kind])
        elif site.kind.startswith("mlp."):
            _add_neurons(builder, layer, indices)
        else:
            _add_heads(builder, layer, site.kind, indices)


def _add_component(builder: _MaskBuilder, label: str) -> None:
    lm = builder.lm
    if label in builder.params:
        builder.mask(label).fill_(True)
    elif (row := _ROW_RE.match(label)) and row["name"] in builder.params:
        builder.row(row["name"], int(row["row"]))
    elif label == "unembed":
        builder.module(lm.spec.unembed)
    elif block := _BLOCK_RE.match(label):
        for layer in Site("resid_pre", block["layer"]).layers(lm.dims.n_layers):  # layer patterns as in sites
            _add_part(builder, layer, block["part"])
    else:
        _add_site(builder, label)


def _result_labels(result: LocateResult, k: int | None, by: By) -> list[str]:
    """Component labels of the top-``k`` cells of a locate result (position columns dropped)."""
    if k is None:
        raise InputError("k= with a LocateResult target", "none", "e.g. parameter_mask(lm, result, k=5)")
    axes = [name for name, _ in result.axes]
    cells = [label.split("@") for label in result.select(k=k, by=by)]
    template = result.settings.get("site")
    if axes == ["layer", "head"]:
        labels = [f"blocks.{layer}.attn.head_out[{head}]" for layer, head in cells]
    elif axes[0] == "layer" and isinstance(template, str) and "{l}" in template:  # causal tracing
        labels = [template.format(l=cell[0]) for cell in cells]
    elif len(axes) == 1 or axes[1:] == ["position"]:
        labels = [cell[0] for cell in cells]
    else:
        raise InputError("a locate result over components (one axis, component × position, or layer × head)",
                         f"axes {axes}", "pass the chosen component labels as a list of strings")
    return list(dict.fromkeys(labels))


def parameter_mask(lm: LanguageModel, targets: str | Sequence[str] | LocateResult, *, k: int | None = None,
                   by: By = "signed") -> ParameterMask:
    """The parameter entries of ``targets``: component strings (see the module docstring), or the top-``k``
    objects of a :class:`LocateResult` (ranked ``by`` signed score or ``"abs"``).

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> parameter_mask(lm, "blocks.0.attn.head_out[1]").count()  # q, k, v rows 3 x 8 x 32; O columns 32 x 8
        1024
    """
    labels = (_result_labels(targets, k, by) if isinstance(targets, LocateResult)
              else [targets] if isinstance(targets, str) else list(targets))
    if not labels:
        raise InputError("at least one target component", "none", "pass component strings or a locate result")
    builder = _MaskBuilder(lm)
    for label in labels:
        _add_component(builder, label)
    return builder.result(labels)


# -- masked fine-tuning ---------------------------------------------------------------------------------------------
class StepLoss(NamedTuple):
    """Loss of one training step: ``total = target + kl_weight * preserve``."""

    total: float
    target: float
    preserve: float


@dataclass(frozen=True)
class FinetuneResult:
    """The trained change as a weight edit, and the loss of every step."""

    edit: WeightEdit
    losses: list[StepLoss]

    @property
    def moved(self) -> int:
        """Parameter entries the edit changes."""
        return self.edit.moved()


def _preserve_kl(lm: LanguageModel, batch: Batch | None, reference: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens of KL(original ‖ current) of the next-token distributions (0 without inputs)."""
    if batch is None or reference is None:
        return torch.zeros(())
    kl = kl_divergence(reference, lm.logits_with_grad(batch).float().log_softmax(-1))
    real = batch.attention_mask.to(kl.dtype)
    return (kl * real).sum() / real.sum()


def _check_loss(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.requires_grad:
        found = (f"a tensor of shape {tuple(value.shape)}, requires_grad={value.requires_grad}"
                 if isinstance(value, torch.Tensor) else type(value).__name__)
        raise InputError("loss_fn(lm) returning a scalar tensor with gradients", found,
                         "compute it from lm.logits_with_grad(inputs) (lm.forward runs without gradients)")
    if not bool(torch.isfinite(value.detach())):
        raise NonFiniteSteeringError("a finite training loss", str(float(value.detach())), "lower lr")
    return value.reshape(())


def _check_settings(steps: int, lr: float, kl_weight: float, weight_decay: float) -> None:
    if steps < 1:
        raise InputError("steps >= 1", str(steps), "e.g. steps=50")
    if not (math.isfinite(lr) and lr > 0):
        raise InputError("a finite lr > 0", repr(lr), "e.g. lr=1e-3")
    for name, value in (("kl_weight", kl_weight), ("weight_decay", weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"a finite {name} >= 0", repr(value), f"e.g. {name}=0.0")


def masked_finetune(lm: LanguageModel, loss_fn: LossFn, mask: ParameterMask | None, *, steps: int, lr: float,
                    preserve: Inputs | Batch | None = None, kl_weight: float = 1.0, weight_decay: float = 0.0,
                    seed: int = 0) -> FinetuneResult:
    """Fine-tune only the entries of ``mask`` (``None``: every parameter), then restore ``lm`` bit-exactly and
    return the change ``M ⊙ Δθ`` as a :class:`WeightEdit` (label ``"masked_finetune"``, or ``"finetune"``).

    Each step minimizes ``loss_fn(lm) + kl_weight * KL(original ‖ current)``, the KL averaged over the real
    tokens of ``preserve`` (original log-probabilities computed once, before training), with Adam (AdamW with
    ``weight_decay`` > 0). ``loss_fn`` must compute its loss from ``lm.logits_with_grad(...)``. Gradients
    outside the mask are zeroed before each update and the entries outside it are reset after it, so neither
    Adam's moments nor weight decay can move them. The model is restored (weights, ``requires_grad`` flags,
    gradients) even when training raises. ``seed`` seeds torch's random generator for the run (for a
    ``loss_fn`` that samples); the caller's generator state is kept.
    """
    _check_settings(steps, lr, kl_weight, weight_decay)
    if mask is not None:
        mask.check(lm)
    params = dict(lm.model.named_parameters())
    trained = {n: p for n, p in params.items() if mask is None or n in mask.masks}
    saved = {n: p.detach().clone() for n, p in trained.items()}
    flags = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    batch = None if preserve is None else lm.to_batch(preserve)
    reference = None if batch is None else lm.forward(batch).float().log_softmax(-1)
    try:
        for n, p in params.items():
            p.requires_grad_(n in trained)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            losses = _train(lm, loss_fn, trained, mask, saved, steps=steps, lr=lr, weight_decay=weight_decay,
                            preserve=(batch, reference), kl_weight=kl_weight)
        deltas = {n: p.detach().float() - saved[n].float() for n, p in trained.items()}  # 0 outside the mask (_train)
    finally:
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(saved[n])
        for n, p in params.items():
            p.requires_grad_(flags[n][0])
            p.grad = flags[n][1]
    entries = mask.count() if mask is not None else sum(p.numel() for p in trained.values())
    info = {"steps": steps, "lr": lr, "kl_weight": kl_weight, "weight_decay": weight_decay, "seed": seed,
            "targets": list(mask.targets) if mask is not None else "all", "mask_entries": entries,
            "final_loss": losses[-1]._asdict()}
    label = "finetune" if mask is None else "masked_finetune"
    return FinetuneResult(WeightEdit.of(lm, deltas, label=label, info=info), losses)


def _train(lm: LanguageModel, loss_fn: LossFn, trained: dict[str, torch.nn.Parameter], mask: ParameterMask | None,
           saved: dict[str, torch.Tensor], *, steps: int, lr: float, weight_decay: float,
           preserve: tuple[Batch | None, torch.Tensor | None], kl_weight: float) -> list[StepLoss]:
    """The training loop of :func:`masked_finetune` (on the live parameters ``trained``)."""
    where = {} if mask is None else {n: mask.masks[n].to(p.device) for n, p in trained.items()}
    optimizer = torch.optim.AdamW(list(trained.values()), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        target = _check_loss(loss_fn(lm))
        kl = _preserve_kl(lm, *preserve).to(target.device)
        total = target + kl_weight * kl
        total.backward()
        for n, m in where.items():
            grad = trained[n].grad
            if grad is not None:
                grad.mul_(m)
        optimizer.step()
        with torch.no_grad():  # what the optimizer moved outside the mask (weight decay) goes back
            for n, m in where.items():
                trained[n].copy_(torch.where(m, trained[n], saved[n]))
        losses.append(StepLoss(float(total.detach()), float(target.detach()), float(kl.detach())))
    return losses
