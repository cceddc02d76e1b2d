"""SAE-feature steering vectors with toy dictionaries: deltas equal activations averaged by hand, the vector equals
the brute-force sum of the chosen features, and with an orthonormal basis and every feature kept it is the
difference in means (a known equivalence)."""

from __future__ import annotations

import pytest
import torch

from lsi.core.interventions import Add
from lsi.errors import InputError, ShapeMismatchError
from lsi.steer.directions import diff_in_means
from lsi.steer.features import FeatureDictionary, FeatureSteering, feature_deltas, feature_vector

SITE = "blocks.1.resid_pre"
POSITIVE = [[5, 6, 7, 40], [8, 41], [9, 10, 42]]
NEGATIVE = [[5, 6, 7, 60], [11, 12, 61, 62, 63]]


class Linear:
    """``a = x W_decᵀ`` (coordinates in the basis when W_dec is orthonormal)."""

    def __init__(self, w_dec: torch.Tensor) -> None:
        self.W_dec = w_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W_dec.T


class ReLUDictionary(Linear):
    """A sparse-autoencoder-like dictionary: more features than dimensions, ReLU encoder with a bias."""

    def __init__(self, n: int, d: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        super().__init__(torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1))
        self.b_enc = 0.1 * torch.randn(n, generator=gen)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_dec.T + self.b_enc)


def _orthonormal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("basis", ["identity", "orthonormal"])
def test_all_features_of_an_orthonormal_basis_give_the_difference_in_means(tiny_lm, family, basis):
    lm = tiny_lm(family)
    sae = Linear(torch.eye(32) if basis == "identity" else _orthonormal(32, 3))
    assert isinstance(sae, FeatureDictionary)
    for positions in ("last", "all"):
        deltas = feature_deltas(lm, sae, POSITIVE, NEGATIVE, SITE, positions=positions, batch_size=2)
        vector, chosen = feature_vector(sae, deltas)
        assert sorted(chosen) == list(range(32))
        expected = diff_in_means(lm, POSITIVE, NEGATIVE, SITE, positions=positions)
        assert float(expected.norm()) > 1e-2
        torch.testing.assert_close(vector, expected, atol=1e-5, rtol=0)


@pytest.mark.unit
def test_deltas_and_top_features_equal_brute_force(tiny_lm):
    lm = tiny_lm("llama")
    sae = ReLUDictionary(80, 32, seed=1)

    def mean_activation(rows):  # every real token of every row, one row at a time
        tokens = torch.cat([lm.run_with_cache([r], [SITE])[SITE][0] for r in rows])
        return sae.encode(tokens).double().mean(0)

    deltas = feature_deltas(lm, sae, POSITIVE, NEGATIVE, SITE, positions="all", batch_size=2)
    torch.testing.assert_close(deltas, (mean_activation(POSITIVE) - mean_activation(NEGATIVE)).float(), atol=1e-6,
                               rtol=0)
    vector, chosen = feature_vector(sae, deltas, top=5)
    order = sorted(range(80), key=lambda j: -abs(float(deltas[j])))
    assert chosen == order[:5]
    brute = sum(float(deltas[j]) * sae.W_dec[j].double() for j in order[:5])
    torch.testing.assert_close(vector, brute.float(), atol=1e-6, rtol=0)
    fitted = FeatureSteering.fit(lm, sae, POSITIVE, NEGATIVE, SITE, top=5, alpha=2.0, positions="all",
                                 scope="generated")
    assert isinstance(fitted.steering, Add) and fitted.features == chosen
    assert fitted.steering.alpha == 2.0 and fitted.steering.scope == "generated"
    torch.testing.assert_close(fitted.steering.vector, vector)
    torch.testing.assert_close(fitted.deltas, deltas)


@pytest.mark.unit
def test_mismatched_dictionaries_are_refused(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(ShapeMismatchError, match="width 32"):
        feature_deltas(lm, Linear(torch.eye(16)), POSITIVE, NEGATIVE, SITE)

    class Broken(Linear):
        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return x[..., :3]

    with pytest.raises(ShapeMismatchError, match="n_features=32"):
        feature_deltas(lm, Broken(torch.eye(32)), POSITIVE, NEGATIVE, SITE)
    with pytest.raises(ShapeMismatchError, match=r"\[32\]"):
        feature_vector(Linear(torch.eye(32)), torch.ones(31))
    with pytest.raises(InputError, match=r"top in \[1, 32\]"):
        feature_vector(Linear(torch.eye(32)), torch.ones(32), top=0)
    with pytest.raises(InputError, match="one concrete site"):
        feature_deltas(lm, Linear(torch.eye(32)), POSITIVE, NEGATIVE, "blocks.*.resid_pre")
