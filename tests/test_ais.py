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
from pyro_lvm.estimators.ais import _AnnealingTarget, annealed_importance_log_marginal, annealing_schedule, bdmc


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
        lvm, x, num_chains=16, ais_steps=200, leapfrog_steps=5, hmc_step_size=0.2
    )
    exact = lvm.log_marginal(x)
    assert estimate.shape == (20,)
    _assert_close_in_mean(estimate, exact)
    # 16 chains of 200 steps: each point within a few tenths of a nat (per-chain log-weight sd ~0.3).
    assert (estimate - exact).abs().max() < 0.75
    assert set(extras) >= {"num_chains", "ais_steps", "acceptance_rate", "step_size_mean", "log_weight_ess"}
    assert 0.3 < extras["acceptance_rate"] < 1.0
    assert extras["num_chains"] == 16 and extras["ais_steps"] == 200
    json.dumps(extras)


def test_ais_flattens_several_latent_sites():
    lvm = SplitLinearGaussian()
    x = _simulate(lvm, 20, seed=6)
    estimate, _ = annealed_importance_log_marginal(
        lvm, x, num_chains=16, ais_steps=200, leapfrog_steps=5, hmc_step_size=0.2
    )
    _assert_close_in_mean(estimate, lvm.log_marginal(x))


def test_ais_from_exact_posterior_guide_is_exact():
    # With p0 = p(z|x), every intermediate density is p(x)^beta p(z|x), so every weight is p(x).
    lvm = LinearGaussian()
    x = _simulate(lvm, 10, seed=1)
    estimate, extras = annealed_importance_log_marginal(
        lvm, x, num_chains=4, ais_steps=10, proposal="guide", leapfrog_steps=3
    )
    assert torch.allclose(estimate, lvm.log_marginal(x), atol=1e-4)
    assert extras["log_weight_ess"] == pytest.approx(4.0, rel=1e-3)


def test_ais_is_seeded_and_leaves_caller_rng_alone():
    lvm = LinearGaussian()
    x = _simulate(lvm, 5, seed=2)
    state = torch.get_rng_state()
    first, _ = annealed_importance_log_marginal(lvm, x, num_chains=4, ais_steps=5, leapfrog_steps=2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = annealed_importance_log_marginal(lvm, x, num_chains=4, ais_steps=5, leapfrog_steps=2, seed=3)
    assert torch.equal(first, second)


def test_bdmc_sandwiches_exact_and_gap_shrinks():
    lvm = LinearGaussian()
    results = {
        steps: bdmc(lvm, num_points=20, num_chains=4, ais_steps=steps, seed=0, leapfrog_steps=5, hmc_step_size=0.2)
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
        lvm, x, num_chains=16, ais_steps=200, leapfrog_steps=5, hmc_step_size=0.2
    )
    _assert_close_in_mean(estimate, lvm.log_marginal_by_quadrature(x))


def test_ais_on_positive_latent_against_quadrature():
    lvm = GammaLatent()
    x = _simulate(lvm, 20, seed=5)
    estimate, _ = annealed_importance_log_marginal(
        lvm, x, num_chains=16, ais_steps=200, leapfrog_steps=5, hmc_step_size=0.2
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
        annealed_importance_log_marginal(lvm, torch.zeros(3, 1), ais_steps=2)
    with pytest.raises(UserError, match="global"):
        bdmc(lvm, num_points=3, ais_steps=2)


def test_bad_options_are_refused():
    lvm = LinearGaussian()
    x = torch.zeros(2, 5)
    with pytest.raises(UserError, match="proposal"):
        annealed_importance_log_marginal(lvm, x, proposal="posterior", ais_steps=2)
    with pytest.raises(UserError, match="ais_steps"):
        annealed_importance_log_marginal(lvm, x, ais_steps=0)
    with pytest.raises(UserError, match="unknown BDMC options"):
        bdmc(lvm, num_points=2, ais_steps=2, step_size=0.1)


# ----- the densities: the light recorder against Pyro's traces, and against closed forms -----

def _densities(target, u, beta, grad="beta"):
    return target.log_densities(u.clone(), beta, grad=grad)


@pytest.mark.parametrize("model_class,proposal", [(LinearGaussian, "prior"), (LinearGaussian, "guide"),
                                                  (SplitLinearGaussian, "prior"), (GammaLatent, "prior"),
                                                  (GammaLatent, "guide")])
def test_recorded_densities_and_gradients_equal_those_through_pyro_traces(model_class, proposal):
    """Bit for bit: the recorder runs the same program and Pyro's own log densities, in trace order."""
    lvm = model_class()
    x = _simulate(lvm, 7, seed=8)
    fast = _AnnealingTarget(lvm, x, 3, proposal)
    traced = _AnnealingTarget(lvm, x, 3, proposal, use_traces=True)
    assert not fast.use_traces and traced.use_traces
    u = torch.randn(3, 7, fast.latent_dim, generator=torch.Generator().manual_seed(0))
    for beta in (0.0, 0.37, 1.0):
        for got, expected in zip(_densities(fast, u, beta), _densities(traced, u, beta)):
            assert torch.equal(got, expected)
    # The gradient pair at one state gives the gradient at every beta (to rounding).
    a0, a1, (grad_a0, grad_a1) = _densities(fast, u, None, grad="both")
    for beta in (0.0, 0.37, 1.0):
        _, _, grad = _densities(fast, u, beta)
        torch.testing.assert_close((1 - beta) * grad_a0 + beta * grad_a1, grad, rtol=1e-5, atol=1e-5)


def test_recorded_densities_of_ppca_equal_the_closed_form():
    lvm = LinearGaussian()
    x = _simulate(lvm, 6, seed=9)
    target = _AnnealingTarget(lvm, x, 4, "prior")
    z = torch.randn(4, 6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a0, a1, grad = _densities(target, z.float(), 0.25)
    log_prior = -0.5 * z.pow(2).sum(-1) - math.log(2 * math.pi)
    residual = x.double() - (z @ lvm.weight.double().T + lvm.bias.double())
    s2 = lvm.noise_scale ** 2
    log_lik = -0.5 * residual.pow(2).sum(-1) / s2 - 2.5 * math.log(2 * math.pi * s2)
    grad_expected = -z + 0.25 * (residual / s2) @ lvm.weight.double()
    torch.testing.assert_close(a0.double(), log_prior, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(a1.double(), log_prior + log_lik, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.double(), grad_expected, rtol=1e-4, atol=1e-4)


def test_enumerated_models_go_through_traces():
    lvm = MixtureOfMeans()
    target = _AnnealingTarget(lvm, _simulate(lvm, 5, seed=2), 3, "prior")
    assert target.use_traces and target.enumerated_names == ["k"]


class LinearGaussian64(LinearGaussian):
    """The PPCA above in float64."""

    def __init__(self):
        super().__init__()
        self.double()

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(self.bias.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.weight.T + self.bias, self.noise_scale).to_event(1), obs=x)


def _reference_ais(lvm, x, u, betas, step_size, num_leapfrog):
    """AIS as written by hand for PPCA, closed-form densities, the model's gradient recomputed at
    every temperature; the same integrator, Metropolis step and step-size rule as ais.py."""
    def densities(z, beta):
        residual = x - (z @ lvm.weight.T + lvm.bias)
        s2 = lvm.noise_scale ** 2
        log_prior = -0.5 * z.pow(2).sum(-1) - math.log(2 * math.pi)
        log_lik = -0.5 * residual.pow(2).sum(-1) / s2 - 0.5 * x.shape[-1] * math.log(2 * math.pi * s2)
        return log_prior, log_lik, -z + beta * (residual / s2) @ lvm.weight

    log_w = torch.zeros(u.shape[:2], dtype=u.dtype)
    eps = torch.full(u.shape[1:2], step_size, dtype=u.dtype)
    betas = betas.tolist()
    for t in range(1, len(betas)):
        beta = betas[t]
        log_prior, log_lik, grad = densities(u, beta)
        log_w = log_w + (beta - betas[t - 1]) * log_lik
        if t == len(betas) - 1:
            break
        e = eps.unsqueeze(-1)
        momentum = torch.randn_like(u)
        energy = -(log_prior + beta * log_lik) + 0.5 * momentum.pow(2).sum(-1)
        p, u_new = momentum + 0.5 * e * grad, u
        for step in range(num_leapfrog):
            u_new = u_new + e * p
            prior_new, lik_new, grad = densities(u_new, beta)
            p = p + (e if step < num_leapfrog - 1 else 0.5 * e) * grad
        energy_new = -(prior_new + beta * lik_new) + 0.5 * p.pow(2).sum(-1)
        accept_prob = (energy - energy_new).clamp(max=0.0).exp()
        accept = torch.rand_like(accept_prob) < accept_prob
        u = torch.where(accept.unsqueeze(-1), u_new, u)
        eps = (eps * torch.where(accept_prob.mean(0) > 0.65, 1.02, 1 / 1.02)).clamp(1e-4, 0.5)
    return log_w


def test_annealing_equals_a_hand_written_ais_with_the_same_draws():
    """The whole pass (recorded densities, gradient pairs carried from one temperature to the next,
    step sizes) equals a plain closed-form AIS fed the same random numbers, in float64."""
    from pyro_lvm.estimators.ais import _anneal, _seeded

    lvm = LinearGaussian64()
    x = _simulate(lvm, 10, seed=3)
    betas = annealing_schedule(15)
    target = _AnnealingTarget(lvm, x, 6, "prior")
    u = target.sample_proposal()
    with _seeded(x.device, 11):
        log_w, stats = _anneal(target, u, betas, 0.2, 4, adapt_step_size=True)
    with _seeded(x.device, 11), torch.no_grad():
        expected = _reference_ais(lvm, x, u, betas, 0.2, 4)
    assert log_w.dtype == torch.float64
    torch.testing.assert_close(log_w, expected, rtol=1e-9, atol=1e-9)
    assert 0.3 < stats["acceptance_rate"] < 1.0


# ----- seeds, batches and Monte Carlo error -----

def test_batches_are_seeded_by_their_index_and_independent_of_the_others():
    lvm = LinearGaussian()
    x = _simulate(lvm, 12, seed=4)
    options = dict(num_chains=4, ais_steps=4, leapfrog_steps=2)
    batched, _ = annealed_importance_log_marginal(lvm, x, batch_size=5, seed=6, **options)
    first_batch, _ = annealed_importance_log_marginal(lvm, x[:5], batch_size=5, seed=6, **options)
    assert torch.equal(batched[:5], first_batch)
    other_seed, _ = annealed_importance_log_marginal(lvm, x, batch_size=5, seed=7, **options)
    assert not torch.equal(batched, other_seed)


class WideGuideLinearGaussian(LinearGaussian):
    """The PPCA above with a guide of the posterior's mean and twice its scale."""

    def guide(self, x):
        posterior = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            wide = dist.MultivariateNormal(posterior.loc, covariance_matrix=4.0 * posterior.covariance_matrix)
            pyro.sample("z", wide)


def test_ais_reported_mc_error_matches_the_spread_over_seeds_on_ppca():
    """The chains' delta-method error of each point's AIS estimate (and of the mean over points) is
    its standard deviation over seeds, within the sampling error of that spread.

    The delta method is a large-K approximation: it holds where the chains' weights have a moderate
    spread, as here (AIS from a guide twice as wide as the posterior, 64 chains). From the prior with
    a few steps the weights are heavy-tailed, and 32 chains then understate the error by a factor
    of about 1.4 (8 steps: the spread over seeds is twice the reported variance)."""
    from montecarlo_helpers import assert_reported_error_matches_spread, over_seeds
    from pyro_lvm.estimators import estimate_log_marginal

    lvm = WideGuideLinearGaussian()
    x = _simulate(lvm, 40, seed=10)
    options = dict(num_samples=64, ais_steps=4, leapfrog_steps=2, hmc_step_size=0.2, proposal="guide")
    estimates, errors, mean_errors = over_seeds(
        lambda seed: estimate_log_marginal(lvm, x, "ais", seed=seed, **options), range(30))
    assert_reported_error_matches_spread(estimates, errors, mean_errors)
    assert 0.02 < float(errors.mean()) < 0.5


def test_target_mc_error_adds_chains_for_exactly_the_points_above_it():
    from pyro_lvm.estimators import estimate_log_marginal

    lvm = LinearGaussian()
    x = _simulate(lvm, 24, seed=12)
    options = dict(num_samples=4, ais_steps=3, leapfrog_steps=2, batch_size=10, seed=5)
    plain = estimate_log_marginal(lvm, x, "ais", **options)
    target = float(plain.per_point_mc_stderr.median())
    refined = estimate_log_marginal(lvm, x, "ais", target_mc_error=target, max_samples=32, **options)
    above = plain.per_point_mc_stderr > target
    assert 0 < int(above.sum()) < len(x)
    assert torch.equal(refined.per_point[~above], plain.per_point[~above])
    assert bool((refined.samples_per_point[~above] == 4).all()) and bool((refined.samples_per_point[above] >= 8).all())
    assert bool(((refined.per_point_mc_stderr <= target) | (refined.samples_per_point == 32)).all())
    assert refined.extras["points_refined"] == int(above.sum()) and refined.extras["num_chains"] == 4
