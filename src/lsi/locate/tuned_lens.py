"""The tuned lens (Belrose et al. 2023): a learned affine translator per layer before the model's own unembedding.

Each residual row of the logit lens (``embed``, then every ``blocks.{i}.resid_post``) gets a translator
``h -> h @ W.T + b``, initialised to the identity, and trained to minimise KL(final logits ‖ lens logits) over
the real tokens of a dataset; the lens logits are ``lm.unembed(translator(h))`` (the model's final norm,
unembedding and any soft-capping). The last row is the model's output and keeps the identity. A lens is saved
as safetensors + JSON with a fingerprint of the model and refuses to load for another model.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> lens = TunedLens.train(lm, [[5, 6, 7, 8], [9, 10, 11, 12]], steps=5)
    >>> kl = lens_kl(lm, [[5, 6, 7, 9]], lens)
    >>> kl.axes[0], kl.shape
    (('lens', ('logit', 'tuned')), (2, 3))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lsi.arch.dims import get_module
from lsi.core.bundle import load_bundle, save_bundle
from lsi.core.identity import ModelIdentity
from lsi.core.positions import PositionSpec
from lsi.errors import InputError
from lsi.evaluation.functional import kl_divergence
from lsi.locate.result import LocateResult
from lsi.locate.vocab import LogitLensResult, decode_rows, lens_sites, read_lens

if TYPE_CHECKING:
    from lsi.core.inputs import Batch, Inputs
    from lsi.core.model import LanguageModel

FORMAT_VERSION = 1
_CHUNK_ROWS = 32  # inputs run through the model at a time while collecting training states


def lens_identity(lm: LanguageModel) -> ModelIdentity:
    """``lm``'s identity with the fingerprint of what a lens depends on: the unembedding and final-norm weights."""
    names = [f"{path}.weight" for path in (lm.spec.unembed, lm.spec.final_norm)
             if getattr(get_module(lm.model, path), "weight", None) is not None]
    return ModelIdentity.of(lm, names)


@dataclass(frozen=True)
class TunedLens:
    """Affine translators ``weight [rows, d, d]`` and ``bias [rows, d]``, one per lens row (``labels``)."""

    weight: torch.Tensor
    bias: torch.Tensor
    labels: tuple[str, ...]
    fingerprint: str
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def identity(cls, lm: LanguageModel) -> TunedLens:
        """The untrained lens: every translator is the identity, so it reads exactly like the logit lens."""
        d, rows = lm.dims.d_model, lm.dims.n_layers + 1
        return cls(torch.eye(d).repeat(rows, 1, 1), torch.zeros(rows, d), lens_sites(lm)[1],
                   str(lens_identity(lm).fingerprint))

    def translate(self, row: int, resid: torch.Tensor) -> torch.Tensor:
        """Row ``row``'s translator applied to residual states ``[..., d_model]``."""
        w, b = self.weight[row].to(resid.device), self.bias[row].to(resid.device)
        return (resid.float() @ w.T + b).to(resid.dtype)

    def logits(self, lm: LanguageModel, inputs: Inputs | Batch, *,
               positions: PositionSpec = "last") -> LogitLensResult:
        """Tuned-lens logits per row at ``positions``, like :func:`lsi.locate.vocab.logit_lens`."""
        self._check_model(lm)
        return read_lens(lm, inputs, positions=positions, translate=self.translate)

    # -- training ------------------------------------------------------------------------------------------------
    @classmethod
    def train(cls, lm: LanguageModel, dataset: Inputs | Batch, *, steps: int = 300, lr: float = 1e-2,
              seed: int = 0, batch_tokens: int = 1024) -> TunedLens:
        """Fit every translator but the last by Adam on KL(final ‖ lens), ``batch_tokens`` random real tokens a
        step (deterministic for a seed). The dataset's states are held in memory: use a few thousand tokens.

        Example:
            >>> import lsi
            >>> from lsi.testing import tiny_model
            >>> lens = TunedLens.train(lsi.LanguageModel(tiny_model("gpt2")), [[5, 6, 7, 8]], steps=3)
            >>> tuple(lens.weight.shape)
            (3, 32, 32)
        """
        if steps < 1 or lr <= 0 or batch_tokens < 1:
            raise InputError("steps >= 1, lr > 0 and batch_tokens >= 1", f"steps={steps}, lr={lr}, "
                             f"batch_tokens={batch_tokens}", "e.g. steps=300, lr=1e-2")
        states, target = _training_states(lm, lm.to_batch(dataset))
        rows, d = states.shape[0] - 1, lm.dims.d_model
        delta = torch.zeros(rows, d, d, device=states.device, requires_grad=True)  # weight = identity + delta
        bias = torch.zeros(rows, d, device=states.device, requires_grad=True)
        opt = torch.optim.Adam([delta, bias], lr=lr)
        gen = torch.Generator().manual_seed(seed)
        n = target.shape[0]
        for _ in range(steps):
            idx = torch.randint(n, (min(batch_tokens, n),), generator=gen).to(states.device)
            with torch.enable_grad():
                h = states[:-1, idx]
                lens_logits = lm.unembed(h + torch.einsum("rnd,red->rne", h, delta) + bias[:, None])
                loss = kl_divergence(target[idx], lens_logits.float().log_softmax(-1)).mean(-1).sum()
                opt.zero_grad()
                delta.grad, bias.grad = torch.autograd.grad(loss, [delta, bias])  # leaves the model's .grad alone
            opt.step()
        eye = torch.eye(d, device=states.device)
        weight = torch.cat([eye + delta.detach(), eye[None]]).cpu()
        full_bias = torch.cat([bias.detach(), torch.zeros(1, d, device=states.device)]).cpu()
        return cls(weight, full_bias, lens_sites(lm)[1], str(lens_identity(lm).fingerprint),
                   {"steps": steps, "lr": lr, "seed": seed, "batch_tokens": batch_tokens, "n_tokens": n})

    # -- saving --------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path.safetensors`` (translators) and ``path.json`` (labels, fingerprint, settings)."""
        meta = {"format": FORMAT_VERSION, "labels": list(self.labels), "fingerprint": self.fingerprint,
                "settings": self.settings}
        return save_bundle(path, {"weight": self.weight, "bias": self.bias}, meta)

    @classmethod
    def load(cls, path: str | Path, lm: LanguageModel) -> TunedLens:
        """Read a lens written by :meth:`save`; refused unless it was trained for ``lm`` (same fingerprint)."""
        tensors, meta = load_bundle(path, what="a saved tuned lens", fix="pass the path given to TunedLens.save",
                                    format=FORMAT_VERSION)
        lens = cls(tensors["weight"], tensors["bias"], tuple(meta["labels"]), meta["fingerprint"], meta["settings"])
        lens._check_model(lm)
        return lens

    def _check_model(self, lm: LanguageModel) -> None:
        identity = lens_identity(lm)
        dataclasses.replace(identity, fingerprint=self.fingerprint).check(
            lm, "a tuned lens trained for", "train a lens for this model with TunedLens.train(lm, texts)")


def _training_states(lm: LanguageModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual states ``[rows, n_tokens, d]`` and final log-probabilities ``[n_tokens, vocab]`` at real tokens."""
    sites = lens_sites(lm)[0]
    states: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    for chunk in batch.chunks(_CHUNK_ROWS):
        cache = lm.run_with_cache(chunk, sites)
        real = chunk.attention_mask.bool()
        states.append(torch.stack([cache[s][real] for s in sites]).float())
        assert cache.logits is not None
        targets.append(cache.logits[real].float().log_softmax(-1))
    return torch.cat(states, 1), torch.cat(targets)


def lens_kl(lm: LanguageModel, inputs: Inputs | Batch, lens: TunedLens | None = None) -> LocateResult:
    """Mean KL(final ‖ lens) per row over the real tokens of ``inputs``, for the logit lens and (given) the
    tuned lens: axes ``lens`` (``logit``, ``tuned``) × ``layer`` (the lens rows).

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
        >>> float(lens_kl(lm, [[5, 6, 7]]).scores[0, -1])  # the last row is the model itself
        0.0
    """
    if lens is not None:
        lens._check_model(lm)
    batch = lm.to_batch(inputs)
    mask = batch.attention_mask.bool()
    sites, labels = lens_sites(lm)
    cache = lm.run_with_cache(batch, sites)
    states = [cache[s][mask] for s in sites]  # [n_tokens, d_model] per lens row
    readers = {"logit": None, **({} if lens is None else {"tuned": lens.translate})}
    rows = {name: decode_rows(lm, states, t) for name, t in readers.items()}
    final = rows["logit"][-1].float().log_softmax(-1)  # the model's own logits at every real token
    scores = torch.stack([kl_divergence(final, r.float().log_softmax(-1)).mean(-1) for r in rows.values()])
    settings = {"n_tokens": int(mask.sum()), "final_norm_applied": True,
                **({} if lens is None else {"tuned_lens": lens.settings})}
    return LocateResult(scores, (("lens", tuple(rows)), ("layer", labels)), method="lens_kl",
                        metric="kl(final || lens)", settings=settings)
