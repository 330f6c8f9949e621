"""Per-point log p(x) estimators on models whose answer is known (PPCA, Gaussian mixtures).

The test models are defined here so that the tests stand alone (the zoo is tested elsewhere).
Tolerances are Monte-Carlo standard errors computed from the estimates themselves.
"""

import io
import math
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.special import logsumexp

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule
from torch import nn

from pyro_lvm.errors import UserError
from pyro_lvm.estimators import ESTIMATORS, Progress, estimate_log_marginal
from pyro_lvm.objectives import get_objective
from pyro_lvm.protocol import inspect_model
from pyro_lvm.estimators import importance_sampling
from pyro_lvm.estimators.importance_weights import importance_log_weights
from pyro_lvm.estimators.monte_carlo import WeightStatistics
from montecarlo_helpers import assert_reported_error_matches_spread, over_seeds

pyro.settings.set(module_local_params=True)

class LinearGaussian(PyroModule):
    """PPCA with known parameters: z ~ N(0, I), x | z ~ N(W z + b, s^2 I); linear Gaussian guide."""

    def __init__(self, data_dim=3, latent_dim=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.latent_dim = latent_dim
        self.W = nn.Parameter(torch.randn(data_dim, latent_dim, generator=g))
        self.b = nn.Parameter(torch.randn(data_dim, generator=g))
        self.log_s = nn.Parameter(torch.tensor(math.log(0.7)))
        self.A = nn.Parameter(0.3 * torch.randn(latent_dim, data_dim, generator=g))
        self.c = nn.Parameter(torch.zeros(latent_dim))
        self.L_raw = nn.Parameter(torch.eye(latent_dim) * 0.8)

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            loc = z @ self.W.T + self.b
            return pyro.sample("x", dist.Normal(loc, self.log_s.exp()).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc = (x - self.b) @ self.A.T + self.c
            scale_tril = torch.tril(self.L_raw)
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=scale_tril))

    def log_marginal(self, x):
        cov = self.W @ self.W.T + self.log_s.exp() ** 2 * torch.eye(self.W.shape[0])
        return dist.MultivariateNormal(self.b, cov).log_prob(x)

    @torch.no_grad()
    def set_guide_to_exact_posterior(self):
        s2 = self.log_s.exp() ** 2
        cov = torch.linalg.inv(torch.eye(self.latent_dim) + self.W.T @ self.W / s2)
        self.A.copy_(cov @ self.W.T / s2)
        self.c.zero_()
        self.L_raw.copy_(torch.linalg.cholesky(cov))


class GaussianMixture(PyroModule):
    """1-D mixture, c ~ Cat(w) enumerated, x | c ~ N(mu_c, sigma_c^2); the guide samples nothing."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.2, -0.3, 0.5]))
        self.mu = nn.Parameter(torch.tensor([-2.0, 0.5, 3.0]))
        self.log_sigma = nn.Parameter(torch.tensor([-0.5, 0.0, 0.3]))

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            c = pyro.sample("c", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
            return pyro.sample("x", dist.Normal(self.mu[c].unsqueeze(-1), self.log_sigma.exp()[c].unsqueeze(-1)).to_event(1), obs=x)

    def guide(self, x):
        pass


class MixtureWithContinuousLatent(PyroModule):
    """c ~ Cat(w) enumerated, u | c ~ N(mu_c, tau^2), x | u ~ N(u, s^2); guide q(u | x) Gaussian."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.0, 0.4]))
        self.mu = nn.Parameter(torch.tensor([-1.5, 1.5]))
        self.log_tau = nn.Parameter(torch.tensor(-0.3))
        self.log_s = nn.Parameter(torch.tensor(-0.5))
        self.a = nn.Parameter(torch.tensor(0.7))
        self.b0 = nn.Parameter(torch.tensor(0.0))
        self.log_q_scale = nn.Parameter(torch.tensor(-0.4))

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            c = pyro.sample("c", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
            u = pyro.sample("u", dist.Normal(self.mu[c].unsqueeze(-1), self.log_tau.exp()).to_event(1))
            return pyro.sample("x", dist.Normal(u, self.log_s.exp()).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("u", dist.Normal(self.a * x + self.b0, self.log_q_scale.exp()).to_event(1))

    def log_marginal(self, x):
        sd = (self.log_tau.exp() ** 2 + self.log_s.exp() ** 2).sqrt()
        comp = dist.Normal(self.mu, sd).log_prob(x) + torch.log_softmax(self.logits, -1)
        return torch.logsumexp(comp, -1)


class GlobalLatentModel(PyroModule):
    """A global latent (outside the data plate) whose guide is its prior: the predictive is N(0, 2)."""

    def model(self, x=None, num_samples=1):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).expand([1]).to_event(1), obs=x)

    def guide(self, x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))


def _data(lvm, n, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        return lvm.model(None, num_samples=n)


@pytest.fixture(scope="module")
def ppca():
    lvm = LinearGaussian()
    return lvm, _data(lvm, 60)


@pytest.fixture(scope="module")
def ppca_wide_guide():
    """PPCA whose guide has the posterior's mean and 1.5 times its scale: the weights are bounded."""
    lvm = LinearGaussian(seed=1)
    lvm.set_guide_to_exact_posterior()
    with torch.no_grad():
        lvm.L_raw.mul_(1.5)
    return lvm, _data(lvm, 60, seed=1)


@pytest.fixture(scope="module")
def mixture():
    lvm = GaussianMixture()
    return lvm, _data(lvm, 60)


@pytest.fixture(scope="module")
def mixture_continuous():
    lvm = MixtureWithContinuousLatent()
    return lvm, _data(lvm, 60)


def test_exact_ppca_matches_scipy(ppca):
    lvm, x = ppca
    est = estimate_log_marginal(lvm, x, "exact")
    W, b, s = lvm.W.detach().numpy(), lvm.b.detach().numpy(), lvm.log_s.exp().item()
    expected = scipy.stats.multivariate_normal(b, W @ W.T + s ** 2 * np.eye(3)).logpdf(x.numpy())
    np.testing.assert_allclose(est.per_point.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert est.log_px == pytest.approx(expected.mean(), abs=1e-5)
    assert est.stderr == pytest.approx(expected.std(ddof=1) / math.sqrt(len(expected)), rel=1e-4)


def test_exact_mixture_by_enumeration_matches_hand_logsumexp(mixture):
    lvm, x = mixture
    est = estimate_log_marginal(lvm, x, "exact", batch_size=7)
    assert est.extras["method"] == "enumeration"
    log_w = torch.log_softmax(lvm.logits, -1).detach().numpy()
    mu, sd = lvm.mu.detach().numpy(), lvm.log_sigma.exp().detach().numpy()
    expected = logsumexp(log_w + scipy.stats.norm.logpdf(x.numpy(), mu, sd), axis=1)
    np.testing.assert_allclose(est.per_point.numpy(), expected, rtol=1e-5, atol=1e-5)
    # The guide samples nothing, so every importance estimator is exact too.
    for name in ("elbo", "iwae", "is"):
        np.testing.assert_allclose(estimate_log_marginal(lvm, x, name, num_samples=3).per_point.numpy(),
                                   expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["ppca", "mixture_continuous"])
def test_is_agrees_with_exact_and_bounds_are_ordered(fixture, request):
    lvm, x = request.getfixturevalue(fixture)
    exact = estimate_log_marginal(lvm, x, "exact").per_point
    est_is = estimate_log_marginal(lvm, x, "is", num_samples=1000, seed=1)
    # Monte-Carlo standard error of the mean over points of (estimate - exact).
    diff = est_is.per_point - exact
    se = diff.std() / math.sqrt(len(diff)) + 1e-6
    assert abs(diff.mean()) < 3 * se + 0.01, (diff.mean(), se)
    assert set(est_is.extras) >= {"ess_mean", "khat_max", "khat_frac_above_0.7"}
    assert 1 <= est_is.extras["ess_mean"] <= 1000

    # elbo <= iwae(5) <= iwae(50) <= exact, in expectation; compare paired per-point means.
    elbo = estimate_log_marginal(lvm, x, "elbo", num_samples=200, seed=2).per_point
    iwae5 = torch.stack([estimate_log_marginal(lvm, x, "iwae", num_samples=5, seed=s).per_point
                         for s in range(20)]).mean(0)
    iwae50 = torch.stack([estimate_log_marginal(lvm, x, "iwae", num_samples=50, seed=s).per_point
                          for s in range(20, 30)]).mean(0)
    for lower, upper in ((elbo, iwae5), (iwae5, iwae50), (iwae50, exact)):
        d = upper - lower
        assert d.mean() > -3 * d.std() / math.sqrt(len(d)), (lower.mean(), upper.mean())


def test_elbo_is_exact_with_exact_posterior_guide():
    lvm = LinearGaussian(seed=3)
    lvm.set_guide_to_exact_posterior()
    x = _data(lvm, 40, seed=3)
    exact = estimate_log_marginal(lvm, x, "exact").per_point
    for name in ("elbo", "iwae", "is"):
        est = estimate_log_marginal(lvm, x, name, num_samples=10)
        np.testing.assert_allclose(est.per_point.numpy(), exact.numpy(), atol=2e-4)
    est = estimate_log_marginal(lvm, x, "is", num_samples=300)
    assert est.extras["ess_mean"] == pytest.approx(300, rel=1e-3)


def test_chunking_does_not_change_the_estimate(ppca, monkeypatch):
    lvm, x = ppca
    kwargs = dict(num_samples=300, batch_size=25, seed=7)  # 300 particles: three seed blocks, the last partial
    whole = estimate_log_marginal(lvm, x, "is", max_memory_mb=512, **kwargs)
    tiny = estimate_log_marginal(lvm, x, "is", max_memory_mb=0.02, **kwargs)
    assert whole.extras["max_chunk_particles"] == 300
    assert tiny.extras["max_chunk_particles"] < 100
    torch.testing.assert_close(tiny.per_point, whole.per_point, rtol=0, atol=1e-5)
    assert tiny.extras["ess_mean"] == pytest.approx(whole.extras["ess_mean"], rel=1e-5)

    # A chunk that runs out of memory is halved and retried; the estimate does not change.
    real = importance_sampling.model_chunk_log_weights
    calls = []

    def out_of_memory_above_37(model, xb, replay, log_q, *args):
        calls.append(log_q.shape[0])
        if log_q.shape[0] > 37:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, xb, replay, log_q, *args)

    monkeypatch.setattr(importance_sampling, "model_chunk_log_weights", out_of_memory_above_37)
    retried = estimate_log_marginal(lvm, x, "is", max_memory_mb=512, **kwargs)
    assert max(calls) > 37 and retried.extras["max_chunk_particles"] <= 37
    torch.testing.assert_close(retried.per_point, whole.per_point, rtol=0, atol=1e-5)


def test_seed_fixes_the_draws_and_leaves_the_callers_rng_alone(ppca):
    lvm, x = ppca
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = estimate_log_marginal(lvm, x, "iwae", num_samples=20, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    b = estimate_log_marginal(lvm, x, "iwae", num_samples=20, seed=4)
    c = estimate_log_marginal(lvm, x, "iwae", num_samples=20, seed=5)
    assert torch.equal(a.per_point, b.per_point) and not torch.equal(a.per_point, c.per_point)


def test_log_weights_are_differentiable_and_vectorized(mixture_continuous):
    lvm, x = mixture_continuous
    log_w = importance_log_weights(lvm, x[:9], 6)
    assert log_w.shape == (6, 9)
    log_w.sum().backward()
    assert lvm.a.grad is not None and lvm.mu.grad is not None


def test_bad_requests_raise_user_errors(ppca):
    lvm, x = ppca
    with pytest.raises(UserError, match="did you mean is"):
        estimate_log_marginal(lvm, x, "iss")
    with pytest.raises(UserError, match="at least 1"):
        estimate_log_marginal(lvm, x, "is", num_samples=0)

    class NoMarginal(LinearGaussian):
        log_marginal = None

    with pytest.raises(UserError, match="is, iwae, elbo or ais"):
        estimate_log_marginal(NoMarginal(), x, "exact")


def test_a_global_latent_gives_the_predictive_log_likelihood():
    """mu ~ N(0, 1), x | mu ~ N(mu, 1), q(mu) = N(0, 1): log E_q p(x | mu) = log N(x; 0, 2), labelled as such."""
    x = torch.linspace(-2.0, 2.0, 5).unsqueeze(-1)
    est = estimate_log_marginal(GlobalLatentModel(), x, "is", num_samples=4000, seed=0)
    exact = torch.tensor(scipy.stats.norm(0.0, math.sqrt(2.0)).logpdf(x.squeeze(-1).numpy()), dtype=torch.float32)
    # The weights p(x | mu_k) have a relative spread below 2 here, so 4000 draws give an error < 0.05 nats.
    torch.testing.assert_close(est.per_point, exact, atol=0.05, rtol=0)
    assert est.extras["quantity"].startswith("predictive") and est.extras["global_latents"] == ["mu"]
    # This program does not broadcast over particles (expand([1]) of a batched mu): it ran them one by one.
    assert est.extras["max_chunk_particles"] == 1
    with pytest.raises(UserError, match="global latents"):
        get_objective("iwae", particles=2, model_info=inspect_model(GlobalLatentModel(), x))


# ----- Monte Carlo standard errors -----

def test_weight_statistics_merge_exactly_and_give_the_delta_method_error():
    gen = torch.Generator().manual_seed(0)
    log_w = torch.randn(300, 4, generator=gen, dtype=torch.float64) * torch.tensor([0.1, 1.0, 2.0, 0.5]) - 50.0
    log_w[7, 3] = -math.inf  # a zero weight
    whole = WeightStatistics.from_log_weights(log_w)
    merged = WeightStatistics.from_log_weights(log_w[:1])
    for piece in (log_w[1:130], log_w[130:131], log_w[131:]):
        merged = merged.merge(WeightStatistics.from_log_weights(piece))
    for field in ("count", "lse", "lse2"):
        torch.testing.assert_close(getattr(merged, field), getattr(whole, field), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.estimate("mean_log")[:3], whole.estimate("mean_log")[:3], rtol=1e-12, atol=1e-12)
    assert merged.estimate("mean_log")[3] == -math.inf

    # Against numpy on the weights themselves: log of the mean weight, and the delta method
    # Var(log mean w) = s_w^2 / (K mean_w^2) with s_w the sample standard deviation.
    w = np.exp(log_w.numpy() + 50.0)
    K = w.shape[0]
    np.testing.assert_allclose(whole.estimate("log_mean_exp").numpy(), np.log(w.mean(0)) - 50.0, rtol=1e-12)
    delta = w.std(0, ddof=1) / (math.sqrt(K) * w.mean(0))
    np.testing.assert_allclose(whole.mc_stderr("log_mean_exp").numpy(), delta, rtol=1e-9)
    np.testing.assert_allclose(merged.mc_stderr("log_mean_exp").numpy(), delta, rtol=1e-9)
    sd_log = log_w[:, :3].numpy().std(0, ddof=1) / math.sqrt(K)
    np.testing.assert_allclose(whole.mc_stderr("mean_log")[:3].numpy(), sd_log, rtol=1e-9)
    np.testing.assert_allclose(merged.mc_stderr("mean_log")[:3].numpy(), sd_log, rtol=1e-9)
    # One weight says nothing about its own error.
    assert torch.isnan(WeightStatistics.from_log_weights(log_w[:1]).mc_stderr("log_mean_exp")).all()


@pytest.mark.parametrize("estimator", ["is", "elbo"])
def test_reported_mc_error_matches_the_spread_over_seeds_on_ppca(ppca_wide_guide, estimator):
    """The Monte Carlo standard error that ``is`` and ``elbo`` report for each point (and for the
    mean) is the standard deviation of the estimate over seeds, within the sampling error of that
    spread. The guide is wider than the posterior, so the weights have all their moments."""
    lvm, x = ppca_wide_guide
    estimates, errors, mean_errors = over_seeds(
        lambda seed: estimate_log_marginal(lvm, x, estimator, num_samples=100, seed=seed), range(40))
    assert_reported_error_matches_spread(estimates, errors, mean_errors)
    # Not vacuous: the errors are those of K = 100 particles, far from zero.
    assert 0.005 < float(errors.mean()) < 0.5


def test_mc_error_is_zero_for_exact_values_and_undefined_for_one_particle(ppca, mixture):
    lvm, x = ppca
    exact = estimate_log_marginal(lvm, x, "exact")
    assert exact.mc_stderr == 0.0 and bool((exact.per_point_mc_stderr == 0).all())
    one = estimate_log_marginal(lvm, x, "is", num_samples=1)
    assert torch.isnan(one.per_point_mc_stderr).all() and math.isnan(one.mc_stderr)
    mix, xm = mixture
    enumerated = estimate_log_marginal(mix, xm, "is", num_samples=50)
    assert enumerated.mc_stderr == 0.0 and enumerated.extras["exact_enumeration"] is True


def test_is_on_a_fully_enumerated_model_is_exact_without_drawing_particles(mixture, monkeypatch):
    """The guide draws nothing, so every particle would carry the same weight: one suffices."""
    lvm, x = mixture
    exact = estimate_log_marginal(lvm, x, "exact").per_point

    def no_particles(*args, **kwargs):
        raise AssertionError("particles were drawn for a model whose latents are all enumerated")

    monkeypatch.setattr(importance_sampling, "model_chunk_log_weights", no_particles)
    for name in ("is", "iwae", "elbo"):
        est = estimate_log_marginal(lvm, x, name, num_samples=10 ** 7)
        torch.testing.assert_close(est.per_point, exact, rtol=0, atol=1e-5)
        assert est.extras["ess_mean"] == pytest.approx(10 ** 7)
    assert est.samples_per_point.tolist() == [10 ** 7] * len(x)


# ----- --target-mc-error -----

def test_target_mc_error_doubles_particles_for_exactly_the_points_above_it(ppca):
    lvm, x = ppca
    K = 16
    plain = estimate_log_marginal(lvm, x, "is", num_samples=K, batch_size=25, seed=3)
    target = float(plain.per_point_mc_stderr.median())
    refined = estimate_log_marginal(lvm, x, "is", num_samples=K, batch_size=25, seed=3, target_mc_error=target,
                                    max_samples=64 * K)
    above = plain.per_point_mc_stderr > target
    samples = refined.samples_per_point
    assert 0 < int(above.sum()) < len(x)
    # The points at or below the target keep their K particles and their estimate, bit for bit.
    assert bool((samples[~above] == K).all())
    assert torch.equal(refined.per_point[~above], plain.per_point[~above])
    # The others doubled, once or more, and are now at the target or at the cap.
    assert bool((samples[above] >= 2 * K).all())
    assert all(s in {K * 2 ** r for r in range(7)} for s in samples.tolist())
    done = (refined.per_point_mc_stderr <= target) | (samples == 64 * K)
    assert bool(done.all())
    assert refined.extras["points_refined"] == int(above.sum())
    assert refined.extras["points_above_target"] == int((refined.per_point_mc_stderr > target).sum())
    assert refined.extras["samples_total"] == int(samples.sum())
    # More particles, the same quantity: the refined estimates agree with the exact values.
    exact = estimate_log_marginal(lvm, x, "exact").per_point
    diff = (refined.per_point - exact).double()
    assert abs(float(diff.mean())) < 4 * float(refined.mc_stderr) + 4 * float(diff.std()) / math.sqrt(len(x))
    assert refined.mc_stderr < plain.mc_stderr
    # Seeded: the same call gives the same numbers.
    again = estimate_log_marginal(lvm, x, "is", num_samples=K, batch_size=25, seed=3, target_mc_error=target,
                                  max_samples=64 * K)
    assert torch.equal(again.per_point, refined.per_point) and torch.equal(again.samples_per_point, samples)


def test_target_mc_error_stops_at_the_cap_and_refuses_what_it_cannot_do(ppca):
    lvm, x = ppca
    capped = estimate_log_marginal(lvm, x, "elbo", num_samples=4, target_mc_error=1e-9, max_samples=16)
    assert capped.samples_per_point.tolist() == [16] * len(x)
    assert capped.extras["points_above_target"] == len(x) and capped.extras["rounds"] == 3
    with pytest.raises(UserError, match="iwae bound changes with K"):
        estimate_log_marginal(lvm, x, "iwae", num_samples=4, target_mc_error=0.1)
    for bad in (0, -1.0, math.inf, math.nan, True):
        with pytest.raises(UserError, match="target-mc-error"):
            estimate_log_marginal(lvm, x, "is", num_samples=4, target_mc_error=bad)
    with pytest.raises(UserError, match="max-samples"):
        estimate_log_marginal(lvm, x, "is", num_samples=8, target_mc_error=0.1, max_samples=4)
    with pytest.raises(UserError, match="target-mc-error EPS as well"):
        estimate_log_marginal(lvm, x, "is", num_samples=8, max_samples=64)


# ----- dtype, options, progress -----

class DtypeFollowingLinearGaussian(LinearGaussian):
    """The PPCA above, with the prior's tensors made in the parameters' dtype."""

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(self.b.new_zeros(self.latent_dim), 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.log_s.exp()).to_event(1), obs=x)

    def log_marginal(self, x):
        cov = self.W @ self.W.T + self.log_s.exp() ** 2 * torch.eye(self.W.shape[0], dtype=self.W.dtype)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)


@pytest.mark.parametrize("estimator", ["elbo", "iwae", "is", "exact", "ais"])
def test_a_float64_model_gets_float64_values(estimator):
    lvm = DtypeFollowingLinearGaussian().double()
    x = _data(lvm, 12)
    assert x.dtype == torch.float64
    opts = {"ais_steps": 3, "leapfrog_steps": 2} if estimator == "ais" else {}
    est = estimate_log_marginal(lvm, x, estimator, num_samples=8, **opts)
    assert est.per_point.dtype == torch.float64 and est.per_point_mc_stderr.dtype == torch.float64
    exact = lvm.log_marginal(x).detach()
    if estimator == "exact":  # float64 all the way: equal to float64 rounding, not float32's
        torch.testing.assert_close(est.per_point, exact, rtol=1e-12, atol=1e-12)
    est32 = estimate_log_marginal(DtypeFollowingLinearGaussian(), x.float(), estimator, num_samples=8, **opts)
    assert est32.per_point.dtype == torch.float32


def test_ais_takes_the_seed_and_its_options_by_one_name(ppca):
    lvm, x = ppca
    options = {"ais_steps": 4, "leapfrog_steps": 2}
    first = estimate_log_marginal(lvm, x, "ais", num_samples=4, seed=1, **options)
    again = estimate_log_marginal(lvm, x, "ais", num_samples=4, seed=1, **options)
    other = estimate_log_marginal(lvm, x, "ais", num_samples=4, seed=2, **options)
    assert torch.equal(first.per_point, again.per_point)
    assert not torch.equal(first.per_point, other.per_point)
    assert first.extras["ais_steps"] == 4 and first.extras["num_chains"] == 4
    with pytest.raises(UserError, match="did you mean ais_steps"):
        estimate_log_marginal(lvm, x, "ais", num_samples=4, num_steps=4)
    with pytest.raises(UserError, match="they are AIS's"):
        estimate_log_marginal(lvm, x, "is", num_samples=4, ais_steps=4)
    assert set(ESTIMATORS) == {"elbo", "iwae", "is", "exact", "ais"}


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("estimator,options", [("is", {}), ("ais", {"ais_steps": 3, "leapfrog_steps": 2})])
def test_progress_bar_only_on_a_terminal(ppca, monkeypatch, estimator, options):
    lvm, x = ppca
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = Progress(True)
    estimate_log_marginal(lvm, x, estimator, num_samples=300, batch_size=20, progress=bar,
                          target_mc_error=1e-3, max_samples=600, **options)
    assert bar.bar.total > 0 and bar.bar.n == bar.bar.total  # all the work counted, refinement included
    bar.close()
    assert "evaluate" in terminal.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    estimate_log_marginal(lvm, x, "is", num_samples=300, batch_size=20, progress=False)
    assert quiet.getvalue() == ""
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    estimate_log_marginal(lvm, x, "is", num_samples=300, batch_size=20, progress=True)
    assert piped.getvalue() == ""


def test_per_point_khat_is_the_psis_khat_of_each_points_weights(ppca_wide_guide):
    """``is`` returns each point's k-hat (what ``report`` plots), whatever the chunk size: a tiny
    memory budget (chunks of a few particles) against all 64 particles at once."""
    lvm, x = ppca_wide_guide
    x = x[:10]
    whole = estimate_log_marginal(lvm, x, "is", num_samples=64, seed=4)
    # 50 KiB: all 64 weights of the 10 points are kept for k-hat (10 KiB), the particles run in chunks.
    chunked = estimate_log_marginal(lvm, x, "is", num_samples=64, seed=4, max_memory_mb=0.05)
    assert chunked.extras["max_chunk_particles"] < whole.extras["max_chunk_particles"]
    assert whole.per_point_khat.shape == (10,)
    assert torch.allclose(whole.per_point_khat, chunked.per_point_khat)
    assert float(whole.per_point_khat.max()) == pytest.approx(whole.extras["khat_max"])
    assert estimate_log_marginal(lvm, x, "elbo", num_samples=8).per_point_khat is None
