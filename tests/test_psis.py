"""PSIS k-hat (pyro_lvm/estimators/psis.py): arviz-stats' value, checked against arviz 0.x and a known tail."""
import math
import warnings

import numpy as np
import pytest

from pyro_lvm.estimators.psis import MIN_WEIGHTS, pareto_khat


def _arviz0_khat(log_weights):
    arviz = pytest.importorskip("arviz")
    if not hasattr(arviz, "psislw"):
        pytest.skip(f"arviz {arviz.__version__} has no psislw (arviz 1.x); the comparison needs arviz 0.x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.array([arviz.psislw(column.copy(), reff=1.0)[1] for column in log_weights.T])


@pytest.mark.parametrize("num_weights", [25, 30, 100, 200, 225])
@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_khat_equals_arviz0_on_the_same_weights(num_weights, sigma):
    """Up to S = 225 both generations fit the same S/5 largest weights: the same k-hat to rounding."""
    log_weights = np.random.default_rng(num_weights).normal(scale=sigma, size=(num_weights, 40))
    np.testing.assert_allclose(pareto_khat(log_weights), _arviz0_khat(log_weights), rtol=0, atol=1e-10)


def test_khat_close_to_arviz0_where_their_tails_differ_by_one_draw():
    """Above S = 225 the tail is floor(3 sqrt S) draws in arviz-stats, ceil(3 sqrt S) in arviz 0.x."""
    log_weights = np.random.default_rng(0).normal(size=(1000, 200))
    difference = np.abs(pareto_khat(log_weights) - _arviz0_khat(log_weights))
    assert difference.mean() < 0.03 and difference.max() < 0.2, (difference.mean(), difference.max())


@pytest.mark.parametrize("alpha", [1.0, 2.0, 4.0])
def test_khat_recovers_a_known_tail_index(alpha):
    """Weights drawn from a Pareto distribution with tail index alpha have k = 1 / alpha.

    This also pins the sign convention: arviz-stats' psislw takes log likelihoods (-log w), and a
    call with the log weights themselves would fit the other tail (k-hat near 0 here).
    """
    rng = np.random.default_rng(1)
    num_weights, num_points = 4000, 50
    log_weights = np.log(rng.pareto(alpha, size=(num_weights, num_points)) + 1.0)
    khat = pareto_khat(log_weights)
    # The fit's spread over points is the standard error of its mean; allow 4 of them plus the
    # prior's pull towards 0.5 (weight 10 / (M + 10) with M = 189 tail draws).
    prior_pull = 10 / (3 * math.floor(math.sqrt(num_weights)) + 10) * abs(0.5 - 1 / alpha)
    tolerance = 4 * khat.std() / math.sqrt(num_points) + prior_pull
    assert abs(khat.mean() - 1 / alpha) < tolerance, (khat.mean(), 1 / alpha, tolerance)


def test_khat_undefined_cases_are_nan_not_errors():
    rng = np.random.default_rng(2)
    few = rng.normal(size=(MIN_WEIGHTS - 1, 3))
    assert np.isnan(pareto_khat(few)).all()
    weights = rng.normal(size=(100, 4))
    weights[:, 0] = 0.0            # equal weights (the guide is the exact posterior)
    weights[5, 1] = np.nan
    weights[7, 2] = -np.inf        # a particle with zero weight is fine
    khat = pareto_khat(weights)
    assert np.isnan(khat[0]) and np.isnan(khat[1]) and np.isfinite(khat[2]) and np.isfinite(khat[3])
    assert khat[2] == pytest.approx(pareto_khat(np.delete(weights[:, 2:3], 7, axis=0))[0], abs=0.2)
