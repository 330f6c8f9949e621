"""Tests of the model zoo (``models/``) and its building blocks (``pyro_lvm.nn``, ``pyro_lvm.distributions``).

Every model is checked against the protocol of ``docs/ARCHITECTURE.md`` (site names, shapes, the
particle plate at dim -2, ancestral sampling) and against a known answer: the mixture and PPCA
against their maximum-likelihood optima on real data, the VAEs by a held-out ELBO improvement, the
PixelCNN likelihoods (plain and gated) by their autoregressive structure (and the gated one's lack of a
blind spot), their normalisation and the exactness of their cached samplers.
"""

import importlib.util
import itertools
import math
from pathlib import Path

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

import pyro_lvm  # noqa: F401  (sets module_local_params, as the toolkit does)
from pyro_lvm.distributions import PixelCNNBernoulli, autoregressive_sample
from pyro_lvm.nn import GatedPixelCNN, PixelCNN

torch.set_num_threads(1)
pyro.settings.set(module_local_params=True)

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "models"


def load_zoo_class(file_stem, class_name):
    """Load a zoo file by path, exactly as the toolkit loads a user's model file."""
    spec = importlib.util.spec_from_file_location(f"zoo_under_test_{file_stem}", ZOO / f"{file_stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)


MixtureOfGaussians = load_zoo_class("mog", "MixtureOfGaussians")
PPCA = load_zoo_class("ppca", "PPCA")
VAE = load_zoo_class("vae", "VAE")
PixelCNNVAE = load_zoo_class("pixelcnn_vae", "PixelCNNVAE")


def faithful():
    data = np.loadtxt(ROOT / "pyro_lvm" / "data" / "faithful.csv", delimiter=",", skiprows=1, usecols=(1, 2))
    return data


def digits(num_points, binarize):
    from sklearn.datasets import load_digits

    images = load_digits().data[:num_points] / 16.0
    if binarize:
        images = (images > 0.5).astype(np.float64)
    return images


def traces(lvm, x, num_particles=None):
    """Guide trace and the model trace replayed against it, optionally inside a particle plate."""
    def run():
        guide_trace = poutine.trace(lvm.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(lvm.model, trace=guide_trace)).get_trace(x)
        return guide_trace, model_trace

    if num_particles is None:
        return run()
    with pyro.plate("particles", num_particles, dim=-2):
        return run()


def per_point_elbo(lvm, x, num_particles=1):
    """``log p(x, z) - log q(z|x)`` per point, averaged over ``num_particles`` vectorized draws: shape [n]."""
    guide_trace, model_trace = traces(lvm, x, num_particles)
    log_weight = 0.0
    for trace, sign in ((model_trace, 1), (guide_trace, -1)):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                log_weight = log_weight + sign * site["fn"].log_prob(site["value"])
    return log_weight.mean(0)


def fit(lvm, x, elbo, steps, lr, decay=1.0):
    """Full-batch Adam on ``elbo.differentiable_loss``, the way the toolkit's training loop uses objectives."""
    optimizer = torch.optim.Adam(lvm.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, decay)
    for _ in range(steps):
        loss = elbo.differentiable_loss(lvm.model, lvm.guide, x) / x.shape[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return lvm


def check_protocol(lvm, x, latent_shape):
    """Sites, shapes, the particle plate at dim -2 and ancestral sampling, for a continuous-z model."""
    n, data_shape = x.shape[0], tuple(x.shape[1:])
    guide_trace, model_trace = traces(lvm, x)
    model_trace.compute_log_prob()
    assert model_trace.nodes["x"]["is_observed"]
    assert model_trace.nodes["x"]["fn"].event_shape == data_shape
    assert model_trace.nodes["x"]["log_prob"].shape == (n,)
    assert model_trace.nodes["z"]["value"].shape == (n,) + latent_shape
    assert guide_trace.nodes["z"]["value"].shape == (n,) + latent_shape
    assert {f.name for f in model_trace.nodes["x"]["cond_indep_stack"]} == {"data"}

    k = 3
    guide_trace, model_trace = traces(lvm, x, num_particles=k)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    assert guide_trace.nodes["z"]["value"].shape == (k, n) + latent_shape
    assert model_trace.nodes["x"]["log_prob"].shape == (k, n)
    assert model_trace.nodes["z"]["log_prob"].shape == (k, n)
    assert guide_trace.nodes["z"]["log_prob"].shape == (k, n)
    assert torch.isfinite(model_trace.nodes["x"]["log_prob"]).all()

    samples = poutine.trace(lvm.model).get_trace(None, num_samples=5).nodes["x"]["value"]
    assert samples.shape == (5,) + data_shape
    return samples


# ---------------------------------------------------------------------------------------------------
# mog


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_mog_protocol_and_enumeration(covariance):
    pyro.set_rng_seed(0)
    x = torch.tensor(faithful()[:20], dtype=torch.float32)
    lvm = MixtureOfGaussians((2,), num_components=3, covariance=covariance)
    lvm.initialize(x)

    model_trace = poutine.trace(lvm.model).get_trace(x)
    assert model_trace.nodes["z"]["value"].shape == (20,)
    assert model_trace.nodes["z"]["infer"]["enumerate"] == "parallel"
    assert model_trace.nodes["z"]["fn"].has_enumerate_support
    assert not any(site["type"] == "sample" for site in poutine.trace(lvm.guide).get_trace(x).nodes.values())

    samples = poutine.trace(lvm.model).get_trace(None, num_samples=5).nodes["x"]["value"]
    assert samples.shape == (5, 2)

    # Summing z out makes the TraceEnum_ELBO loss the exact negative log-likelihood, also with a
    # particle plate at dim -2 (each of the K particles then counts the data once more).
    log_px = lvm.log_marginal(x)
    assert log_px.shape == (20,)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(lvm.model, lvm.guide, x)
    assert torch.allclose(loss, -log_px.sum(), rtol=1e-5)
    k = 4

    def in_particles(fn):
        def wrapped(x):
            with pyro.plate("particles", k, dim=-2):
                return fn(x)
        return wrapped

    loss = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(in_particles(lvm.model), in_particles(lvm.guide), x)
    assert torch.allclose(loss, -k * log_px.sum(), rtol=1e-5)

    # Without enumeration the particle plate gives z of shape [K, n].
    with pyro.plate("particles", k, dim=-2):
        model_trace = poutine.trace(lvm.model).get_trace(x)
    model_trace.compute_log_prob()
    assert model_trace.nodes["z"]["value"].shape == (k, 20)
    assert model_trace.nodes["x"]["log_prob"].shape == (k, 20)


def test_mog_log_marginal_matches_scipy():
    from scipy.stats import multivariate_normal

    x = torch.tensor(faithful(), dtype=torch.float64)
    lvm = MixtureOfGaussians((2,), num_components=2).double()
    lvm.initialize(x)
    weights = lvm.weights.detach().numpy()
    covariances = (lvm.scale_tril @ lvm.scale_tril.transpose(-1, -2)).detach().numpy()
    expected = np.log(sum(weights[k] * multivariate_normal(lvm.locs[k].detach().numpy(), covariances[k]).pdf(x.numpy())
                          for k in range(2)))
    np.testing.assert_allclose(lvm.log_marginal(x).detach().numpy(), expected, rtol=1e-10)


def test_mog_reaches_maximum_likelihood_on_old_faithful():
    from sklearn.mixture import GaussianMixture

    data = faithful()
    assert data.shape == (272, 2)
    reference = GaussianMixture(2, covariance_type="full", n_init=20, tol=1e-10, max_iter=10_000,
                                random_state=0).fit(data)
    best = reference.score(data)  # mean log-likelihood per point at the EM optimum

    pyro.set_rng_seed(0)
    x = torch.tensor(data, dtype=torch.float32)
    # One k-means++ start and its clusters' moments, no EM: gradient steps alone must climb to the optimum.
    lvm = MixtureOfGaussians((2,), num_components=2, covariance="full", init_starts=1, init_em_iterations=0)
    lvm.initialize(x, seed=0)
    start = lvm.log_marginal(x).mean().item()
    fit(lvm, x, TraceEnum_ELBO(max_plate_nesting=1), steps=300, lr=0.05)
    ours = lvm.log_marginal(x).mean().item()
    # With z enumerated the SVI loss is the exact negative log-likelihood and its gradient is exact,
    # so Adam converges to the same stationary point as EM (measured: within 1e-7 nats/point after
    # ~100 steps). What is left is float32 rounding of the loss (~1e-6 relative, ~1e-5 nats/point at
    # -4.16) and Adam's residual step; 2e-4 nats/point allows both with a 10x margin, and is 30x
    # smaller than the gap the k-means++ start leaves (~0.006), so the optimisation is what passes.
    assert best - start > 3e-3
    assert ours <= best + 2e-4
    assert abs(ours - best) < 2e-4, (ours, best)
    order = np.argsort(lvm.locs[:, 0].detach().numpy())
    np.testing.assert_allclose(lvm.locs.detach().numpy()[order], reference.means_[np.argsort(reference.means_[:, 0])],
                               rtol=1e-2)


def _standardized_table(name, tmp_path):
    """scikit-learn's bundled iris (4 features) or the first 5 features of wine, standardized, as a .npy file."""
    from sklearn.datasets import load_iris, load_wine

    table = load_iris().data if name == "iris" else load_wine().data[:, :5]
    path = tmp_path / f"{name}.npy"
    np.save(path, ((table - table.mean(0)) / table.std(0)).astype(np.float32))
    return str(path)


@pytest.mark.parametrize("name, k", [("faithful", 2), ("faithful", 3), ("iris", 3), ("wine", 3)])
def test_fit_mog_with_default_options_is_as_good_as_em(name, k, tmp_path):
    """``pyro-lvm fit mog -p num_components=K`` against scikit-learn's best of 10 EM runs on the same points."""
    from sklearn.mixture import GaussianMixture

    data = name if name == "faithful" else _standardized_table(name, tmp_path)
    run = pyro_lvm.fit("mog", data=data, out=tmp_path / "run", hyperparameters={"num_components": k},
                       progress=False, log=lambda message: None)
    x = run.data.train.double()
    ours = run.model.double().log_marginal(x).mean().item()
    em = GaussianMixture(k, covariance_type="full", n_init=10, random_state=0).fit(x.numpy())
    # scikit-learn's default tolerance (1e-3 per point) stops EM short of its maximum (by 0.008-0.05
    # nats per point on these sets); run to convergence, its best of 10 starts is the harder bar.
    converged = GaussianMixture(k, covariance_type="full", n_init=10, random_state=0, tol=1e-10,
                                max_iter=100_000).fit(x.numpy())
    assert ours >= em.score(x.numpy()) - 0.01, (ours, em.score(x.numpy()))
    assert ours >= converged.score(x.numpy()) - 0.01, (ours, converged.score(x.numpy()))
    # A genuine maximum, not a component shrinking onto a few points (the likelihood is unbounded
    # there): every component keeps a share of the points and a covariance of the data's order.
    covariances = run.model.scale_tril @ run.model.scale_tril.transpose(-1, -2)
    floor = torch.linalg.eigvalsh(torch.cov(x.T)).min()
    assert torch.linalg.eigvalsh(covariances).min() > 1e-3 * floor
    assert run.model.weights.min() * len(x) > x.shape[1] + 1


# ---------------------------------------------------------------------------------------------------
# ppca


def test_ppca_protocol():
    pyro.set_rng_seed(0)
    x = torch.tensor(digits(10, binarize=False), dtype=torch.float32)
    lvm = PPCA((64,), latent_dim=3)
    check_protocol(lvm, x, (3,))


def test_ppca_log_marginal_matches_scipy():
    from scipy.stats import multivariate_normal

    x = torch.tensor(digits(200, binarize=False), dtype=torch.float64)
    lvm = PPCA((64,), latent_dim=4).double()
    lvm.initialize(x)
    with torch.no_grad():
        lvm.weight.add_(0.1 * torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    weight, bias = lvm.weight.detach().numpy(), lvm.bias.detach().numpy()
    covariance = weight @ weight.T + lvm.noise_scale.item() ** 2 * np.eye(64)
    expected = multivariate_normal(bias, covariance).logpdf(x.numpy())
    np.testing.assert_allclose(lvm.log_marginal(x).detach().numpy(), expected, rtol=1e-9)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_ppca_elbo_with_exact_posterior_equals_log_marginal(dtype, atol):
    # With q(z|x) = p(z|x), log p(x, z) - log q(z|x) = log p(x) for every z: a single-sample ELBO is
    # exact per point, up to rounding (float32: ~1e-7 relative on terms of size ~1e3).
    pyro.set_rng_seed(0)
    x = torch.tensor(digits(100, binarize=False), dtype=dtype)
    lvm = PPCA((64,), latent_dim=5).to(dtype)
    lvm.initialize(x[:50])  # parameters fitted to other points, so the test is not at an optimum
    lvm.set_guide_to_exact_posterior()
    elbo = per_point_elbo(lvm, x, num_particles=1)
    torch.testing.assert_close(elbo, lvm.log_marginal(x), rtol=0, atol=atol)
    # A different guide gives a strictly smaller ELBO on average (the gap is KL(q || p(z|x))).
    with torch.no_grad():
        lvm.encoder_bias.add_(0.5)
    assert (per_point_elbo(lvm, x, 10) < lvm.log_marginal(x)).float().mean() > 0.9


def test_ppca_reaches_tipping_bishop_maximum_likelihood():
    data = digits(500, binarize=False)
    x = torch.tensor(data, dtype=torch.float32)
    latent_dim = 2
    eigenvalues = np.linalg.eigvalsh(np.cov(data.T, bias=True))[::-1]
    discarded_mean = eigenvalues[latent_dim:].mean()

    optimum = PPCA((64,), latent_dim=latent_dim)
    optimum.initialize(x)  # the closed-form solution
    best = optimum.log_marginal(x).mean().item()
    assert optimum.noise_scale.item() ** 2 == pytest.approx(discarded_mean, rel=1e-4)
    one_component = PPCA((64,), latent_dim=1)
    one_component.initialize(x)
    gap_to_one_component = best - one_component.log_marginal(x).mean().item()

    pyro.set_rng_seed(0)
    lvm = PPCA((64,), latent_dim=latent_dim)  # constructor start: b = 0, small random W, s = 1
    start = lvm.log_marginal(x).mean().item()
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    fit(lvm, x, elbo, steps=600, lr=0.02, decay=0.996)
    ours = lvm.log_marginal(x).mean().item()
    # SVI follows a noisy gradient of the ELBO, whose maximum is the ML solution (the linear guide
    # can be exact). From a start ~68 nats/point below the optimum, 600 steps with a decaying step
    # size leave it within a thousandth of a nat (measured: 0.0004). We allow 0.02 nats/point: the
    # residual of 8-particle gradient noise with a 50x margin, and under 1% of the likelihood gained
    # by the second principal component here (4.1 nats/point), so a fit stuck in the
    # one-component solution or a wrong subspace fails.
    assert gap_to_one_component > 1.0
    assert start < best - 10
    assert ours <= best + 1e-4  # nothing beats the maximum likelihood
    assert best - ours < 0.02, (ours, best)
    # s^2 at the ML solution is the mean of the discarded eigenvalues of the sample covariance.
    assert lvm.noise_scale.item() ** 2 == pytest.approx(discarded_mean, rel=0.02)


# ---------------------------------------------------------------------------------------------------
# vae and pixelcnn-vae


@pytest.mark.parametrize("architecture, likelihood, data_shape", [
    ("mlp", "bernoulli", (1, 8, 8)),
    ("mlp", "gaussian", (64,)),
    ("conv", "bernoulli", (1, 8, 8)),
    ("conv", "gaussian", (1, 28, 28)),
])
def test_vae_protocol(architecture, likelihood, data_shape):
    pyro.set_rng_seed(0)
    x = torch.rand((6,) + data_shape)
    if likelihood == "bernoulli":
        x = torch.bernoulli(x)
    lvm = VAE(data_shape, latent_dim=4, hidden=(16,), architecture=architecture, likelihood=likelihood)
    lvm.initialize(x)
    samples = check_protocol(lvm, x, (4,))
    if likelihood == "bernoulli":
        assert set(samples.unique().tolist()) <= {0.0, 1.0}


def test_vae_defaults_are_the_iwae_architecture():
    lvm = VAE((784,))
    widths = [(m.in_features, m.out_features) for m in lvm.encoder if isinstance(m, torch.nn.Linear)]
    assert widths == [(784, 200), (200, 200), (200, 100)]  # 100 = mean and scale of 50 latents
    assert isinstance(lvm.encoder[1], torch.nn.Tanh)
    widths = [(m.in_features, m.out_features) for m in lvm.decoder if isinstance(m, torch.nn.Linear)]
    assert widths == [(50, 200), (200, 200), (200, 784)]


def test_vae_with_two_stochastic_layers_is_the_iwae_papers_second_architecture():
    pyro.set_rng_seed(0)
    lvm = VAE((1, 28, 28), stochastic_layers=2)
    widths = lambda net: [(m.in_features, m.out_features) for m in net if isinstance(m, torch.nn.Linear)]  # noqa: E731
    assert widths(lvm.encoder) == [(784, 200), (200, 200), (200, 200)]     # q(h|x): 100 means, 100 scales
    assert widths(lvm.encoder_top) == [(100, 100), (100, 100), (100, 100)]  # q(z|h): 50 and 50
    assert widths(lvm.decoder_top) == [(50, 100), (100, 100), (100, 200)]   # p(h|z)
    assert widths(lvm.decoder) == [(100, 200), (200, 200), (200, 784)]      # p(x|h)

    x = torch.bernoulli(torch.rand(6, 1, 28, 28))
    lvm = VAE((1, 28, 28), latent_dim=4, hidden=(16,), stochastic_layers=2, intermediate_dim=6,
              intermediate_hidden=(8,))
    lvm.initialize(x)
    check_protocol(lvm, x, (4,))
    guide_trace, model_trace = traces(lvm, x, num_particles=3)
    assert guide_trace.nodes["h"]["value"].shape == model_trace.nodes["h"]["value"].shape == (3, 6, 6)
    # log p(x, h, z) - log q(h, z | x) written out by hand, against the trace's sum of the four sites
    h, z = guide_trace.nodes["h"]["value"], guide_trace.nodes["z"]["value"]
    normal = lambda v, loc, scale: torch.distributions.Normal(loc, scale).log_prob(v).sum(-1)  # noqa: E731
    q_h = normal(h, *lvm.encode(x))
    loc, raw = lvm.encoder_top(h).chunk(2, -1)
    q_z = normal(z, loc, torch.nn.functional.softplus(raw) + 1e-5)
    loc, raw = lvm.decoder_top(z).chunk(2, -1)
    p_h = normal(h, loc, torch.nn.functional.softplus(raw) + 1e-5)
    p_x = torch.distributions.Bernoulli(logits=lvm.decode(h)).log_prob(x).flatten(-3).sum(-1)
    expected = p_x + p_h + normal(z, torch.zeros(4), torch.ones(4)) - q_h - q_z
    traced = sum(sign * site["fn"].log_prob(site["value"]) for trace, sign in ((model_trace, 1), (guide_trace, -1))
                 for site in trace.nodes.values() if site["type"] == "sample")
    torch.testing.assert_close(traced, expected, rtol=1e-5, atol=1e-3)


def test_pixelcnn_vae_protocol():
    pyro.set_rng_seed(0)
    x = torch.bernoulli(torch.rand(6, 1, 8, 8))
    lvm = PixelCNNVAE((1, 8, 8), latent_dim=4, hidden=(16,), pixelcnn_layers=2, pixelcnn_channels=8)
    lvm.initialize(x)
    samples = check_protocol(lvm, x, (4,))
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(poutine.trace(lvm.model).get_trace(x).nodes["x"]["fn"], PixelCNNBernoulli)


def check_heldout_elbo_improves(lvm, steps, lr):
    """Fit on 500 binarized digits; the held-out ELBO must improve by many standard errors."""
    images = torch.tensor(digits(800, binarize=True), dtype=torch.float32).reshape(-1, *lvm.data_shape)
    train, test = images[:500], images[500:]
    lvm.initialize(train)
    before = per_point_elbo(lvm, test, num_particles=10).detach()
    fit(lvm, train, Trace_ELBO(max_plate_nesting=1), steps=steps, lr=lr)
    after = per_point_elbo(lvm, test, num_particles=10).detach()
    difference = after - before  # paired per test point
    gain, stderr = difference.mean().item(), difference.std().item() / math.sqrt(len(difference))
    # At initialisation (output bias = logit of the mean image) the ELBO is about that of
    # independent pixels, -27 nats here; a model that uses z to tell digits apart gains several nats
    # per point within a few hundred steps (measured: VAE +4.9, PixelCNN VAE +5.9, standard errors
    # 0.25-0.28). We require 2 nats/point and 10 standard errors of the paired difference (300 test
    # points): far beyond what evaluation noise (10 particles) can produce, with room for seeds.
    assert gain > 2.0 and gain > 10 * stderr, (before.mean().item(), after.mean().item(), stderr)


def test_vae_fit_improves_heldout_elbo():
    pyro.set_rng_seed(0)
    check_heldout_elbo_improves(VAE((64,), latent_dim=8, hidden=(64,)), steps=300, lr=3e-3)


def test_pixelcnn_vae_fit_improves_heldout_elbo():
    pyro.set_rng_seed(0)
    lvm = PixelCNNVAE((1, 8, 8), latent_dim=8, hidden=(64,), pixelcnn_layers=2, pixelcnn_channels=16,
                      first_kernel_size=5)
    check_heldout_elbo_improves(lvm, steps=150, lr=3e-3)


# ---------------------------------------------------------------------------------------------------
# PixelCNN likelihood


@pytest.mark.parametrize("data_shape", [(1, 6, 6), (2, 4, 5)])
def test_pixelcnn_is_autoregressive(data_shape):
    # Order (pixel in raster order, then channel): the logit of element i may depend on elements
    # j < i only. The Jacobian d logit_i / d x_j must be exactly zero for j >= i, and nonzero for
    # at least some j < i (the network is not trivially constant).
    torch.manual_seed(0)
    c, h, w = data_shape
    network = PixelCNN(data_shape, context_channels=2, num_layers=3, channels=6, first_kernel_size=5, kernel_size=3)
    x = torch.bernoulli(torch.rand((1,) + data_shape)).requires_grad_()
    context = torch.randn(1, 2, h, w)
    logits = network(x, context)

    def order(ch, row, col):
        return (row * w + col) * c + ch

    positions = list(itertools.product(range(c), range(h), range(w)))
    ranks = torch.tensor([order(*p) for p in positions], dtype=torch.float32).reshape(data_shape)
    saw_dependence = False
    for position in positions:
        (grad,) = torch.autograd.grad(logits[(0,) + position], x, retain_graph=True)
        later = ranks >= order(*position)
        assert (grad[0][later] == 0).all(), f"logit at {position} depends on the current or later elements"
        saw_dependence |= bool((grad[0][~later] != 0).any())
    assert saw_dependence


def test_pixelcnn_bernoulli_normalizes_and_samples_correctly():
    # Exact normalisation: sum over all 2^9 binary 1x3x3 images of p(x | context) is 1.
    torch.manual_seed(0)
    network = PixelCNN((1, 3, 3), context_channels=1, num_layers=2, channels=4, first_kernel_size=3)
    context = torch.randn(2, 1, 3, 3)  # a batch of two contexts
    d = PixelCNNBernoulli(network, context)
    assert d.batch_shape == (2,) and d.event_shape == (1, 3, 3)
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=9))).reshape(512, 1, 1, 3, 3)
    with torch.no_grad():
        log_p = d.log_prob(images)  # broadcasts [512, 1] against batch [2]
    assert log_p.shape == (512, 2)
    torch.testing.assert_close(log_p.exp().sum(0), torch.ones(2), rtol=0, atol=1e-5)

    # Sampling draws from the same distribution: the average log-probability of samples estimates
    # the negative entropy -H(p), computed exactly from the enumeration; 2000 draws, 5 s.e. tolerance.
    samples = d.sample((2000,))
    assert samples.shape == (2000, 2, 1, 3, 3)
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        sample_log_p = d.log_prob(samples)
    neg_entropy = (log_p.exp() * log_p).sum(0)
    stderr = sample_log_p.std(0) / math.sqrt(2000)
    assert ((sample_log_p.mean(0) - neg_entropy).abs() < 5 * stderr).all()

    # expand, and validation of the support.
    expanded = d.expand((3, 2))
    assert expanded.batch_shape == (3, 2) and expanded.sample().shape == (3, 2, 1, 3, 3)
    with torch.no_grad():
        expanded_log_p = expanded.log_prob(images[:4].unsqueeze(1))  # [4, 1, 1, 1, 3, 3] against batch [3, 2]
    torch.testing.assert_close(expanded_log_p, log_p[:4, None].expand(4, 3, 2))
    with pytest.raises(ValueError):
        PixelCNNBernoulli(network, context, validate_args=True).log_prob(torch.full((2, 1, 3, 3), 0.5))


def raster_ranks(data_shape):
    """Each element's place in raster-then-channel order, as a tensor of ``data_shape``."""
    c, h, w = data_shape
    return torch.tensor([(row * w + col) * c + ch for ch, row, col in itertools.product(range(c), range(h), range(w))]
                        ).reshape(data_shape)


def dependence(network, data_shape, make_context, trials=16):
    """For every element i of the output, which input elements its logit depends on: the union over
    ``trials`` random images and contexts of where d logit_i / dx is nonzero (a single point can miss
    a dependence through a ReLU that happens to be off, never invent one)."""
    seen = {}
    for _ in range(trials):
        x = torch.bernoulli(torch.rand((1,) + data_shape)).requires_grad_()
        logits = network(x, make_context())
        for position in itertools.product(*map(range, data_shape)):
            (grad,) = torch.autograd.grad(logits[(0,) + position], x, retain_graph=True)
            seen[position] = seen.get(position, torch.zeros(data_shape, dtype=torch.bool)) | (grad[0] != 0)
    return seen


@pytest.mark.parametrize("data_shape", [(1, 5, 5), (2, 4, 5)])
def test_gated_pixelcnn_is_autoregressive_without_blind_spot(data_shape):
    # The logit of element i depends on no element j >= i, and, with the receptive field of 4 layers
    # of reach 1 covering these small images, on every element j < i: no blind spot.
    torch.manual_seed(0)
    network = GatedPixelCNN(data_shape, context_dim=3, num_layers=4, channels=6, first_kernel_size=3,
                            kernel_size=3, conditioning_channels=2)
    ranks = raster_ranks(data_shape)
    for position, depends in dependence(network, data_shape, lambda: torch.randn(1, 3)).items():
        later = ranks >= ranks[position]
        assert not depends[later].any(), f"logit at {position} depends on the current or a later element"
        missed = (~depends & ~later).nonzero().tolist()
        assert depends[~later].all(), f"logit at {position} misses earlier elements {missed}"


def test_plain_pixelcnn_has_the_blind_spot_the_gated_one_removes():
    # The same check on the plain masked-convolution stack fails: pixel (2, 1) never sees (1, 3),
    # above and two to the right, however many 3x3 layers (van den Oord et al. 2016, figure 1).
    torch.manual_seed(0)
    data_shape = (1, 5, 5)
    network = PixelCNN(data_shape, context_channels=2, num_layers=4, channels=6, first_kernel_size=3, kernel_size=3)
    seen = dependence(network, data_shape, lambda: torch.randn(1, 2, 5, 5))
    ranks = raster_ranks(data_shape)
    assert not seen[(0, 2, 1)][0, 1, 3]
    assert seen[(0, 2, 1)][0, 1, 2] and seen[(0, 2, 1)][0, 2, 0]
    assert all(not seen[p][ranks >= ranks[p]].any() for p in seen)  # still autoregressive


class WithoutSampler(torch.nn.Module):
    """A network exposing only ``forward``: sampling falls back to a whole pass per pixel."""

    def __init__(self, network):
        super().__init__()
        self.network, self.data_shape = network, network.data_shape
        self.context_event_dim = network.context_event_dim

    def forward(self, x, context):
        return self.network(x, context)


@pytest.mark.parametrize("kind, data_shape", [("gated", (1, 6, 7)), ("gated", (2, 4, 5)), ("plain", (1, 6, 7)),
                                              ("plain", (2, 4, 5)), ("fallback", (2, 4, 5))])
def test_cached_sampling_is_exact(kind, data_shape):
    # x[c, i, j] = 1 exactly when u[c, i, j] < sigmoid(logit), the logit computed from the pixels
    # drawn before. A sampler that caches rows or crops the image must give the very logits of one
    # full pass over the finished image, so every element satisfies that rule against the full pass.
    torch.manual_seed(0)
    c, h, w = data_shape
    if kind == "plain":
        network = PixelCNN(data_shape, context_channels=2, num_layers=3, channels=6, first_kernel_size=5)
        context = torch.randn(64, 2, h, w)
    else:
        # Two channels: conditioned on the vector z alone (no map), whose term broadcasts over the crops.
        network = GatedPixelCNN(data_shape, context_dim=3, num_layers=3, channels=6, first_kernel_size=5,
                                conditioning_channels=0 if c == 2 else 4)
        context = torch.randn(64, 3)
        if kind == "fallback":
            network = WithoutSampler(network)
    uniforms = torch.rand((64,) + data_shape)
    with torch.no_grad():
        x = autoregressive_sample(network, context, uniforms)
        rule = (uniforms < torch.sigmoid(network(x, context))).float()
    assert torch.equal(x, rule)
    assert 0.2 < x.mean() < 0.8  # both values drawn: the check is not vacuous


@pytest.mark.parametrize("conditioning_channels", [0, 4])
def test_gated_forward_layer_by_layer_equals_the_cached_conditioning_pass(conditioning_channels):
    # forward computes each layer's conditioning where it is used (to hold few maps at once); the
    # sampler's path computes them all first. On a full image the two are the same operations.
    torch.manual_seed(0)
    network = GatedPixelCNN((1, 5, 5), context_dim=3, num_layers=3, channels=6, first_kernel_size=3,
                            conditioning_channels=conditioning_channels, conditioning_hidden=(7,))
    for parameter in network.parameters():  # away from the zero initialisation of some maps
        parameter.data.normal_(0, 0.3)
    x, z = (torch.rand(8, 1, 5, 5) < 0.5).float(), torch.randn(8, 3)
    with torch.no_grad():
        conditioning, centred = network.condition(z), 2 * x - 1
        from_vertical = [layer.from_vertical(pre_activation) for layer, pre_activation
                         in zip(network.layers, network.vertical_stack(centred, conditioning))]
        cached = network.horizontal_logits(centred, from_vertical, conditioning)
        assert torch.equal(network(x, z), cached)


@pytest.mark.parametrize("data_shape", [(1, 3, 3), (2, 2, 2)])
def test_gated_pixelcnn_bernoulli_normalizes_and_samples_correctly(data_shape):
    # Exact normalisation: sum over all 2^(C H W) binary images of p(x | z) is 1, for a batch of codes.
    torch.manual_seed(0)
    size = math.prod(data_shape)
    network = GatedPixelCNN(data_shape, context_dim=2, num_layers=2, channels=4, first_kernel_size=3)
    d = PixelCNNBernoulli(network, torch.randn(2, 2))
    assert d.batch_shape == (2,) and d.event_shape == data_shape
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=size))).reshape(2**size, 1, *data_shape)
    with torch.no_grad():
        log_p = d.log_prob(images)
    torch.testing.assert_close(log_p.exp().sum(0), torch.ones(2), rtol=0, atol=1e-5)
    # Samples from p: their mean log-probability estimates -H(p); 2000 draws, 5 standard errors.
    samples = d.sample((2000,))
    assert samples.shape == (2000, 2) + data_shape
    with torch.no_grad():
        sample_log_p = d.log_prob(samples)
    neg_entropy = (log_p.exp() * log_p).sum(0)
    assert ((sample_log_p.mean(0) - neg_entropy).abs() < 5 * sample_log_p.std(0) / math.sqrt(2000)).all()
    # A vector context: batch shape from all but its last dimension, through expand too.
    expanded = d.expand((3, 2))
    assert expanded.batch_shape == (3, 2) and expanded.sample().shape == (3, 2) + data_shape
    with torch.no_grad():
        torch.testing.assert_close(expanded.log_prob(images[:4].unsqueeze(1)), log_p[:4, None].expand(4, 3, 2))


def test_gated_pixelcnn_vae_protocol_and_fit():
    pyro.set_rng_seed(0)
    x = torch.bernoulli(torch.rand(6, 1, 8, 8))
    lvm = PixelCNNVAE((1, 8, 8), latent_dim=4, hidden=(16,), pixelcnn_layers=2, pixelcnn_channels=8, decoder="gated")
    lvm.initialize(x)
    samples = check_protocol(lvm, x, (4,))
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    assert isinstance(lvm.pixelcnn, GatedPixelCNN)
    with pytest.raises(ValueError, match="decoder must be one of plain, gated"):
        PixelCNNVAE((1, 8, 8), decoder="wavenet")

    pyro.set_rng_seed(0)
    lvm = PixelCNNVAE((1, 8, 8), latent_dim=8, hidden=(64,), pixelcnn_layers=2, pixelcnn_channels=8,
                      first_kernel_size=3, decoder="gated")
    check_heldout_elbo_improves(lvm, steps=100, lr=3e-3)  # measured: +4.4 nats, standard error 0.20


def test_pixelcnn_vae_samples_binary_images():
    pyro.set_rng_seed(0)
    lvm = PixelCNNVAE((1, 8, 8), latent_dim=4, hidden=(16,), pixelcnn_layers=2, pixelcnn_channels=8)
    samples = poutine.trace(lvm.model).get_trace(None, num_samples=7).nodes["x"]["value"]
    assert samples.shape == (7, 1, 8, 8) and samples.dtype == torch.float32
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
