"""Annealed importance sampling and BDMC against exact and numerically integrated log p(x).

The test models live here, not in the zoo, so that these tests check the estimator alone.
Tolerances are a few standard errors of the mean over data points of (estimate - truth).
"""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from pyro_lvm.errors import UserError
from pyro_lvm.estimators.ais import annealed_importance_log_marginal, annealing_schedule, bdmc


class LinearGaussian(PyroModule):
    """PPCA with known parameters: p(z) = N(0, I_2), p(x|z) = N(Wz + b, s^2 I_5); the guide is the
    exact posterior, q(z|x) = N(S W^T (x - b) / s^2, S) with S = (I + W^T W / s^2)^-1."""

    def __init__(self, data_shape=(5,), latent_dim=2, noise_scale=0.5):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.register_buffer("weight", torch.randn(data_shape[0], latent_dim, generator=generator))
        self.register_buffer("bias", torch.randn(data_shape[0], generator=generator))
        self.noise_scale = noise_scale
        self.latent_dim = latent_dim

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.latent_dim), 1.0).to_event(1))
            loc = z @ self.weight.T + self.bias
            pyro.sample("x", dist.Normal(loc, self.noise_scale).to_event(1), obs=x)

    def posterior(self, x):
        precision = torch.eye(self.latent_dim) + self.weight.T @ self.weight / self.noise_scale**2
        covariance = torch.linalg.inv(precision)
        loc = (x - self.bias) @ self.weight @ covariance / self.noise_scale**2
        return dist.MultivariateNormal(loc, covariance_matrix=covariance)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.posterior(x))

    def log_marginal(self, x):
        covariance = self.weight @ self.weight.T + self.noise_scale**2 * torch.eye(self.weight.shape[0])
        return dist.MultivariateNormal(self.bias, covariance_matrix=covariance).log_prob(x)


class SplitLinearGaussian(LinearGaussian):
    """The same PPCA with its two latent coordinates as two sites, to test flattening of sites."""

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            first = pyro.sample("first", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            second = pyro.sample("second", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            loc = torch.cat([first, second], dim=-1) @ self.weight.T + self.bias
            pyro.sample("x", dist.Normal(loc, self.noise_scale).to_event(1), obs=x)

    def guide(self, x):
        pass


class MixtureOfMeans(PyroModule):
    """k ~ Categorical(w) (enumerated), z ~ N(mu_k, 1), x ~ N(z, s_k^2): x depends on k and z."""

    def __init__(self, data_shape=(1,)):
        super().__init__()
        self.register_buffer("weights", torch.tensor([0.3, 0.7]))
        self.register_buffer("locs", torch.tensor([-2.0, 2.0]))
        self.register_buffer("noise_scales", torch.tensor([0.3, 0.6]))

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            k = pyro.sample("k", dist.Categorical(self.weights), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(self.locs[k].unsqueeze(-1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, self.noise_scales[k].unsqueeze(-1)).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(1), 2.0).to_event(1))

    def log_marginal_by_quadrature(self, x):
        z = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
        x = x.double().reshape(-1, 1, 1)  # [n, 1, 1] against z [grid] and k [2, 1]
        log_integrand = (
            self.weights.double().log().unsqueeze(-1)
            + dist.Normal(self.locs.double().unsqueeze(-1), 1.0).log_prob(z)
            + dist.Normal(z, self.noise_scales.double().unsqueeze(-1)).log_prob(x)
        ).logsumexp(-2)
        return torch.trapezoid(log_integrand.exp(), z).log()


class GammaLatent(PyroModule):
    """A positive latent: z ~ Gamma(2, 1), x ~ N(z, 0.5^2); HMC runs on log z."""

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Gamma(torch.full((1,), 2.0), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.LogNormal(torch.zeros(1), 1.0).to_event(1))

    def log_marginal_by_quadrature(self, x):
        z = torch.linspace(1e-6, 30.0, 60001, dtype=torch.float64)
        log_integrand = dist.Gamma(2.0, 1.0).log_prob(z) + dist.Normal(z, 0.5).log_prob(x.double().reshape(-1, 1))
        return torch.trapezoid(log_integrand.exp(), z).log()


class EnumeratedOnly(PyroModule):
    """A two-component 1-D mixture: the only latent is enumerated, so log p(x) is exact."""

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            k = pyro.sample("k", dist.Categorical(torch.tensor([0.4, 0.6])), infer={"enumerate": "parallel"})
            loc = torch.tensor([-1.0, 3.0])[k].unsqueeze(-1)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pass


class GlobalLatent(PyroModule):
    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + shift, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pass


def _simulate(lvm, num_points, seed):
    torch.manual_seed(seed)
    trace = pyro.poutine.trace(lvm.model).get_trace(None, num_samples=num_points)
    return trace.nodes["x"]["value"].detach()


def _assert_close_in_mean(estimate, truth, num_se=4.0, floor=1e-3, max_standard_error=0.08):
    """Mean error within ``num_se`` standard errors; and the errors' spread itself small, since a
    wrong transition kernel (a missing Jacobian, say) shows up as noisier weights as well as bias."""
    difference = (estimate - truth).double()
    standard_error = difference.std() / math.sqrt(difference.numel())
    assert standard_error < max_standard_error, f"standard error {standard_error.item():.4f}"
    assert abs(difference.mean().item()) < num_se * standard_error.item() + floor, (
        f"mean error {difference.mean().item():.4f}, standard error {standard_error.item():.4f}"
    )


def test_sigmoid_schedule_ends_and_increases():
    betas = annealing_schedule(50)
    assert betas[0] == 0.0 and betas[-1] == 1.0 and len(betas) == 51
    assert bool((betas.diff() > 0).all())
    # Denser near the ends than in the middle.
    assert betas.diff()[0] < betas.diff()[25] and betas.diff()[-1] < betas.diff()[25]
    with pytest.raises(UserError):
        annealing_schedule(10, "cosine")


def test_ais_from_prior_matches_exact_ppca():
    lvm = LinearGaussian()
    x = _simulate(lvm, 20, seed=0)
    estimate, extras = annealed_importance_log_marginal(
        lvm, x, num_chains=16, num_steps=200, leapfrog_steps=5, hmc_step_size=0.2
    )
    exact = lvm.log_marginal(x)
    assert estimate.shape == (20,)
    _assert_close_in_mean(estimate, exact)
    # 16 chains of 200 steps: each point within a few tenths of a nat (per-chain log-weight sd ~0.3).
    assert (estimate - exact).abs().max() < 0.75
    assert set(extras) >= {"num_chains", "num_steps", "acceptance_rate", "step_size_mean", "log_weight_ess"}
    assert 0.3 < extras["acceptance_rate"] < 1.0
    assert extras["num_chains"] == 16 and extras["num_steps"] == 200
    json.dumps(extras)


def test_ais_flattens_several_latent_sites():
    lvm = SplitLinearGaussian()
    x = _simulate(lvm, 20, seed=6)
    estimate, _ = annealed_importance_log_marginal(
        lvm, x, num_chains=16, num_steps=200, leapfrog_steps=5, hmc_step_size=0.2
    )
    _assert_close_in_mean(estimate, lvm.log_marginal(x))


def test_ais_from_exact_posterior_guide_is_exact():
    # With p0 = p(z|x), every intermediate density is p(x)^beta p(z|x), so every weight is p(x).
    lvm = LinearGaussian()
    x = _simulate(lvm, 10, seed=1)
    estimate, extras = annealed_importance_log_marginal(
        lvm, x, num_chains=4, num_steps=10, proposal="guide", leapfrog_steps=3
    )
    assert torch.allclose(estimate, lvm.log_marginal(x), atol=1e-4)
    assert extras["log_weight_ess"] == pytest.approx(4.0, rel=1e-3)


def test_ais_is_seeded_and_leaves_caller_rng_alone():
    lvm = LinearGaussian()
    x = _simulate(lvm, 5, seed=2)
    state = torch.get_rng_state()
    first, _ = annealed_importance_log_marginal(lvm, x, num_chains=4, num_steps=5, leapfrog_steps=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = annealed_importance_log_marginal(lvm, x, num_chains=4, num_steps=5, leapfrog_steps=2, seed=3)
    assert torch.equal(first, second)


def test_bdmc_sandwiches_exact_and_gap_shrinks():
    lvm = LinearGaussian()
    results = {
        steps: bdmc(lvm, num_points=20, num_chains=4, num_steps=steps, seed=0, leapfrog_steps=5, hmc_step_size=0.2)
        for steps in (5, 100)
    }
    for result in results.values():
        exact = torch.tensor(result["per_point_exact"], dtype=torch.float64)
        lower_error = torch.tensor(result["per_point_lower"], dtype=torch.float64) - exact
        upper_error = torch.tensor(result["per_point_upper"], dtype=torch.float64) - exact
        # Stochastic bounds: each holds in expectation, so up to a few standard errors.
        assert lower_error.mean() <= 3 * lower_error.std() / math.sqrt(lower_error.numel()) + 1e-3
        assert upper_error.mean() >= -3 * upper_error.std() / math.sqrt(upper_error.numel()) - 1e-3
        assert result["gap"] == pytest.approx(result["upper"] - result["lower"])
        assert result["num_points"] == 20 and result["num_chains"] == 4
        json.dumps(result)
    # The same seed simulates the same points for both step counts.
    assert results[5]["exact"] == results[100]["exact"]
    # Both bounds are stochastic, so a long run's small gap may come out slightly negative.
    assert abs(results[100]["gap"]) < 0.2 < results[5]["gap"]


def test_ais_sums_out_enumerated_latent_against_quadrature():
    lvm = MixtureOfMeans()
    x = _simulate(lvm, 20, seed=4)
    estimate, _ = annealed_importance_log_marginal(
        lvm, x, num_chains=16, num_steps=200, leapfrog_steps=5, hmc_step_size=0.2
    )
    _assert_close_in_mean(estimate, lvm.log_marginal_by_quadrature(x))


def test_ais_on_positive_latent_against_quadrature():
    lvm = GammaLatent()
    x = _simulate(lvm, 20, seed=5)
    estimate, _ = annealed_importance_log_marginal(
        lvm, x, num_chains=16, num_steps=200, leapfrog_steps=5, hmc_step_size=0.2
    )
    _assert_close_in_mean(estimate, lvm.log_marginal_by_quadrature(x))


def test_only_enumerated_latents_gives_exact_log_marginal():
    lvm = EnumeratedOnly()
    x = torch.tensor([[-1.0], [0.5], [3.0]])
    estimate, extras = annealed_importance_log_marginal(lvm, x)
    truth = torch.stack(
        [dist.Normal(torch.tensor([-1.0, 3.0]), 1.0).log_prob(v) + torch.tensor([0.4, 0.6]).log() for v in x[:, 0]]
    ).logsumexp(-1)
    assert torch.allclose(estimate, truth, atol=1e-5)
    assert extras["exact_enumeration"] is True


def test_global_latent_is_refused():
    lvm = GlobalLatent()
    with pytest.raises(UserError, match="global"):
        annealed_importance_log_marginal(lvm, torch.zeros(3, 1), num_steps=2)
    with pytest.raises(UserError, match="global"):
        bdmc(lvm, num_points=3, num_steps=2)


def test_bad_options_are_refused():
    lvm = LinearGaussian()
    x = torch.zeros(2, 5)
    with pytest.raises(UserError, match="proposal"):
        annealed_importance_log_marginal(lvm, x, proposal="posterior", num_steps=2)
    with pytest.raises(UserError, match="num_steps"):
        annealed_importance_log_marginal(lvm, x, num_steps=0)
    with pytest.raises(UserError, match="unknown BDMC options"):
        bdmc(lvm, num_points=2, num_steps=2, step_size=0.1)
