"""Self-check: do the sites of a loaded model mean what the contract says?

It runs a short input once and checks that the logits are finite and, with tolerances scaled to the values'
magnitude and the dtype: resid_pre / resid_post against HF's ``output_hidden_states``; ``ln_final`` against HF's
last hidden state; resid_post = resid_mid + mlp.out (or resid_pre + attn.out + mlp.out for parallel attention);
the sum of ``head_out`` (+ bias) against the output projection; ``unembed(resid_post[-1])`` against the logits.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> self_check(lsi.LanguageModel(tiny_model("gpt2"))).passed
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lsi.arch.dims import get_module
from lsi.errors import UnknownArchitectureError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel


@dataclass(frozen=True)
class CheckResult:
    """``value`` is a max absolute difference; it must be at most ``tolerance`` (or above it, for checks that
    an intervention has an effect)."""

    name: str
    value: float
    tolerance: float
    expect_above: bool = False

    @property
    def passed(self) -> bool:
        return self.value > self.tolerance if self.expect_above else self.value <= self.tolerance


@dataclass(frozen=True)
class SelfCheckResult:
    checks: tuple[CheckResult, ...]
    error: str | None = None  # set when the check could not even run

    @property
    def passed(self) -> bool:
        return self.error is None and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, object]:
        return {"passed": self.passed, "error": self.error,
                "checks": [dict(name=c.name, value=c.value, tolerance=c.tolerance, passed=c.passed)
                           for c in self.checks]}


def _compare(name: str, got: torch.Tensor, want: torch.Tensor) -> CheckResult:
    rel = 1e-4 if want.dtype == torch.float32 else 1e-5 if want.dtype == torch.float64 else 3e-2
    err = float((got.detach().float() - want.detach().float()).abs().max()) if got.shape == want.shape else float("inf")
    return CheckResult(name, err, rel * (1.0 + float(want.float().abs().max())))


def _probe_ids(lm: LanguageModel) -> torch.Tensor:
    if lm.tokenizer is not None:
        return lm.to_batch("The quick brown fox jumps over the lazy dog.").input_ids
    vocab = lm.dims.vocab
    return (torch.arange(3, 15) * 7 % (vocab - 3) + 3).unsqueeze(0).to(lm.device)


def self_check(lm: LanguageModel) -> SelfCheckResult:
    """Run the contract checks once on a short input (text if there is a tokenizer, else token ids)."""
    from lsi.core.hooks import HookSession

    spec, n = lm.spec, lm.dims.n_layers
    ids = _probe_ids(lm)
    sites = [s for s in lm.available_sites() if s.kind in (
        "resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out", "attn.head_out", "ln_final")]
    o_proj_out: dict[int, torch.Tensor] = {}
    handles = [get_module(lm.model, spec.layer_path(i, spec.o_proj)).register_forward_hook(
        lambda m, a, out, i=i: o_proj_out.__setitem__(i, out.detach())) for i in range(n)]
    try:
        with torch.no_grad(), HookSession(lm.model, spec, lm.dims, cache=sites) as session:
            out = lm.model(input_ids=ids, output_hidden_states=True)
    except Exception as err:  # a probed spec may point at the wrong modules in many ways
        return SelfCheckResult((), error=f"{type(err).__name__}: {err}")
    finally:
        for h in handles:
            h.remove()
    c, hs = session.values, out.hidden_states
    with torch.no_grad():
        lens_logits = lm.unembed(c[f"blocks.{n - 1}.resid_post"])
    non_finite = float((~torch.isfinite(out.logits)).sum())
    checks = [CheckResult("logits are finite (count of inf / NaN)", non_finite, 0.0),
              _compare("ln_final == hidden_states[-1]", c["ln_final"], hs[-1]),
              _compare("unembed(resid_post[-1]) == logits", lens_logits, out.logits)]
    for i in range(n):
        b = f"blocks.{i}"
        checks.append(_compare(f"{b}.resid_pre == hidden_states[{i}]", c[f"{b}.resid_pre"], hs[i]))
        if i < n - 1:
            checks.append(_compare(f"{b}.resid_post == hidden_states[{i + 1}]", c[f"{b}.resid_post"], hs[i + 1]))
        if lm.parallel_attn:
            parts = c[f"{b}.resid_pre"] + c[f"{b}.attn.out"] + c[f"{b}.mlp.out"]
            checks.append(_compare(f"{b}.resid_post == resid_pre + attn.out + mlp.out", parts, c[f"{b}.resid_post"]))
        else:
            parts = c[f"{b}.resid_mid"] + c[f"{b}.mlp.out"]
            checks.append(_compare(f"{b}.resid_post == resid_mid + mlp.out", parts, c[f"{b}.resid_post"]))
        bias = getattr(get_module(lm.model, spec.layer_path(i, spec.o_proj)), "bias", None)
        heads = c[f"{b}.attn.head_out"].sum(-2) + (0 if bias is None else bias)
        checks.append(_compare(f"{b}: sum of head_out == output projection", heads, o_proj_out[i]))
    checks.append(_mlp_reads_attention(lm, ids, c["blocks.0.mlp.out"]))
    return SelfCheckResult(tuple(checks))


def _mlp_reads_attention(lm: LanguageModel, ids: torch.Tensor, clean_mlp_out: torch.Tensor) -> CheckResult:
    """Sequential blocks: zeroing attn.out changes the same layer's MLP output; parallel blocks: it does not.

    The residual sums cannot tell the two apart (both add up to resid_pre + attn.out + mlp.out), this can.
    """
    from lsi.core.interventions import Zero
    from lsi.errors import NonFiniteSteeringError

    try:
        with torch.no_grad(), lm.intervene(Zero("blocks.0.attn.out")):
            ablated = lm.run_with_cache(ids, sites="blocks.0.mlp.out")["blocks.0.mlp.out"]
        change = float((ablated - clean_mlp_out).abs().max())
    except NonFiniteSteeringError:  # the model's own values are not finite: NaN fails the check either way
        change = float("nan")
    tol = _compare("", clean_mlp_out, clean_mlp_out).tolerance
    if lm.parallel_attn:
        return CheckResult("blocks.0 MLP ignores attn.out (parallel attention)", change, tol)
    return CheckResult("blocks.0 MLP reads attn.out (sequential attention)", change, tol, expect_above=True)


def require_self_check(lm: LanguageModel) -> None:
    """Raise :class:`UnknownArchitectureError` (with the modules found and a spec template) unless it passes."""
    result = self_check(lm)
    if result.passed:
        return
    failed = result.error or "; ".join(f"{c.name} (value {c.value:.3g})" for c in result.checks
                                       if not c.passed)
    layer = get_module(lm.model, lm.spec.layer_path(0))
    modules = ", ".join(name for name, _ in layer.named_modules() if name)
    raise UnknownArchitectureError(
        f"a model whose sites pass the self-check (family {lm.spec.family!r})",
        f"failures: {failed}. Modules of layer 0: {modules}",
        "write an ArchSpec for it and pass spec= to lsi.load, or lsi.register_architecture() it. Template:\n"
        + lm.spec.template())
