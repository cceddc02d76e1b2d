"""Vocabulary projection: the logit lens, direct logit attribution and the top tokens of a direction.

The logit lens reads each layer's residual stream through the model's own final norm and unembedding
(``lm.unembed``: final norm applied, then ``W_U``, then any final soft-capping). Row 0 is the embedding
(``blocks.0.resid_pre``); row ``i + 1`` is ``blocks.i.resid_post``; the last row equals the model's logits.

Direct logit attribution (DLA) splits a logit into the writes of every component to the final residual stream:
``embed``, each head ``blocks.{l}.attn.head_out[h]`` (plus the output projection's bias, ``blocks.{l}.attn.bias``,
where the family has one) and each MLP ``blocks.{l}.mlp.out``. With the final norm's scale ``s`` taken from the
run itself, the norm is affine in each write: a write ``c`` contributes ``(w ⊙ C c) / s · u`` where ``w`` is the
norm's weight, ``C`` the centring of LayerNorm (identity for RMSNorm) and ``u`` the unembedding direction (a
column of ``W_U``, or a difference of two). The contributions plus the constant (norm bias and unembedding bias)
sum to the logit exactly, before any final soft-capping.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> lens = logit_lens(lm, [[5, 6, 7]])
    >>> tuple(lens.logits.shape)  # [n_layers + 1, batch, positions, vocab]
    (3, 1, 1, 97)
    >>> dla = direct_logit_attribution(lm, [[5, 6, 7]], 8)
    >>> dla.labels[:2], abs(float(dla.scores.sum()) + dla.settings["constant"] - dla.settings["logit"]) < 1e-4
    (['embed', 'blocks.0.attn.head_out[0]'], True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lsi.arch.dims import get_module
from lsi.core.positions import PositionSpec
from lsi.core.sites import Site
from lsi.errors import IndexOutOfRangeError, InputError, ShapeMismatchError, SiteUnavailableError
from lsi.locate.metrics import describe_tokens
from lsi.locate.result import LocateResult

if TYPE_CHECKING:
    from lsi.core.cache import ActivationCache
    from lsi.core.inputs import Batch, Inputs
    from lsi.core.model import LanguageModel

TokenIds = int | Sequence[int] | torch.Tensor  # one id, one per row, or one per (row, position)
Direction = TokenIds | tuple[TokenIds, TokenIds]  # token(s), a (correct, incorrect) pair, or a float vector
Translate = Callable[[int, torch.Tensor], torch.Tensor]  # (lens row, residual) -> residual, e.g. a tuned lens


@dataclass(frozen=True)
class LogitLensResult:
    """Lens logits per layer: ``logits[layer_row, batch, position, vocab]`` and the row labels."""

    logits: torch.Tensor
    labels: tuple[str, ...]

    def probs(self) -> torch.Tensor:
        return self.logits.float().softmax(-1)

    def target_probs(self, targets: torch.Tensor) -> torch.Tensor:
        """Probability of ``targets`` (``[batch, positions]`` token ids) at each layer: ``[layers+1, b, k]``."""
        idx = targets.to(self.logits.device)[None, ..., None].expand(self.logits.shape[0], -1, -1, 1)
        return self.probs().gather(-1, idx).squeeze(-1)


def lens_sites(lm: LanguageModel) -> tuple[list[str], tuple[str, ...]]:
    """The residual sites a lens reads (``blocks.0.resid_pre``, then every ``resid_post``) and their row labels."""
    n = lm.dims.n_layers
    posts = [f"blocks.{i}.resid_post" for i in range(n)]
    return ["blocks.0.resid_pre", *posts], ("embed", *posts)


def decode_rows(lm: LanguageModel, states: Sequence[torch.Tensor],
                translate: Translate | None = None) -> torch.Tensor:
    """Lens logits ``[rows, ..., vocab]`` of one residual state tensor per lens row, after ``translate(row, resid)``
    when given (a tuned lens)."""
    with torch.no_grad():
        return torch.stack([lm.unembed(h if translate is None else translate(i, h)) for i, h in enumerate(states)])


def read_lens(lm: LanguageModel, inputs: Inputs | Batch, *, positions: PositionSpec = "last",
              translate: Translate | None = None) -> LogitLensResult:
    """Decode every residual row at ``positions``, after ``translate(row, resid)`` when given (a tuned lens)."""
    sites, labels = lens_sites(lm)
    cache = lm.run_with_cache(inputs, sites, positions=positions)
    return LogitLensResult(decode_rows(lm, [cache[s] for s in sites], translate), labels)


def logit_lens(lm: LanguageModel, inputs: Inputs, *, positions: PositionSpec = "last") -> LogitLensResult:
    """Decode every layer's residual stream at ``positions`` with the final norm and unembedding."""
    return read_lens(lm, inputs, positions=positions)


# -- the final norm at a fixed scale ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinalNorm:
    """The final norm as ``norm(x) = weight ⊙ C(x) / scale(x) + bias``; ``C`` centres (LayerNorm) or not (RMSNorm).

    ``weight`` is the effective one (Gemma's ``1 + w`` included), read off the module itself.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    centred: bool

    @classmethod
    def of(cls, lm: LanguageModel) -> FinalNorm:
        module = get_module(lm.model, lm.spec.final_norm)
        ref = get_module(lm.model, lm.spec.embed).weight
        zeros = torch.zeros(lm.dims.d_model, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if isinstance(module, torch.nn.LayerNorm):
                weight = module.weight.detach() if module.weight is not None else torch.ones_like(zeros)
                bias = module.bias.detach() if module.bias is not None else zeros
                return cls(weight.float(), bias.float(), centred=True)
            # RMS-style: norm(0) is the bias; norm(k·1) = weight · k / sqrt(k² + eps) ≈ weight for large k
            bias = module(zeros[None]).flatten()
            weight = module((zeros + 1e3)[None]).flatten() - bias
        return cls(weight.float(), bias.float(), centred=False)

    @property
    def kind(self) -> str:
        return "LayerNorm (centred, scaled, weighted)" if self.centred else "RMSNorm (scaled, weighted)"

    def center(self, v: torch.Tensor) -> torch.Tensor:
        return v - v.mean(-1, keepdim=True) if self.centred else v

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """``weight ⊙ C(v)``: a write as the norm passes it on, before dividing by the scale."""
        return self.weight.to(v.device) * self.center(v.float())

    def reader(self, u: torch.Tensor) -> torch.Tensor:
        """``C(weight ⊙ u)``: what a write is dotted with, so ``write · reader = apply(write) · u``."""
        return self.center(self.weight.to(u.device) * u.float())

    def scale(self, resid: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
        """The scale the norm divided by on this run: ``|apply(resid)| / |normed - bias|`` per vector."""
        bias = self.bias.to(normed.device)
        return self.apply(resid).norm(dim=-1) / (normed.float() - bias).norm(dim=-1).clamp_min(1e-30)


# -- direct logit attribution ---------------------------------------------------------------------------------------
def _token_ids(lm: LanguageModel, ids: TokenIds, shape: tuple[int, int]) -> torch.Tensor:
    t = torch.as_tensor(ids, device=lm.device)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise InputError("integer token ids", f"{t.dtype} values", "pass ids, or a float vector alone as direction")
    b, k = shape
    if t.dim() == 1 and len(t) == b:
        t = t[:, None]
    elif not (t.dim() == 0 or tuple(t.shape) == shape):
        raise ShapeMismatchError(f"one token id, one per row ({b}) or one per selected position {shape}",
                                 f"shape {tuple(t.shape)}", "pass an int, a list with one id per input, or a tensor")
    if bool(((t < 0) | (t >= lm.dims.vocab)).any()):
        raise IndexOutOfRangeError(f"token ids in [0, {lm.dims.vocab - 1}]", str(t.flatten().tolist()[:8]),
                                   "check the tokenizer used to make the ids")
    return t.long().expand(b, k)


def _unembed_direction(lm: LanguageModel, direction: Direction,
                       shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``u [b, k, d]`` per cell, the unembedding-bias term ``[b, k]`` and a name for the explained quantity."""
    w_u = lm.weights.W_U.float()
    b_u = getattr(get_module(lm.model, lm.spec.unembed), "bias", None)
    b_u = torch.zeros(lm.dims.vocab, device=w_u.device) if b_u is None else b_u.detach().float()

    def tokens(ids: TokenIds) -> tuple[torch.Tensor, torch.Tensor]:
        t = _token_ids(lm, ids, shape)
        return w_u.T[t], b_u[t]

    if isinstance(direction, tuple):
        if len(direction) != 2:
            raise InputError("a (correct, incorrect) pair", f"a tuple of {len(direction)}",
                             "pass (correct_id, incorrect_id); a list means one target per input")
        (uc, bc), (ui, bi) = tokens(direction[0]), tokens(direction[1])
        return uc - ui, bc - bi, f"logit_diff[{describe_tokens(direction[0])} - {describe_tokens(direction[1])}]"
    if isinstance(direction, torch.Tensor) and direction.dtype.is_floating_point:
        if direction.shape[-1] != lm.dims.d_model:
            raise ShapeMismatchError(f"a vector of size d_model={lm.dims.d_model} (or [batch, k, d_model])",
                                     f"shape {tuple(direction.shape)}", "pass a direction in the residual space")
        try:
            u = direction.to(w_u.device).float().expand(*shape, -1)
        except RuntimeError:
            raise ShapeMismatchError(f"a direction broadcastable to {(*shape, lm.dims.d_model)} (batch, positions, "
                                     "d_model)", f"shape {tuple(direction.shape)}",
                                     "pass one vector [d_model], or one per selected cell") from None
        return u, torch.zeros(shape, device=w_u.device), "direction"
    u, bias = tokens(direction)
    return u, bias, f"logit[{describe_tokens(direction)}]"


def _require_head_sums(lm: LanguageModel) -> None:
    attn_out = get_module(lm.model, lm.spec.layer_path(0, lm.spec.attn_out))
    if getattr(attn_out, "weight", None) is not None:
        raise SiteUnavailableError(
            "a family whose heads' outputs (plus bias) are what attention adds to the residual stream",
            f"{lm.family}: attention output passes through {type(attn_out).__name__} (a post-attention norm)",
            "pass heads=False to attribute each layer's attn.out (the normed write) as one component")


def _component_writes(lm: LanguageModel, cache: ActivationCache,
                      heads: bool) -> list[tuple[str, torch.Tensor]]:
    """``(label, write)`` per component; a write is ``[b, k, d]``, or ``[d]`` for a bias."""
    out = [("embed", cache["embed"])]
    for layer in range(lm.dims.n_layers):
        if heads:
            per_head = cache[f"blocks.{layer}.attn.head_out"]
            out += [(str(Site("attn.head_out", layer, h)), per_head[..., h, :]) for h in range(lm.dims.n_heads)]
            bias = getattr(get_module(lm.model, lm.spec.layer_path(layer, lm.spec.o_proj)), "bias", None)
            if bias is not None:
                out.append((f"blocks.{layer}.attn.bias", bias.detach()))
        else:
            out.append((f"blocks.{layer}.attn.out", cache[f"blocks.{layer}.attn.out"]))
        out.append((f"blocks.{layer}.mlp.out", cache[f"blocks.{layer}.mlp.out"]))
    return out


def direct_logit_attribution(lm: LanguageModel, inputs: Inputs | Batch, direction: Direction, *,
                             positions: PositionSpec = "last", heads: bool = True) -> LocateResult:
    """Each component's direct contribution to a logit (or logit difference), averaged over inputs and positions.

    ``direction``: a target token id (one for all rows, a list with one per row, or ``[batch, k]`` ids), a
    ``(correct, incorrect)`` tuple of those (logit difference), or a float vector in the residual space that the
    unembedding reads (``[d_model]``, or ``[batch, k, d_model]`` per cell). ``positions``: ``"last"``, indices,
    a selector, or ``None`` / ``"all"`` (every real token). ``heads=False`` attributes attention per layer
    (``blocks.{l}.attn.out``); families with a post-attention norm (Gemma 2, OLMo 2) need it, since their heads'
    outputs are normed together before reaching the residual stream (``heads=True`` raises
    :class:`SiteUnavailableError` there).

    ``settings`` holds ``logit`` (the mean explained quantity, before any final soft-capping) and ``constant`` (the
    norm and unembedding biases along the direction): ``scores.sum() + constant == logit``.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> r = direct_logit_attribution(lm, [[5, 6, 7], [8, 9, 10]], (11, 12))
        >>> r.metric, len(r.labels)  # embed + 2 layers x (4 heads + MLP)
        ('logit_diff[11 - 12]', 11)
    """
    if heads:
        _require_head_sums(lm)
    n = lm.dims.n_layers
    every = positions is None or positions == "all"
    attn = [f"blocks.{layer}.attn.{'head_out' if heads else 'out'}" for layer in range(n)]
    sites = ["embed", *attn, *[f"blocks.{layer}.mlp.out" for layer in range(n)], f"blocks.{n - 1}.resid_post",
             "ln_final"]
    batch = lm.to_batch(inputs)
    cache = lm.run_with_cache(batch, sites, positions=None if every else positions)
    normed = cache["ln_final"]
    cells = (normed.shape[0], normed.shape[1])
    weights = batch.attention_mask.float() if every else torch.ones(cells, device=normed.device)
    norm = FinalNorm.of(lm)
    u, bias_term, name = _unembed_direction(lm, direction, cells)
    reader = norm.reader(u) / norm.scale(cache[f"blocks.{n - 1}.resid_post"], normed)[..., None]

    def mean(values: torch.Tensor) -> float:
        return float((values * weights).sum() / weights.sum())

    writes = _component_writes(lm, cache, heads)
    scores = [mean((write.float() * reader).sum(-1)) for _, write in writes]
    constant = mean((norm.bias.to(u.device) * u).sum(-1) + bias_term)
    logit = mean((normed.float() * u).sum(-1) + bias_term)
    return LocateResult.over([label for label, _ in writes], scores, method="direct_logit_attribution",
                             metric=name, axis="component", positions=str(positions), heads=heads,
                             n_examples=cells[0], final_norm=norm.kind, logit=logit, constant=constant)


# -- top tokens of a direction ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TopTokens:
    """Tokens a residual-space vector promotes (``top``) and suppresses (``bottom``): ``(token, id, score)``."""

    top: tuple[tuple[str, int, float], ...]
    bottom: tuple[tuple[str, int, float], ...]


def _site_vector(lm: LanguageModel, site: str) -> torch.Tensor:
    s = Site.parse(site)
    if s.kind != "mlp.post" or not isinstance(s.index, int) or s.is_pattern:
        raise InputError("a vector [d_model] or one neuron site like 'blocks.1.mlp.post[17]'", repr(site),
                         "for a head pass a cached head output, e.g. cache['blocks.1.attn.head_out[3]'][0, -1], "
                         "or an OV image such as lm.weights.W_E[t] @ lm.weights.OV(1, 3)")
    assert isinstance(s.layer, int)
    return lm.weights.neuron_value(s.layer, s.index)


def top_tokens(lm: LanguageModel, vector: torch.Tensor | str, k: int = 10) -> TopTokens:
    """Top and bottom tokens of ``weight ⊙ C(vector) @ W_U``: the vector as the final norm passes it on (its weight
    applied, centred for LayerNorm; the per-token scale only rescales every score alike), then unembedded.

    ``vector``: any residual-space vector (a cached head output, an OV image of a token, an SAE decoder row), or
    a neuron site ``"blocks.{l}.mlp.post[j]"`` for that neuron's value vector (column ``j`` of ``W_out``).

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> len(top_tokens(lm, "blocks.0.mlp.post[3]", k=5).top)
        5
    """
    v = _site_vector(lm, vector) if isinstance(vector, str) else vector
    if v.shape != (lm.dims.d_model,):
        raise ShapeMismatchError(f"a vector of shape ({lm.dims.d_model},)", f"shape {tuple(v.shape)}",
                                 "pick one vector, e.g. cache[site][0, -1]")
    if not 0 < k <= lm.dims.vocab:
        raise InputError(f"k in [1, {lm.dims.vocab}]", str(k), "ask for fewer tokens")
    scores = FinalNorm.of(lm).apply(v.to(lm.device)) @ lm.weights.W_U.float()

    def named(values: torch.Tensor, ids: torch.Tensor) -> tuple[tuple[str, int, float], ...]:
        return tuple((_token_str(lm, i), i, float(s)) for s, i in zip(values.tolist(), ids.tolist(), strict=True))

    hi, lo = scores.topk(k), scores.topk(k, largest=False)
    return TopTokens(named(hi.values, hi.indices), named(lo.values, lo.indices))


def _token_str(lm: LanguageModel, token_id: int) -> str:
    tok = lm.tokenizer
    return str(tok.convert_ids_to_tokens(token_id)) if hasattr(tok, "convert_ids_to_tokens") else str(token_id)
