"""Remedies for posterior collapse: KL warm-up and free bits (pyro_lvm/objectives/regularized.py)."""
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from helpers import SMALL_VAE, cli
from pyro.nn import PyroModule
from torch import nn

from pyro_lvm.errors import UserError
from pyro_lvm.objectives import get_objective
from pyro_lvm.objectives.regularized import RegularizedELBO, kl_weight
from pyro_lvm.protocol import DataPlateScale


class LinearGaussian(PyroModule):
    """z ~ N(0, I_2), x ~ N(W z + b, 1) in D=3; guide N(A x + c, softplus(s)) with free parameters."""

    def __init__(self, decoder_uses_z=True):
        super().__init__()
        torch.manual_seed(1)
        self.W = nn.Parameter(torch.randn(3, 2) if decoder_uses_z else torch.zeros(3, 2), requires_grad=decoder_uses_z)
        self.b = nn.Parameter(torch.randn(3))
        self.A = nn.Parameter(0.3 * torch.randn(2, 3))
        self.c = nn.Parameter(torch.tensor([2.0, 0.1]))
        self.s = nn.Parameter(torch.tensor([0.2, -0.3]))
        self.drawn = []

    def guide_params(self, x):
        return x @ self.A.T + self.c, nn.functional.softplus(self.s).expand(x.shape[0], 2)

    def model(self, x=None, num_samples=1):
        with pyro.plate("data", x.shape[0] if x is not None else num_samples):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, 1.0).to_event(1), obs=x)

    def guide(self, x):
        loc, scale = self.guide_params(x)
        with pyro.plate("data", x.shape[0]):
            self.drawn.append(pyro.sample("z", dist.Normal(loc, scale).to_event(1)))


def _hand_terms(lvm, x, z):
    """(sum_n log p(x_n | z_n), sum_n KL(q(z|x_n) || p(z))) written out by hand."""
    mean = z @ lvm.W.T + lvm.b
    loglik = (-0.5 * (x - mean) ** 2 - 0.5 * math.log(2 * math.pi)).sum()
    m, s = lvm.guide_params(x)
    kl = (0.5 * (s ** 2 + m ** 2 - 1) - torch.log(s)).sum()
    return loglik, kl


def test_beta_schedule_values():
    assert kl_weight(0, 100) == 0.0 and kl_weight(25, 100) == 0.25 and kl_weight(50, 100) == 0.5
    assert kl_weight(100, 100) == 1.0 and kl_weight(10_000, 100) == 1.0
    assert kl_weight(0, 0) == 1.0 and kl_weight(7, 0) == 1.0  # off
    assert kl_weight(0, 10, start=0.2) == pytest.approx(0.2) and kl_weight(5, 10, start=0.2) == pytest.approx(0.6)
    objective = get_objective("meanfield", kl_warmup=40)
    assert isinstance(objective, RegularizedELBO) and objective.beta == 0.0
    objective.set_step(10)
    assert objective.beta == 0.25
    objective.set_step(40)
    assert objective.beta == 1.0
    # no remedy: the plain objectives, untouched
    assert not isinstance(get_objective("elbo"), RegularizedELBO)


@pytest.mark.parametrize("base", ["elbo", "meanfield"])
def test_warmup_step_zero_drops_the_kl_term_and_loss_stays_the_elbo(base):
    lvm = LinearGaussian()
    x = torch.randn(5, 3)
    objective = get_objective(base, kl_warmup=100)
    objective.set_step(0)
    surrogate = objective.surrogate_loss(lvm.model, lvm.guide, x)
    loglik, kl = _hand_terms(lvm, x, lvm.drawn[-1])
    assert surrogate.item() == pytest.approx(-loglik.item(), rel=1e-5)  # beta = 0: only the likelihood

    # differentiable_loss: value = the true negative ELBO, gradient = the surrogate's (beta = 0 here)
    lvm.drawn.clear()
    loss = objective.differentiable_loss(lvm.model, lvm.guide, x)
    z = lvm.drawn[-1]
    loglik, kl = _hand_terms(lvm, x, z)
    if base == "meanfield":
        assert loss.item() == pytest.approx((kl - loglik).item(), rel=1e-5)
    else:  # Monte Carlo KL at the guide's draw
        m, s = lvm.guide_params(x)
        mc_kl = (dist.Normal(m, s).log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z)).sum()
        assert loss.item() == pytest.approx((mc_kl - loglik).item(), rel=1e-5)
    grads = torch.autograd.grad(loss, [lvm.c, lvm.s], retain_graph=True)
    hand = torch.autograd.grad(-_hand_terms(lvm, x, z)[0], [lvm.c, lvm.s])
    for got, want in zip(grads, hand):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    # after the warm-up, the surrogate is the plain negative ELBO (analytic KL for meanfield)
    objective.set_step(100)
    lvm.drawn.clear()
    surrogate = objective.surrogate_loss(lvm.model, lvm.guide, x)
    if base == "meanfield":
        loglik, kl = _hand_terms(lvm, x, lvm.drawn[-1])
        assert surrogate.item() == pytest.approx((kl - loglik).item(), rel=1e-5)
    # the validation bound (loss) is the plain negative ELBO at any step
    plain_objective = get_objective(base)
    plain_objective.loss(lvm.model, lvm.guide, x)  # objectives set themselves up at the first call
    pyro.set_rng_seed(3)
    with_warmup = objective.loss(lvm.model, lvm.guide, x)
    pyro.set_rng_seed(3)
    plain = plain_objective.loss(lvm.model, lvm.guide, x)
    assert with_warmup == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("base", ["elbo", "meanfield"])
def test_free_bits_gradient_vanishes_for_dimensions_below_lambda(base):
    # p(x|z) does not depend on z, so every gradient on the guide's mean comes from the KL part.
    lvm = LinearGaussian(decoder_uses_z=False)
    with torch.no_grad():
        lvm.A.zero_()  # q(z|x) = N(c, softplus(s)) for every x: KL_0 = 2.x nats, KL_1 < 0.5 nats
    x = torch.randn(8, 3)
    m, s = lvm.guide_params(x)
    kl_per_dim = (0.5 * (s ** 2 + m ** 2 - 1) - torch.log(s)).mean(0)
    assert kl_per_dim[0] > 0.5 > kl_per_dim[1]
    objective = get_objective(base, free_bits=0.5)
    scaled = DataPlateScale(80)  # a minibatch of 8 out of N = 80 points
    loss = objective.surrogate_loss(scaled(lvm.model), scaled(lvm.guide), x)
    grad_c, grad_s = torch.autograd.grad(loss, [lvm.c, lvm.s])
    assert grad_c[1] == 0 and grad_s[1] == 0  # below lambda: no gradient from the KL
    assert grad_c[0].item() == pytest.approx(80 * 2.0, rel=1e-5)  # N * d/dm (m^2 / 2) at m = 2
    assert grad_s[0] != 0
    # and the surrogate value is N * sum_d max(lambda, KL_d) - log-likelihood
    loglik = -(80 / 8) * (0.5 * (x - lvm.b) ** 2 + 0.5 * math.log(2 * math.pi)).sum()
    want = 80 * torch.clamp(kl_per_dim, min=0.5).sum() - loglik
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_bad_remedy_options_are_refused():
    with pytest.raises(UserError, match="--kl-warmup"):
        get_objective("elbo", kl_warmup=-1)
    with pytest.raises(UserError, match="--free-bits"):
        get_objective("elbo", free_bits=-0.5)
    with pytest.raises(UserError, match="--free-bits"):
        get_objective("elbo", free_bits=float("nan"))
    with pytest.raises(UserError, match="elbo or meanfield"):
        get_objective("iwae", particles=5, kl_warmup=10)

    class NoFactorization(LinearGaussian):
        def guide(self, x):
            loc, scale = self.guide_params(x)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale)))

    lvm = NoFactorization()
    with pytest.raises(UserError, match="factorise"):
        get_objective("meanfield", free_bits=0.1).check_model(lvm.model, lvm.guide, torch.randn(4, 3))
    get_objective("meanfield", kl_warmup=10).check_model(lvm.model, lvm.guide, torch.randn(4, 3))  # warm-up is fine


def test_cli_fit_with_remedies_records_them_and_resumes_the_schedule(capsys, tmp_path):
    args = ["fit", "vae", "--data", "digits", *SMALL_VAE, "--kl-warmup", "50", "--free-bits", "0.5", "--quiet"]
    code, _, err = cli(capsys, *args, "--epochs", "2", "--out", tmp_path / "a")
    assert code == 0, err
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["kl_warmup"] == 50 and config["free_bits"] == 0.5 and config["kl_warmup_start"] == 0.0
    metrics = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(math.isfinite(m["valid_elbo"]) and m["valid_elbo"] < 0 for m in metrics)

    # the schedule depends on the global step only: 1 epoch + resume == 2 epochs, bit for bit on CPU
    code, _, err = cli(capsys, *args, "--epochs", "1", "--out", tmp_path / "b")
    assert code == 0, err
    code, _, err = cli(capsys, "fit", "vae", "--resume", "--epochs", "2", "--out", tmp_path / "b", "--quiet")
    assert code == 0, err
    resumed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["valid_elbo"] for m in resumed] == [m["valid_elbo"] for m in metrics]

    # --config repeats the run with its remedies
    code, _, err = cli(capsys, "fit", "-", "--config", tmp_path / "a" / "config.json", "--epochs", "1",
                       "--out", tmp_path / "c", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "c" / "config.json").read_text())["free_bits"] == 0.5


@pytest.mark.parametrize("flags, word", [(["--kl-warmup", "-5"], "--kl-warmup"),
                                         (["--free-bits", "-0.5"], "--free-bits"),
                                         (["--free-bits", "inf"], "--free-bits"),
                                         (["--kl-warmup-start", "2"], "--kl-warmup-start"),
                                         (["--kl-warmup", "10", "--objective", "iwae"], "elbo or meanfield")])
def test_cli_bad_remedy_values_exit_2(capsys, tmp_path, flags, word):
    code, out, err = cli(capsys, "fit", "vae", "--data", "digits", *SMALL_VAE, "--epochs", "1", *flags,
                         "--out", tmp_path / "r")
    assert code == 2 and word in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_cli_free_bits_refused_for_an_enumerated_mixture(capsys, tmp_path):
    code, _, err = cli(capsys, "fit", "mog", "--epochs", "1", "--free-bits", "0.5", "--out", tmp_path / "r")
    assert code == 2 and "enumerated" in err
    assert not (tmp_path / "r").exists()
