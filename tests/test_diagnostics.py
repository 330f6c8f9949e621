"""Diagnostics of latent usage on two models whose answers are known in closed form.

- A decoder that ignores z, with the guide equal to the prior: the textbook collapsed optimum.
  KL, active units and mutual information are exactly zero.
- Linear Gaussian p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I) with orthogonal columns of W, so the exact
  posterior is a diagonal Normal and the guide can equal it. With c_d = |W_d|^2 / s^2, per dimension:
  posterior variance v_d = 1/(1 + c_d), Var_x E[z_d|x] = 1 - v_d, and I(x; z_d) = 0.5 log(1 + c_d);
  since the aggregate posterior equals the prior, the rate equals the mutual information.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

import pyro_lvm  # noqa: F401
from pyro_lvm.diagnostics import diagnose_model

LATENT_DIM = 4
DATA_DIM = 6
NOISE = 0.5
SIGNAL = torch.tensor([3.0, 1.5, 0.6, 0.2])  # c_d = |W_d|^2 / s^2


class IgnoringDecoder(PyroModule):
    """p(x|z) = N(mu, sigma^2) whatever z; the guide is the prior."""

    def __init__(self, data_shape=(DATA_DIM,), latent_dim=LATENT_DIM):
        super().__init__()
        self.latent_dim = latent_dim
        self.loc = torch.nn.Parameter(torch.zeros(data_shape))

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent_dim]).to_event(1))
            pyro.sample("x", dist.Normal(self.loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0).to_event(1))


class LinearGaussian(PyroModule):
    """Probabilistic PCA with the exact posterior as its guide; ``guide_family`` swaps in other
    families with the same (or nearly the same) q, to exercise the Monte-Carlo paths."""

    def __init__(self, guide_family="normal"):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        basis, _ = torch.linalg.qr(torch.randn(DATA_DIM, DATA_DIM, generator=generator))
        self.register_buffer("weight", basis[:, :LATENT_DIM] * (SIGNAL.sqrt() * NOISE))
        self.register_buffer("bias", torch.randn(DATA_DIM, generator=generator))
        self.guide_family = guide_family

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT_DIM]).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.weight.T + self.bias, NOISE).to_event(1), obs=x)

    def posterior(self, x):
        variance = 1.0 / (1.0 + SIGNAL)
        loc = variance * ((x - self.bias) @ self.weight) / NOISE**2
        return loc, variance.sqrt().expand_as(loc)

    def guide(self, x):
        loc, scale = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            if self.guide_family == "normal":
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            elif self.guide_family == "studentt":  # no closed-form KL against a Normal
                pyro.sample("z", dist.StudentT(1e4, loc, scale).to_event(1))
            elif self.guide_family == "mvn":  # does not factorise
                pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)))

    def log_marginal(self, x):
        covariance = self.weight @ self.weight.T + NOISE**2 * torch.eye(DATA_DIM)
        return dist.MultivariateNormal(self.bias, covariance).log_prob(x)


def linear_gaussian_data(lvm, num_points, seed):
    # Data seeds differ from the diagnostics' seed (0): the same stream would make the guide's
    # noise equal to the data's z, and the codes would sit on the true latents.
    generator = torch.Generator().manual_seed(1000 + seed)
    z = torch.randn(num_points, LATENT_DIM, generator=generator)
    noise = torch.randn(num_points, DATA_DIM, generator=generator)
    return z @ lvm.weight.T + lvm.bias + NOISE * noise, z


MUTUAL_INFORMATION = 0.5 * torch.log1p(SIGNAL)  # I(x; z_d), nats


def test_decoder_that_ignores_z_is_collapsed():
    x = torch.randn(300, DATA_DIM)
    result = diagnose_model(IgnoringDecoder(), x, batch_size=128)
    assert result["kl_total"] == pytest.approx(0.0, abs=1e-6)
    assert result["kl_per_dim"] == pytest.approx([0.0] * LATENT_DIM, abs=1e-6)
    assert result["active_units"] == 0
    assert result["mutual_information"] == pytest.approx(0.0, abs=1e-5)
    assert result["collapsed"] is True
    assert result["verdict"].startswith("Posterior collapse: 0 of 4 units active")
    assert result["latent_sites"] == [{"name": "z", "event_shape": [LATENT_DIM], "dims": LATENT_DIM}]
    assert result["num_points"] == 300


def test_linear_gaussian_with_exact_posterior():
    torch.manual_seed(123)
    lvm = LinearGaussian()
    num_points = 2000
    x, z = linear_gaussian_data(lvm, num_points, seed=0)
    state = torch.get_rng_state()
    result = diagnose_model(lvm, x, labels=(z[:, 0] > 0).long(), batch_size=500)
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG must be left alone"

    # KL per dimension is analytic: 0.5 (v + mean_n m_n^2 - 1 - log v) on this very sample ...
    loc, scale = lvm.posterior(x)
    variance = scale[0] ** 2
    closed_form = 0.5 * (variance + (loc**2).mean(0) - 1 - variance.log())
    assert result["kl_analytic"] is True
    assert result["kl_per_dim"] == pytest.approx(closed_form.tolist(), rel=1e-5, abs=1e-6)
    assert result["rate"] == pytest.approx(closed_form.sum().item(), rel=1e-5)
    # ... and over the population it is I(x; z_d), up to sampling error over 2000 points.
    assert result["kl_per_dim"] == pytest.approx(MUTUAL_INFORMATION.tolist(), abs=0.05)

    assert result["active_units"] == LATENT_DIM
    assert result["active_unit_variances"] == pytest.approx((1 - variance).tolist(), abs=0.06)

    # I_hat is an InfoNCE lower bound capped at log N = 7.6 nats; with I = 1.48 nats << log N its bias
    # is of order (e^I - 1)/N ~ 2e-3, below the Monte-Carlo error of ~0.03 nats (one code per point:
    # the per-point terms have variance ~ I). Tolerance 0.1 nats: about three standard errors.
    assert result["mutual_information"] == pytest.approx(MUTUAL_INFORMATION.sum().item(), abs=0.1)
    assert result["marginal_kl"] == pytest.approx(0.0, abs=0.1)  # q(z) = p(z)
    assert result["collapsed"] is False
    assert result["verdict"].startswith("The latent code is used: 4 of 4 units active")

    # An exact posterior makes the ELBO equal log p(x); distortion is Monte Carlo (16 draws a point).
    assert result["elbo"] == pytest.approx(lvm.log_marginal(x).mean().item(), abs=0.05)
    assert result["elbo"] == pytest.approx(-(result["distortion"] + result["rate"]))
    # sign(z_1) from E[z_1|x]: the posterior sd is 0.5, so about 80% are predictable, against 50%.
    assert result["label_probe_accuracy"] > 0.75 > 0.6 > result["label_chance_accuracy"]


def test_mutual_information_does_not_depend_on_batch_size():
    lvm = LinearGaussian()
    x, _ = linear_gaussian_data(lvm, 600, seed=1)
    small = diagnose_model(lvm, x, batch_size=37)
    large = diagnose_model(lvm, x, batch_size=600)
    assert small["mutual_information"] == large["mutual_information"]
    assert small["kl_per_dim"] == pytest.approx(large["kl_per_dim"], rel=1e-5)
    assert small["active_unit_variances"] == pytest.approx(large["active_unit_variances"], rel=1e-5)


@pytest.mark.parametrize("guide_family", ["studentt", "mvn"])
def test_monte_carlo_kl_for_guides_without_closed_form(guide_family):
    lvm = LinearGaussian(guide_family)
    x, _ = linear_gaussian_data(lvm, 1000, seed=2)
    result = diagnose_model(lvm, x, num_kl_samples=64)
    assert result["kl_analytic"] is False
    expected = MUTUAL_INFORMATION.sum().item()
    assert result["kl_total"] == pytest.approx(expected, abs=0.08)
    assert result["mutual_information"] == pytest.approx(expected, abs=0.12)
    assert result["active_units"] == LATENT_DIM
    if guide_family == "studentt":  # factorised: per-dimension KL by Monte Carlo
        assert result["kl_per_dim"] == pytest.approx(MUTUAL_INFORMATION.tolist(), abs=0.05)
    else:  # a MultivariateNormal does not factorise: per-dimension KL is undefined
        assert result["kl_per_dim"] == [None] * LATENT_DIM


def test_importance_sampled_log_marginal_closes_the_gap():
    estimators = pytest.importorskip("pyro_lvm.estimators")
    if not hasattr(estimators, "estimate_log_marginal"):
        pytest.skip("pyro_lvm.estimators.estimate_log_marginal is not written yet")
    lvm = LinearGaussian()
    x, _ = linear_gaussian_data(lvm, 200, seed=3)
    result = diagnose_model(lvm, x, is_samples=32)
    # With the exact posterior as proposal every weight equals p(x): the gap KL(q || p(z|x)) is 0.
    assert result["is_log_px"] == pytest.approx(lvm.log_marginal(x).mean().item(), abs=1e-3)
    assert result["elbo_gap"] == pytest.approx(0.0, abs=0.05)
