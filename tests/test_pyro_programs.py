"""Acceptance corpus of issue 10: Pyro programs exactly as Pyro's tutorials and examples write them.

Each file in ``tests/pyro_programs/`` is a model/guide pair written the Pyro way (its docstring names
the tutorial or example and what, if anything, was changed). :data:`CASES` says, for each program,
which data it gets (written into ``tmp_path``), how it is fitted, which estimators must work, which
may either work or be refused, which must be refused, and how to compute its log p(x) independently
of pyro-lvm: enumeration, quadrature over a one- or two-dimensional latent, or a closed form. The
harness then goes through the command line as a user would (``fit``, ``evaluate --json`` with every
estimator, ``sample``, ``diagnose --json``, ``report``) and compares every number that has an
independent value with it:

- ``exact`` equals it (float rounding). ``elbo``, ``iwae``, ``is`` and ``ais`` are stochastic lower
  bounds: none may exceed it by more than 4 Monte Carlo standard errors (``mc_stderr`` of the JSON,
  combined with the truth's own where the truth is Monte Carlo), ``iwae`` and ``is`` may not fall
  below the ELBO, and ``is`` must also agree with it from below where its bias is bounded by its
  standard error (a guide family that holds the posterior, nothing continuous to sample, or a
  one-dimensional latent per layer that the guide covers: not the 2-D MNIST VAE, nor ProdLDA);
- ``diagnose``'s ELBO agrees with ``evaluate --estimator elbo``, its rate with a Monte Carlo rate
  E_x E_q[log q(z|x) - log p(z)] computed here from the traces, and ``report`` with ``diagnose``;
- loading the run twice, under two seeds, gives the same parameters (everything is restored from the
  run directory, ``pyro.param`` and AutoGuides included); a ``pyro.param`` or ``AutoDelta`` value with a
  known start has moved from it (the silent bug of the issue: values neither optimized nor saved); a
  fresh process gets the same number; linear-Gaussian fits reach at least halfway from the best
  diagonal Gaussian to the PPCA maximum likelihood;
- what must be refused exits with status 2 and one ``error:`` line (never 1, never a traceback), and a
  refused ``fit`` leaves no run directory; "either" is the issue's rule: a correct number, or such a
  refusal.

Problems are collected per program and reported together, so that one run shows everything that is
wrong with a program. The independent values are themselves checked against direct computations at
the end of this module (closed forms, brute-force sums, normalisation), on parameters set by hand.
"""

import dataclasses
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_lvm
from helpers import cli, cli_process, one_json

PROGRAMS = Path(__file__).resolve().parent / "pyro_programs"
Z_SIGMA = 4.0  # tolerance in (combined) Monte Carlo standard errors
FLOAT_TOL = 2e-3  # nats per point: float32 rounding of a sum over a few hundred terms
DEFAULT_SAMPLES = {"elbo": 10, "iwae": 50, "is": 1000, "exact": 1, "ais": 16}
AIS_STEPS, AIS_POINTS = 50, 10  # annealing steps and test points for ais (checked as a lower bound only)


# ---------------------------------------------------------------------------------------------
# Data: drawn from known models with fixed seeds, or small subsets of digits / MNIST.
# Each builder returns {"train", "valid", "test"} numpy arrays in the shape the program expects.
# ---------------------------------------------------------------------------------------------

def _splits(x, sizes):
    a, b = sizes[0], sizes[0] + sizes[1]
    return {"train": x[:a], "valid": x[a:b], "test": x[b:b + sizes[2]]}


def mixture_1d(seed=0, sizes=(200, 50, 50)):
    """Scalars (shape [N]) from 0.4 N(0, 1) + 0.6 N(6, 1.5^2), the GMM tutorial's kind of data."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    k = rng.random(n) < 0.4
    x = np.where(k, rng.normal(0.0, 1.0, n), rng.normal(6.0, 1.5, n))
    return _splits(x.astype(np.float32), sizes)


def mixture_2d(seed=1, sizes=(300, 50, 50)):
    rng = np.random.default_rng(seed)
    locs = np.array([[0.0, 0.0], [4.0, 1.0], [-2.0, 5.0]])
    n = sum(sizes)
    k = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    x = locs[k] + rng.normal(0.0, [0.7, 1.2], (n, 2))
    return _splits(x.astype(np.float32), sizes)


def linear_gaussian(seed=2, sizes=(300, 50, 50)):
    """x = W z + b + noise in 3 dimensions, one factor: data for PPCA and factor analysis."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    z = rng.normal(size=(n, 1))
    x = z @ np.array([[2.0, -1.0, 0.5]]) + np.array([1.0, 0.0, -1.0]) + rng.normal(0.0, [0.5, 0.3, 0.8], (n, 3))
    return _splits(x.astype(np.float32), sizes)


def normal_1d(seed=3, sizes=(100, 20, 30)):
    rng = np.random.default_rng(seed)
    return _splits(rng.normal(1.5, 1.0, sum(sizes)).astype(np.float32), sizes)


def normal_local_1d(seed=8, sizes=(60, 20, 20)):
    """x_n = loc_n + noise with loc_n ~ N(0, 1) and unit noise: marginally N(0, 2)."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    return _splits((rng.normal(size=n) + rng.normal(size=n)).astype(np.float32), sizes)


def toy_mixture_data(seed=4, sizes=(300, 50, 50)):
    """Rows (A, C) of examples/toy_mixture_model_discrete_enumeration.py's generating process."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    a = rng.random(n) < 0.9
    b = rng.random(n) < np.where(a, 0.85, 0.1)
    c = rng.random(n) < np.where(b, 0.9, 0.2)
    return _splits(np.stack([a, c], -1).astype(np.float32), sizes)


def hmm_sequences(seed=5, sizes=(60, 20, 20), length=6, tones=3):
    """Binary sequences [N, T, D] from a 3-state HMM, as examples/hmm.py's polyphonic data."""
    rng = np.random.default_rng(seed)
    trans = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    emit = np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.3, 0.3, 0.9]])[:, :tones]
    n = sum(sizes)
    x = np.zeros((n, length, tones), np.float32)
    state = np.zeros(n, int)
    for t in range(length):
        state = np.array([rng.choice(3, p=trans[s]) for s in state])
        x[:, t] = rng.random((n, tones)) < emit[state]
    return _splits(x, sizes)


def binary_digits(sizes=(400, 100, 50)):
    """Scikit-learn's 8x8 digits, flattened to 64 pixels and thresholded at 0.5."""
    from sklearn.datasets import load_digits

    x = (load_digits().data / 16.0 > 0.5).astype(np.float32)
    return _splits(x, sizes)


def counts(seed=6, sizes=(300, 50, 50), vocab=12, words=30):
    """Bags of words [N, V] from two topics (ProdLDA) or Poisson counts (the gamma DEF)."""
    rng = np.random.default_rng(seed)
    topics = rng.dirichlet(0.3 * np.ones(vocab), 2)
    n = sum(sizes)
    mix = rng.dirichlet([0.5, 0.5], n)
    x = np.stack([rng.multinomial(words, m @ topics) for m in mix]).astype(np.float32)
    return _splits(x, sizes)


def linear_gaussian_sequences(seed=9, sizes=(200, 50, 50), length=4):
    """Sequences [N, T, 2] of a linear-Gaussian state-space model with a 1-D state (the tiny DMM's data)."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    z, x = np.zeros(n), np.zeros((n, length, 2))
    for t in range(length):
        z = 0.8 * z + 0.6 * rng.normal(size=n)
        x[:, t] = z[:, None] * np.array([1.5, -1.0]) + 0.4 * rng.normal(size=(n, 2))
    return _splits(x.astype(np.float32), sizes)


def poisson_counts(seed=10, sizes=(300, 50, 50), genes=6):
    """Counts [N, G] with log-rates linear in one Gaussian factor (the scVI-style model's data)."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    rates = np.exp(1.0 + rng.normal(size=(n, 1)) @ rng.normal(size=(1, genes)))
    return _splits(rng.poisson(rates).astype(np.float32), sizes)


def mnist_binary(data_dir, sizes=(400, 100, 30)):
    import torchvision

    images = torchvision.datasets.MNIST(str(data_dir), train=True, download=False).data[:sum(sizes)]
    generator = torch.Generator().manual_seed(7)
    x = torch.bernoulli(images.float().div(255).unsqueeze(1), generator=generator).numpy()
    return _splits(x.astype(np.float32), sizes)


# ---------------------------------------------------------------------------------------------
# Independent values of log p(x), per point, from the fitted program (never from pyro-lvm's code).
# ``lvm`` is ``pyro_lvm.load_run(RUN).model``: the user's instance for a class, an object with
# ``.model`` and ``.guide`` for a file of functions. Each returns (log p [N], its MC error [N] or None).
# ---------------------------------------------------------------------------------------------

def traced(program, *args):
    with torch.no_grad():
        return poutine.trace(program).get_trace(*args)


def trace_values(lvm, x, kind):
    """Values of the sites of type ``kind`` ("param" or "sample") in one trace of guide and model."""
    values = {}
    for program in (lvm.guide, lvm.model):
        for name, site in traced(program, x).nodes.items():
            if site["type"] == kind:
                values.setdefault(name, site["value"].detach())
    return values


def bernoulli_log_lik(x, probs):
    """sum_d x_d log p_d + (1 - x_d) log(1 - p_d) for x [N, D], probs [G, D] -> [N, G]."""
    probs = probs.clamp(1e-7, 1 - 1e-7).double()
    x = x.double()
    return x @ probs.log().T + (1 - x) @ torch.log1p(-probs).T


def standard_normal_log_prob(z):
    return dist.Normal(0.0, 1.0).log_prob(z.double()).sum(-1)


def _grid(lo, hi, n, dim):
    axes = [torch.linspace(float(lo[d]), float(hi[d]), n, dtype=torch.float64) for d in range(dim)]
    cell = math.prod(float(a[1] - a[0]) for a in axes)
    return torch.cartesian_prod(*axes).reshape(-1, dim), cell


def quadrature(log_lik, num_points, dim, log_prior=standard_normal_log_prob, lo=-7.0, hi=7.0,
               coarse=None, fine=None):
    """log of the integral of exp(log_prior(z) + log_lik(z, rows)) over z in R^dim (dim 1 or 2), per point.

    ``log_lik(z [G, dim], rows)`` -> [len(rows), G]. A coarse grid over [lo, hi]^dim finds, for each
    point, the box holding all cells within 40 nats of the largest; a fine grid over that box gives
    the integral (Riemann sum: the integrand is negligible at the box's edges), computed at two
    resolutions that must agree to 1e-3 nats, else the quadrature is declared unconverged.
    """
    coarse = coarse or (2001 if dim == 1 else 141)
    fine = fine or (401 if dim == 1 else 61)
    lo_all, hi_all = torch.full((dim,), lo, dtype=torch.float64), torch.full((dim,), hi, dtype=torch.float64)
    z, _ = _grid(lo_all, hi_all, coarse, dim)
    step = (hi - lo) / (coarse - 1)
    with torch.no_grad():
        joint = log_lik(z, list(range(num_points))).double() + log_prior(z)
    result = torch.empty(num_points, dtype=torch.float64)
    for i in range(num_points):
        near = z[joint[i] > joint[i].max() - 40.0]
        box_lo, box_hi = near.min(0).values - step, near.max(0).values + step
        estimates = []
        for n in (fine, fine // 2 + 1):
            zf, cell = _grid(box_lo, box_hi, n, dim)
            with torch.no_grad():
                values = log_lik(zf, [i]).double()[0] + log_prior(zf)
            estimates.append(torch.logsumexp(values, 0) + math.log(cell))
        assert abs(float(estimates[0] - estimates[1])) < 1e-3, \
            f"quadrature did not converge for point {i}: {float(estimates[0])} vs {float(estimates[1])}"
        result[i] = estimates[0]
    return result


def mvn_log_prob(x, loc, covariance):
    return dist.MultivariateNormal(loc.double(), covariance_matrix=covariance.double()).log_prob(x.double())


def truth_vae_tutorial(lvm, x):
    """Two-dimensional quadrature over the tutorial's ``latent`` with its decoder (784 Bernoulli pixels)."""
    flat = x.reshape(len(x), 784)
    return quadrature(lambda z, rows: bernoulli_log_lik(flat[rows], lvm.decoder(z.float())), len(x), 2), None


def truth_ss_vae(lvm, x):
    """y summed over its 10 values (uniform prior), z (one dimension) by quadrature."""
    labels = torch.eye(lvm.output_size)

    def log_lik(z, rows):
        per_label = [bernoulli_log_lik(x[rows], lvm.decoder([z.float(), label.expand(len(z), -1)]))
                     for label in labels]
        return torch.logsumexp(torch.stack(per_label), 0) - math.log(lvm.output_size)

    return quadrature(log_lik, len(x), 1), None


def mixture_1d_log_prob(x, weights, locs, scale):
    components = dist.Normal(locs.double(), scale.double()).log_prob(x.double().unsqueeze(-1))
    return torch.logsumexp(components + weights.double().log(), -1)


def truth_gmm_tutorial(lvm, x):
    """The mixture density at the AutoDelta (MAP) point: q(globals) is a point mass."""
    v = trace_values(lvm, x, "sample")
    return mixture_1d_log_prob(x, v["weights"], v["locs"], v["scale"]), None


def truth_mixture_params(lvm, x):
    p = trace_values(lvm, x, "param")
    return mixture_1d_log_prob(x, p["weights"], p["locs"], p["scale"]), None


def truth_mixture_mixed(lvm, x):
    p = trace_values(lvm, x, "param")
    components = dist.Normal(lvm.locs.detach().double(), p["scale"].double()).log_prob(
        x.double().unsqueeze(-2)).sum(-1)
    return torch.logsumexp(components + p["weights"].double().log(), -1), None


def truth_factor_analysis(lvm, x):
    p = trace_values(lvm, x, "param")
    return mvn_log_prob(x, p["mu"], p["W"] @ p["W"].T + torch.diag(p["psi"])), None


def truth_ppca_nn_module(lvm, x):
    W, b = lvm.decoder.weight.detach(), lvm.decoder.bias.detach()
    sigma = trace_values(lvm, x, "param")["sigma"]
    return mvn_log_prob(x, b, W @ W.T + sigma ** 2 * torch.eye(len(b))), None


def truth_ppca_subsample(lvm, x):
    W, b, sigma = lvm.weight.detach(), lvm.bias.detach(), lvm.sigma.detach()
    return mvn_log_prob(x, b, W @ W.T + sigma ** 2 * torch.eye(len(b))), None


def truth_fa_nested(lvm, x):
    w, mu, psi = lvm.w.detach(), lvm.mu.detach(), lvm.psi.detach()
    return mvn_log_prob(x, mu, torch.outer(w, w) + torch.diag(psi)), None


def log_mean_exp_with_error(log_w, dim=0):
    """log (1/S) sum_s exp(log_w_s) along ``dim``, and its delta-method standard error."""
    S = log_w.shape[dim]
    estimate = torch.logsumexp(log_w, dim) - math.log(S)
    w = torch.exp(log_w - log_w.max(dim, keepdim=True).values)
    relative_sd = w.std(dim) / w.mean(dim)
    return estimate, relative_sd / math.sqrt(S)


def truth_bayesian_ppca(lvm, x, num_samples=4000):
    """Held-out predictive log E_q(W) N(x; b, W W^T + sigma^2 I), W drawn from the fitted AutoNormal."""
    loc, scale = lvm.global_guide.locs.W.detach(), lvm.global_guide.scales.W.detach()
    generator = torch.Generator().manual_seed(11)
    W = loc + scale * torch.randn((num_samples,) + loc.shape, generator=generator)
    covariance = W @ W.transpose(-1, -2) + lvm.sigma.detach() ** 2 * torch.eye(len(loc))
    log_p = mvn_log_prob(x.unsqueeze(1), lvm.bias.detach(), covariance.unsqueeze(0))  # [N, S]
    return log_mean_exp_with_error(log_p, dim=1)


def truth_normal_autonormal(lvm, x, num_samples=20000):
    """Held-out predictive log E_q(loc) N(x; loc, 1), loc drawn by running the fitted guide."""
    with torch.no_grad(), pyro.plate("samples", num_samples, dim=-1):
        loc = poutine.trace(lvm.guide).get_trace(x).nodes["loc"]["value"]
    log_p = dist.Normal(loc.double().unsqueeze(0), 1.0).log_prob(x.double().unsqueeze(-1))  # [N, S]
    return log_mean_exp_with_error(log_p, dim=1)


def truth_normal_local(lvm, x):
    """loc_n ~ N(0, 1), x_n | loc_n ~ N(loc_n, 1): p(x_n) = N(x_n; 0, 2), whatever the guide."""
    return dist.Normal(0.0, math.sqrt(2.0)).log_prob(x.double()), None


def toy_mixture_log_prob(x, a, b, c):
    """p(A, C) under independent Beta guides: E[p_A]^A (1 - E[p_A])^(1 - A) sum_B E[p_B|A] E[p_C|B]."""
    mean = lambda beta: beta[..., 0] / beta.sum(-1)  # noqa: E731 -- E of Beta(alpha, beta)
    pa, pb, pc = mean(a.double()), mean(b.double()), mean(c.double())
    A, C = x[:, 0].long(), x[:, 1].double()
    log_a = torch.where(A == 1, pa.log(), torch.log1p(-pa))
    total = 0.0
    for B in (0, 1):
        p_b = torch.where(torch.tensor(B == 1), pb[A], 1 - pb[A])
        p_c = torch.where(C == 1, pc[B], 1 - pc[B])
        total = total + p_b * p_c
    return log_a + total.log()


def truth_toy_mixture(lvm, x):
    p = trace_values(lvm, x, "param")
    return toy_mixture_log_prob(x, p["a"].reshape(1, 2), p["b"], p["c"]), None


def hmm_log_prob(sequences, probs_x, probs_y):
    """The forward algorithm: log p(y_1..T) with x_0 = 0 as in examples/hmm.py (x[t] ~ probs_x[x[t-1]])."""
    y = sequences.double()
    log_px, log_py, log_qy = probs_x.double().log(), probs_y.double().log(), torch.log1p(-probs_y.double())
    log_emit = y @ log_py.T + (1 - y) @ log_qy.T  # [N, T, H]
    alpha = log_px[0] + log_emit[:, 0]
    for t in range(1, y.shape[1]):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + log_px, -2) + log_emit[:, t]
    return torch.logsumexp(alpha, -1)


def truth_hmm(lvm, x):
    v = trace_values(lvm, x, "sample")
    return hmm_log_prob(x, v["probs_x"], v["probs_y"]), None


def truth_two_layer_vae(lvm, x):
    """p(z1) = integral of p(z2) p(z1|z2) dz2 on a grid; then a one-dimensional quadrature over z1."""
    z2, cell2 = _grid(torch.tensor([-8.0]), torch.tensor([8.0]), 2001, 1)
    with torch.no_grad():
        loc, scale = (t.double() for t in lvm.prior_z1(z2.float()))
    prior_z2 = standard_normal_log_prob(z2) + math.log(cell2)

    def log_prior_z1(z1):
        return torch.logsumexp(dist.Normal(loc.T, scale.T).log_prob(z1) + prior_z2, -1)

    lo, hi = float((loc - 10 * scale).min()), float((loc + 10 * scale).max())
    return quadrature(lambda z1, rows: bernoulli_log_lik(x[rows], lvm.decoder(z1.float())), len(x), 1,
                      log_prior=log_prior_z1, lo=lo, hi=hi), None


def truth_sigmoid_belief_net(lvm, x):
    """The sum over all 2^(h1 + h2) binary configurations of the hidden layers."""
    h2s = torch.tensor(list(itertools.product([0.0, 1.0], repeat=lvm.h2_dim)))
    h1s = torch.tensor(list(itertools.product([0.0, 1.0], repeat=lvm.layer2.out_features)))
    with torch.no_grad():
        log_p2 = dist.Bernoulli(logits=lvm.prior_logits).log_prob(h2s).sum(-1).double()  # [C2]
        log_p1 = dist.Bernoulli(logits=lvm.layer2(h2s).unsqueeze(1)).log_prob(h1s).sum(-1).double()  # [C2, C1]
        log_px = bernoulli_log_lik(x, torch.sigmoid(lvm.layer1(h1s)))  # [N, C1]
    joint = log_px.unsqueeze(1) + log_p1 + log_p2.unsqueeze(-1)  # [N, C2, C1]
    return torch.logsumexp(joint.reshape(len(x), -1), -1), None


def multinomial_log_prob(docs, probs):
    """log Multinomial(docs | sum(docs), probs) for docs [N, V], probs [G, V] -> [N, G]."""
    docs = docs.double()
    norm = torch.lgamma(docs.sum(-1) + 1) - torch.lgamma(docs + 1).sum(-1)
    return docs @ probs.double().clamp_min(1e-30).log().T + norm.unsqueeze(-1)


def truth_prodlda(lvm, x):
    """Quadrature with the decoder in evaluation mode. With two topics, softmax(logtheta) depends on
    d = logtheta_1 - logtheta_2 only, and d ~ N(0, 2) under the N(0, I) prior: a one-dimensional integral."""
    lvm.eval()

    def log_lik(d, rows):
        theta = torch.cat([torch.sigmoid(d), torch.sigmoid(-d)], -1).float()
        return multinomial_log_prob(x[rows], lvm.decoder(theta))

    log_prior = lambda d: dist.Normal(0.0, math.sqrt(2.0)).log_prob(d.double()).sum(-1)  # noqa: E731
    return quadrature(log_lik, len(x), 1, log_prior=log_prior, lo=-10.0, hi=10.0), None


def truth_masked_mixture(lvm, x):
    """MaskedMixture(k, c0, c1) takes c1 where k = 1: p(x) = (1 - pi) N(loc_0, s_0^2) + pi N(loc_1, s_1^2)."""
    pi = lvm.pi.detach()
    return mixture_1d_log_prob(x, torch.stack([1 - pi, pi]), lvm.locs.detach(), lvm.scales.detach()), None


def truth_mixture_same_family(lvm, x):
    p = trace_values(lvm, x, "param")
    components = dist.Normal(p["locs"].double(), p["scales"].double()).log_prob(x.double().unsqueeze(-2)).sum(-1)
    return torch.logsumexp(components + p["weights"].double().log(), -1), None


def truth_full_covariance(lvm, x):
    p = trace_values(lvm, x, "param")
    components = dist.MultivariateNormal(p["locs"].double(), scale_tril=p["scale_tril"].double()).log_prob(
        x.double().unsqueeze(-2))
    return torch.logsumexp(components + p["weights"].double().log(), -1), None


def truth_vae_deterministic(lvm, x):
    W, b = lvm.decoder.weight.detach(), lvm.decoder.bias.detach()
    sigma = trace_values(lvm, x, "param")["sigma"]
    return mvn_log_prob(x, b, W @ W.T + sigma ** 2 * torch.eye(len(b))), None


def truth_local_params_fa(lvm, x):
    W, b, psi = lvm.decoder.weight.detach(), lvm.decoder.bias.detach(), lvm.log_noise.detach().exp() ** 2
    return mvn_log_prob(x, b, W @ W.T + torch.diag(psi)), None


def truth_dmm_linear(lvm, x):
    """The linear-Gaussian DMM's sequence x [N, T, D] is jointly Gaussian: z = mu + L e with e ~ N(0, I)
    stacked over time (z_t = A z_{t-1} + a + s_z e_t from z_0), x_t = C z_t + c + s_x noise."""
    N, T, D = x.shape
    with torch.no_grad():
        A, a = (t.double() for t in (lvm.trans.lin_z_to_loc.weight, lvm.trans.lin_z_to_loc.bias))
        C, c = (t.double() for t in (lvm.emitter.lin_z_to_loc.weight, lvm.emitter.lin_z_to_loc.bias))
        s_z, s_x = lvm.trans.log_scale.exp().double(), lvm.emitter.log_scale.exp().double()
        Z = A.shape[0]
        mean, L = lvm.z_0.double(), torch.zeros(Z, T * Z, dtype=torch.float64)
        means, rows = [], []
        for t in range(T):
            mean, L = A @ mean + a, A @ L
            L[:, t * Z:(t + 1) * Z] += torch.diag(s_z)
            means.append(mean)
            rows.append(L)
        mu, L = torch.cat(means), torch.cat(rows)
        C_all = torch.block_diag(*[C] * T)
        covariance = C_all @ L @ L.T @ C_all.T + torch.diag(s_x.repeat(T) ** 2)
    return mvn_log_prob(x.reshape(N, T * D), C_all @ mu + c.repeat(T), covariance), None


def truth_scvi_poisson(lvm, x):
    """One latent dimension: quadrature over z of prod_g Poisson(x_g; exp(decoder(z))_g), unscaled (the
    tutorial's poutine.scale multiplies the objective, not the model's density)."""
    def log_lik(z, rows):
        rate = lvm.decoder(z.float()).exp().double()  # [G, genes]
        return dist.Poisson(rate).log_prob(x[rows].double().unsqueeze(1)).sum(-1)

    return quadrature(log_lik, len(x), 1), None


def prototype_bits(seed=13, sizes=(300, 50, 50)):
    """8 binary pixels from two noisy prototypes (the categorical VAE's data)."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    prototypes = np.array([[0.9] * 4 + [0.1] * 4, [0.1] * 4 + [0.9] * 4])
    return _splits((rng.random((n, 8)) < prototypes[rng.choice(2, n)]).astype(np.float32), sizes)


def truth_categorical_vae(lvm, x):
    def log_lik(z, rows):
        logits = lvm.decoder(z.float()).reshape(len(z), lvm.data_dim, lvm.num_categories).double()
        return dist.Categorical(logits=logits).log_prob(x[rows].long().unsqueeze(1)).sum(-1)

    return quadrature(log_lik, len(x), 1), None


def predictive_by_guide(lvm, x, log_lik, num_samples=1000, seed=12):
    """Held-out predictive log (1/S) sum_s p(x_n | theta_s), theta_s ~ q drawn by running the fitted guide
    (any AutoGuide or easyguide); ``log_lik(values, x)`` -> [N] from the sampled globals."""
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        draws = [log_lik(traced(lvm.guide, x).nodes, x) for _ in range(num_samples)]
    return log_mean_exp_with_error(torch.stack(draws).double(), dim=0)


def truth_autoguide_list(lvm, x):
    return predictive_by_guide(lvm, x, lambda v, x: dist.Normal(v["loc"]["value"], v["scale"]["value"]).log_prob(x))


def truth_lowrank_mvn(lvm, x):
    return predictive_by_guide(lvm, x, lambda v, x: dist.Normal(
        v["mu"]["value"], v["log_sigma"]["value"].exp()).log_prob(x).sum(-1))


def truth_autoiaf(lvm, x):
    return predictive_by_guide(lvm, x, lambda v, x: dist.Normal(
        v["mu"]["value"], v["log_s"]["value"].exp()).log_prob(x).sum(-1))


def truth_easyguide(lvm, x):
    def log_lik(v, x):
        locs, scale = v["locs"]["value"], v["scale"]["value"]
        return mixture_1d_log_prob(x, torch.tensor([0.5, 0.5]), locs, scale)

    return predictive_by_guide(lvm, x, log_lik)


def gaussian_floor(splits):
    """Test log p(x) per point of one Gaussian fitted to the training split (maximum likelihood): a
    fitted mixture must do better (an untrained one, its pyro.param values left at their start, does not)."""
    train, test = splits["train"].double(), splits["test"].double()
    train, test = (train.unsqueeze(-1), test.unsqueeze(-1)) if train.dim() == 1 else (train, test)
    centred = train - train.mean(0)
    return float(mvn_log_prob(test, train.mean(0), centred.T @ centred / len(train)).mean())


def ppca_floor(splits):
    """Halfway between the test log p(x) of the best diagonal Gaussian and of the one-factor PPCA
    maximum-likelihood fit (Tipping & Bishop 1999, closed form): a fit whose codes carry nothing (the
    guide's z scored against another point's x) stays near the diagonal Gaussian."""
    train, test = splits["train"].double(), splits["test"].double()
    mean = train.mean(0)
    covariance = (train - mean).T @ (train - mean) / len(train)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    noise = values[:-1].mean()
    W = vectors[:, -1:] * (values[-1] - noise).sqrt()
    ppca = mvn_log_prob(test, mean, W @ W.T + noise * torch.eye(len(mean))).mean()
    diagonal = mvn_log_prob(test, mean, torch.diag(torch.diag(covariance))).mean()
    return float(ppca + diagonal) / 2


# ---------------------------------------------------------------------------------------------
# The corpus: one row per program.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    program: str                      # tests/pyro_programs/FILE[:Class]
    data: object                      # builder -> {"train", "valid", "test"} arrays
    fit: tuple = ()                   # extra fit arguments (-p, --epochs, ...)
    works: tuple = ()                 # estimators that must give the right number
    either: tuple = ()                # estimators that may also be refused (exit 2, one line)
    refused: tuple = ()               # estimators that must be refused
    truth: object = None              # (lvm, x_test) -> (log p per point, its MC error or None)
    samples: dict = dataclasses.field(default_factory=dict)  # estimator -> K, beyond DEFAULT_SAMPLES
    two_sided: tuple = ("is",)        # estimators that must also not fall below the truth (see _check_estimate)
    changed: dict = dataclasses.field(default_factory=dict)  # pyro.param or AutoDelta site -> initial value
    predictive: bool = False          # global latents: per-point values are held-out predictive ones
    diagnose: str = "works"           # works | either (no local latent the guide samples)
    rate: bool = False                # check diagnose's rate against a Monte Carlo rate
    floor: object = None              # splits -> a test log p(x) the fitted model must exceed
    refused_fits: tuple = ()          # objectives that must be refused at fit time
    refusal_hint: str = ""            # a word the refusals of evaluate must contain
    train_split: tuple = ()           # estimators that may work on the training split (else be refused)
    fresh_process: str = None         # an estimator to rerun in a fresh process (checkpoint restore)
    needs_mnist: bool = False

    @property
    def name(self):
        return self.program.split(".py")[0]


def hp(**values):
    """``-p KEY=VALUE`` arguments."""
    return tuple(itertools.chain.from_iterable(("-p", f"{k}={v}") for k, v in values.items()))


def train(epochs=30, lr=0.05, *extra):
    return ("--epochs", str(epochs), "--lr", str(lr), *extra)


CONTINUOUS = ("elbo", "iwae", "is", "ais")   # a continuous local latent: no exact value in pyro-lvm
ENUMERATED = ("exact", "is", "elbo", "iwae")  # discrete latents summed out: every estimator is exact-ish
EITHER = "either"
CASES = [
    Case("vae_tutorial.py:VAE", mnist_binary, hp(z_dim=2, hidden_dim=16) + train(5, 0.01), CONTINUOUS,
         refused=("exact",), truth=truth_vae_tutorial, two_sided=(), rate=True, needs_mnist=True),
    Case("ss_vae_m2.py:SSVAE", binary_digits, hp(input_size=64, z_dim=1, hidden_layers=16) + train(30, 0.01),
         CONTINUOUS, refused=("exact",), truth=truth_ss_vae),
    Case("gmm_tutorial.py", mixture_1d, train(30, 0.05, "--batch-size", "200"), ENUMERATED, either=("ais",),
         truth=truth_gmm_tutorial, changed={"weights": [0.5, 0.5], "scale": 1.0}, predictive=True, diagnose=EITHER),
    Case("mixture_params_only.py", mixture_1d, train(), ENUMERATED, either=("ais",), truth=truth_mixture_params,
         changed={"weights": [0.5, 0.5], "scale": 0.5}, diagnose=EITHER, fresh_process="exact"),
    Case("mixture_local_guide.py", mixture_1d, train(30, 0.05, "--batch-size", "200"),
         either=("exact", "is", "elbo", "ais"), truth=truth_mixture_params, changed={"scale": 0.5}, diagnose=EITHER),
    Case("mixture_mixed_params.py:GaussianMixture", mixture_2d, train(), ENUMERATED, either=("ais",),
         truth=truth_mixture_mixed, changed={"weights": [1 / 3] * 3, "scale": [1.0, 1.0]}, diagnose=EITHER,
         fresh_process="exact"),
    Case("factor_analysis_functions.py", linear_gaussian, train(), CONTINUOUS, refused=("exact",),
         truth=truth_factor_analysis, changed={"psi": [1.0] * 3}, rate=True, floor=ppca_floor),
    Case("ppca_nn_module.py:PPCA", linear_gaussian, hp(data_dim=3) + train(), CONTINUOUS, refused=("exact",),
         truth=truth_ppca_nn_module, changed={"sigma": 1.0}, rate=True, floor=ppca_floor),
    Case("bayesian_ppca.py:BayesianPPCA", linear_gaussian, hp(data_dim=3) + train(), ("is", "elbo", "iwae"),
         either=("ais",), refused=("exact",), truth=truth_bayesian_ppca, samples={"is": 2000}, predictive=True,
         diagnose=EITHER, floor=ppca_floor),
    Case("normal_autonormal.py", normal_1d, train(100), ("is", "elbo"), either=("iwae", "ais"), refused=("exact",),
         truth=truth_normal_autonormal, predictive=True, diagnose=EITHER),
    Case("normal_local_autonormal.py", normal_local_1d, train(100, 0.05, "--batch-size", "60"), refused=CONTINUOUS,
         truth=truth_normal_local, diagnose=EITHER, refusal_hint="amortiz", train_split=("is", "elbo")),
    Case("toy_mixture_enum.py", toy_mixture_data, train(), ("is", "elbo"), either=("iwae", "ais"), refused=("exact",),
         truth=truth_toy_mixture, changed={"b": [[10.0, 1.0], [1.0, 10.0]]}, predictive=True, diagnose=EITHER),
    Case("hmm_vectorized.py", hmm_sequences, train(), ENUMERATED, either=("ais",), truth=truth_hmm,
         predictive=True, diagnose=EITHER),
    Case("two_layer_vae.py:TwoLayerVAE", binary_digits, hp(input_dim=64, z1_dim=1, z2_dim=1, hidden_dim=16)
         + train(10, 0.01), CONTINUOUS, refused=("exact",), truth=truth_two_layer_vae, rate=True),
    Case("sigmoid_belief_net.py:SigmoidBeliefNet", binary_digits, hp(input_dim=64, h1_dim=3, h2_dim=3)
         + train(10, 0.01), ("elbo", "iwae", "is"), either=("exact", "ais"), truth=truth_sigmoid_belief_net,
         rate=True, refused_fits=("meanfield", "iwae-dreg")),
    Case("sparse_gamma_def.py:SparseGammaDEF", lambda: counts(sizes=(80, 20, 20)),
         hp(top_width=3, mid_width=2, bottom_width=2, image_size=12) + train(20, 0.01, "--batch-size", "80"),
         refused=CONTINUOUS, diagnose=EITHER, refusal_hint="amortiz"),
    Case("ppca_subsample.py:SubsampledPPCA", linear_gaussian, hp(data_dim=3, subsample_size=32) + train(),
         CONTINUOUS, refused=("exact",), truth=truth_ppca_subsample, floor=ppca_floor),
    Case("fa_nested_plates.py:NestedPlateFA", linear_gaussian, hp(data_dim=3) + train(), CONTINUOUS,
         refused=("exact",), truth=truth_fa_nested, rate=True, floor=ppca_floor),
    Case("prodlda.py:ProdLDA", counts, hp(vocab_size=12, num_topics=2, hidden=16)
         + train(10, 0.01, "--objective", "meanfield"), CONTINUOUS, refused=("exact",), truth=truth_prodlda,
         two_sided=()),
    # The kept-apart rehearsal (issue 10): idioms beyond the first corpus.
    Case("masked_mixture.py:MaskedGaussianMixture", mixture_1d, train(), ENUMERATED, either=("ais",),
         truth=truth_masked_mixture, diagnose=EITHER, floor=gaussian_floor),
    Case("mixture_same_family.py", mixture_2d, train(), ENUMERATED, either=("ais",), truth=truth_mixture_same_family,
         changed={"weights": [1 / 3] * 3}, diagnose=EITHER, floor=gaussian_floor),
    Case("full_covariance_params.py", mixture_2d, train(), ENUMERATED, either=("ais",), truth=truth_full_covariance,
         changed={"scale_tril": [[[1.0, 0.0], [0.0, 1.0]]] * 3}, diagnose=EITHER, fresh_process="exact",
         floor=gaussian_floor),
    Case("vae_deterministic.py:DeterministicVAE", linear_gaussian, train(), CONTINUOUS, refused=("exact",),
         truth=truth_vae_deterministic, changed={"sigma": 1.0}, rate=True, floor=ppca_floor),
    Case("dmm_linear.py:DMM", linear_gaussian_sequences, train(10, 0.02), CONTINUOUS, refused=("exact",),
         truth=truth_dmm_linear, rate=True, two_sided=()),
    Case("scvi_poisson.py:CountVAE", poisson_counts, train(20, 0.01), CONTINUOUS, refused=("exact",),
         truth=truth_scvi_poisson, rate=True, two_sided=()),
    Case("categorical_vae.py:CategoricalVAE", prototype_bits, train(20, 0.02), CONTINUOUS, refused=("exact",),
         truth=truth_categorical_vae, rate=True),
    Case("local_params_subsample.py:LocalParamFA", linear_gaussian, train(30, 0.05, "--batch-size", "300"),
         refused=CONTINUOUS, truth=truth_local_params_fa, diagnose=EITHER, refusal_hint="amortiz",
         train_split=("is", "elbo")),
    Case("autoguide_list.py", normal_1d, train(), ("is", "elbo"), either=("iwae", "ais"), refused=("exact",),
         truth=truth_autoguide_list, predictive=True, diagnose=EITHER),
    Case("lowrank_mvn.py", linear_gaussian, train(), ("is", "elbo"), either=("iwae", "ais"), refused=("exact",),
         truth=truth_lowrank_mvn, predictive=True, diagnose=EITHER),
    Case("autoiaf_global.py", mixture_2d, train(30, 0.02), ("is", "elbo"), either=("iwae", "ais"),
         refused=("exact",), truth=truth_autoiaf, predictive=True, diagnose=EITHER),
    Case("easyguide_global.py", mixture_1d, train(), ("is", "elbo"), either=("iwae", "ais"), refused=("exact",),
         truth=truth_easyguide, predictive=True, diagnose=EITHER),
]


# ---------------------------------------------------------------------------------------------
# The harness.
# ---------------------------------------------------------------------------------------------

def _write_data(case, tmp_path, shared_data):
    splits = case.data(shared_data) if case.needs_mnist else case.data()
    path = tmp_path / f"{case.name}.npz"
    np.savez(path, **splits)
    return path, {k: torch.from_numpy(v) for k, v in splits.items()}


def _command(capsys, *args):
    """One pyro-lvm command in this process, as if it were a fresh one: Pyro's global parameter
    store starts empty, as it does in a new process (nothing may live only in this process)."""
    pyro.clear_param_store()
    return cli(capsys, *args)


def _one_line_refusal(code, err):
    """Exit status 2 with one ``error:`` line and no traceback (Python warnings aside)."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return code == 2 and len(errors) == 1 and "Traceback" not in err and "internal error" not in err


def _check_estimate(name, record, truth, truth_se, problems, two_sided, elbo=None):
    """Compare one evaluate record with the independent value (mean over the same points).

    ``exact`` must equal it. ``elbo``, ``iwae``, ``is`` and ``ais`` are stochastic lower bounds of it
    (Jensen; Burda et al. 2015, theorem 1; Neal 2001 for AIS), so each must not exceed it by more than
    4 combined standard errors; ``iwae`` and ``is`` must not fall below the ELBO (the K-sample bound
    grows with K from K = 1, the ELBO). Where the case says the estimator is accurate (``two_sided``),
    it must also agree with it within 4 standard errors. Elsewhere the downward bias of a finite K is
    not bounded by the standard error: measured here, importance sampling with K = 2000 from the 2-D
    MNIST VAE tutorial's guide missed a posterior mode of one test point by 45 nats. AIS is checked
    from above only: the bias of a CI-sized annealing schedule is systematic, not part of its
    ``mc_stderr``.
    """
    log_px, mc = record.get("log_px"), record.get("mc_stderr")
    if log_px is None or not math.isfinite(log_px):
        problems.append(f"{name}: log_px is {log_px!r}")
        return
    if mc is None or not math.isfinite(mc):
        problems.append(f"{name}: mc_stderr is {mc!r}; every estimate must report its Monte Carlo error")
        mc = 0.0
    if abs(record.get("nll", math.nan) + log_px) > 1e-9:
        problems.append(f"{name}: nll {record.get('nll')} is not -log_px {log_px}")
    tol = Z_SIGMA * math.hypot(mc, truth_se) + FLOAT_TOL
    estimator = name.split()[0]
    text = f"{name}: log_px {log_px:.4f} (mc_stderr {mc:.2g}) vs independent {truth:.4f} (+- {truth_se:.2g})"
    if estimator == "exact":
        if abs(log_px - truth) > FLOAT_TOL + Z_SIGMA * truth_se:
            problems.append(text + " differ")
        return
    if log_px > truth + tol:
        problems.append(text + f": above the true log p(x) by more than {tol:.3g}")
    if name in two_sided and log_px < truth - tol:
        problems.append(text + f": below it by more than {tol:.3g}")
    if estimator in ("iwae", "is") and elbo is not None:
        floor = elbo["log_px"] - Z_SIGMA * math.hypot(mc, elbo.get("mc_stderr") or 0.0) - FLOAT_TOL
        if log_px < floor:
            problems.append(text + f": below the ELBO {elbo['log_px']:.4f}")


def _loaded_state(run, x, seed):
    """Every parameter of the loaded program, after one trace of its guide and model on ``x``, with the
    random-number generators seeded by ``seed`` first: Pyro's parameter store and the module's state.
    Two seeds giving different values means something was initialised afresh, not restored."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    lvm = pyro_lvm.load_run(run, device="cpu").model
    trace_values(lvm, x, "param")
    state = {f"param store {name}": value for name, value in pyro.get_param_store().items()}
    if isinstance(lvm, torch.nn.Module):
        state.update({f"state_dict {name}": value for name, value in lvm.state_dict().items()})
    return {name: value.detach().clone() for name, value in state.items()}


def _mc_rate(lvm, x, num_samples=200):
    """E_x E_q[log q(z|x) - log p(z)] over the local latents the guide samples, by Monte Carlo from
    Pyro traces. Returns the estimate (``num_samples`` draws per point) and sigma_1, the standard error
    of an estimate that draws one sample per point (the error with S draws is sigma_1 / sqrt(S))."""
    totals = []
    with torch.no_grad():
        for _ in range(num_samples):
            guide_trace = poutine.trace(lvm.guide).get_trace(x)
            model_trace = poutine.trace(poutine.replay(lvm.model, trace=guide_trace)).get_trace(x)
            total = torch.zeros(len(x), dtype=torch.float64)
            for name, site in guide_trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"] or name not in model_trace.nodes:
                    continue
                data_dims = [f.dim for f in site["cond_indep_stack"] if f.vectorized and f.size == len(x)]
                if not data_dims:
                    continue
                diff = (site["fn"].log_prob(site["value"])
                        - model_trace.nodes[name]["fn"].log_prob(model_trace.nodes[name]["value"])).double()
                total += diff.movedim(data_dims[0], 0).reshape(len(x), -1).sum(-1)
            totals.append(total)
    draws = torch.stack(totals)  # [S, N]
    return float(draws.mean()), float(draws.var(0).mean().sqrt() / math.sqrt(len(x)))


def _check_refused_fits(case, model, data_path, tmp_path, capsys, problems):
    """Objectives the program cannot use: exit 2, one line naming an alternative, no run directory."""
    for objective in case.refused_fits:
        out = tmp_path / f"refused-{objective}"
        code, _, err = _command(capsys, "fit", model, "--data", data_path, *case.fit, "--objective", objective,
                                "--epochs", "1", "--device", "cpu", "--quiet", "--out", out)
        if not _one_line_refusal(code, err):
            problems.append(f"fit --objective {objective}: expected exit 2 with one line, got {code}: {err[-500:]}")
        elif not re.search(r"\b(elbo|iwae)\b", err.replace(objective, "")):
            problems.append(f"fit --objective {objective}: the refusal names no alternative objective: {err.strip()}")
        if out.exists():
            problems.append(f"fit --objective {objective} was refused but left {out} behind")


def _check_restored(case, run, x_test, lvm, problems):
    """Everything comes back from the run directory, and pyro.param / AutoDelta values were optimized."""
    first, second = _loaded_state(run, x_test, seed=1), _loaded_state(run, x_test, seed=2)
    differing = sorted(name for name in set(first) | set(second)
                       if name not in first or name not in second or not torch.equal(first[name], second[name]))
    if differing:
        problems.append(f"loading the run twice gives different values of {differing}: they are not restored "
                        f"from the checkpoint")
    fitted = {**trace_values(lvm, x_test, "sample"), **trace_values(lvm, x_test, "param")} if case.changed else {}
    for name, initial in case.changed.items():
        if name not in fitted:
            problems.append(f"{name!r} is not in the loaded program's traces")
        elif torch.allclose(fitted[name].double(), torch.tensor(initial, dtype=torch.float64), atol=1e-3):
            problems.append(f"{name!r} is still at its initial value {initial} after fit and reload: not optimized "
                            f"or not saved")


def _evaluate_all(case, run, lvm, splits, truth, truth_se, capsys, problems):
    """``evaluate --json`` with every estimator of the case; returns the records of those that ran."""
    x_test, x_train = splits["test"], splits["train"]
    records = {}
    for name in ("elbo", "iwae", "is", "exact", "ais"):
        if name not in case.works + case.either + case.refused:
            continue
        args = ["evaluate", run, "--estimator", name, "--samples", case.samples.get(name, DEFAULT_SAMPLES[name]),
                "--json", "--device", "cpu"]
        args += ["--ais-steps", AIS_STEPS, "--limit", AIS_POINTS] if name == "ais" else []
        code, out, err = _command(capsys, *args)
        if name in case.refused or (name in case.either and code != 0):
            if not _one_line_refusal(code, err):
                expected = "a refusal" if name in case.refused else "a number or a refusal"
                problems.append(f"evaluate {name}: expected {expected} (exit 2, one line), got exit {code}: "
                                f"{err[-800:]}")
            elif case.refusal_hint and case.refusal_hint not in err.lower():
                problems.append(f"evaluate {name}: the refusal should say {case.refusal_hint!r}: {err.strip()}")
            continue
        if code != 0:
            problems.append(f"evaluate {name}: exit {code}: {err[-800:]}")
            continue
        record = records[name] = one_json(out)
        expected_points = len(x_test[:AIS_POINTS if name == "ais" else None])
        if record.get("num_points") != expected_points:
            problems.append(f"evaluate {name}: num_points {record.get('num_points')}, expected {expected_points}")
        if case.predictive and "predictive" not in json.dumps(record).lower():
            problems.append(f"evaluate {name}: a model with global latents; the JSON must say the value is the "
                            f"held-out predictive log p(x_n | training data): {record}")
        if truth is not None:
            _check_estimate(name, record, truth[name], truth_se[name], problems, case.two_sided,
                            elbo=records.get("elbo"))
    for name in case.train_split:
        # An AutoGuide over local latents has a q for each training point: estimates there may work.
        code, out, err = _command(capsys, "evaluate", run, "--split", "train", "--estimator", name, "--json",
                                  "--samples", DEFAULT_SAMPLES[name], "--device", "cpu")
        if code != 0:
            if not _one_line_refusal(code, err):
                problems.append(f"evaluate --split train {name}: expected a number or a refusal (exit 2, one "
                                f"line), got exit {code}: {err[-800:]}")
            continue
        record = one_json(out)
        on_train = float(case.truth(lvm, x_train)[0].mean())
        _check_estimate(f"{name} on the training split", record, on_train, 0.0, problems,
                        tuple(f"{n} on the training split" for n in case.two_sided))
    if case.fresh_process and case.fresh_process in records:
        # A real process starts with an empty parameter store: everything must come from the checkpoint.
        done = cli_process("evaluate", run, "--estimator", case.fresh_process, "--json", "--device", "cpu")
        if done.returncode != 0:
            problems.append(f"evaluate {case.fresh_process} in a fresh process: exit {done.returncode}: "
                            f"{done.stderr[-800:]}")
        elif abs(one_json(done.stdout)["log_px"] - records[case.fresh_process]["log_px"]) > FLOAT_TOL:
            problems.append(f"evaluate {case.fresh_process} in a fresh process: {one_json(done.stdout)['log_px']} vs "
                            f"{records[case.fresh_process]['log_px']} in this one")
    return records


def _check_sample(run, capsys, problems):
    """The toolkit picks the format (a picture for images, CSV for vectors); -n points must come out."""
    code, _, err = _command(capsys, "sample", run, "-n", "16", "--device", "cpu")
    written = sorted(run.glob("samples.*"))
    if code != 0 or len(written) != 1:
        problems.append(f"sample: exit {code}, wrote {[p.name for p in written]}: {err[-800:]}")
    elif written[0].suffix == ".csv":
        rows = [line for line in written[0].read_text().splitlines()[1:] if line.strip()]
        if len(rows) != 16:
            problems.append(f"sample -n 16 wrote {len(rows)} rows")


def _check_fuzziness(diagnosis, problems):
    """The fuzziness of codes is a number from 0 to about the split's total variance (it exceeds it only by
    Monte Carlo error), or null with its reason."""
    value, reason = diagnosis.get("fuzziness", "absent"), (diagnosis.get("null_reason") or {}).get("fuzziness")
    if value is None:
        if not (isinstance(reason, str) and reason):
            problems.append("diagnose: fuzziness is null without a reason in null_reason")
    elif not (isinstance(value, float) and 0 <= value and 0 <= diagnosis["fuzziness_ratio"] <= 1.1):
        problems.append(f"diagnose: fuzziness {value!r}, ratio {diagnosis.get('fuzziness_ratio')!r}: "
                        "not a number between 0 and the total variance")


def _check_diagnose_and_report(case, run, lvm, x_test, records, tmp_path, capsys, problems):
    """diagnose's ELBO agrees with evaluate's, its rate with the traces' Monte Carlo rate, report with diagnose."""
    code, out, err = _command(capsys, "diagnose", run, "--json", "--device", "cpu")
    diagnosis = one_json(out) if code == 0 else None
    if code != 0 and (case.diagnose == "works" or not _one_line_refusal(code, err)):
        problems.append(f"diagnose: exit {code}: {err[-800:]}")
    if diagnosis is not None and "elbo" in records and diagnosis.get("elbo") is not None:
        mc = records["elbo"].get("mc_stderr") or 0.0
        tol = Z_SIGMA * mc * math.sqrt(1 + 10 / 16) + FLOAT_TOL  # diagnose draws 16 samples per point, evaluate 10
        if abs(diagnosis["elbo"] - records["elbo"]["log_px"]) > tol:
            problems.append(f"diagnose elbo {diagnosis['elbo']:.4f} vs evaluate elbo {records['elbo']['log_px']:.4f} "
                            f"(tolerance {tol:.3g})")
    if diagnosis is not None:
        _check_fuzziness(diagnosis, problems)
    rate_sigma = None
    if diagnosis is not None and case.rate:
        rate, rate_sigma = _mc_rate(lvm, x_test, num_samples=200)
        reported = diagnosis.get("rate")
        tol = Z_SIGMA * rate_sigma * math.sqrt(1 / 16 + 1 / 200) + FLOAT_TOL  # diagnose draws 16 per point
        if reported is None or abs(reported - rate) > tol:
            problems.append(f"diagnose rate {reported} vs Monte Carlo E[log q(z|x) - log p(z)] {rate:.4f} "
                            f"(tolerance {tol:.3g})")

    report_dir = tmp_path / "report"
    code, _, err = _command(capsys, "report", run, "--out", report_dir, "--device", "cpu")
    if code != 0:
        if case.diagnose == "works" or not _one_line_refusal(code, err):
            problems.append(f"report: exit {code}: {err[-800:]}")
        return
    if not (report_dir / "index.html").is_file():
        problems.append("report: exit 0 but no index.html")
    shown = report_dir / "diagnostics.json"
    shown = json.loads(shown.read_text()) if shown.is_file() else {}
    if rate_sigma is not None and shown.get("rate") is not None:
        tol = Z_SIGMA * rate_sigma * math.sqrt(2 / 16) + FLOAT_TOL
        if abs(shown["rate"] - diagnosis["rate"]) > tol:
            problems.append(f"report rate {shown['rate']} vs diagnose rate {diagnosis['rate']} (tolerance {tol:.3g})")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_pyro_program(case, tmp_path, capsys, request):
    """One program through the command line: fit, evaluate (every estimator), sample, diagnose, report."""
    shared = request.getfixturevalue("shared_data") if case.needs_mnist else None
    data_path, splits = _write_data(case, tmp_path, shared)
    run, model, problems = tmp_path / "run", str(PROGRAMS / case.program), []

    _check_refused_fits(case, model, data_path, tmp_path, capsys, problems)
    code, _, err = _command(capsys, "fit", model, "--data", data_path, *case.fit, "--seed", "0", "--device", "cpu",
                            "--quiet", "--out", run)
    assert code == 0, f"{case.name}: fit exited {code}: {err[-2000:]}"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not metrics or not all(math.isfinite(m["train_elbo"]) for m in metrics):
        problems.append(f"metrics.jsonl has no finite train_elbo: {metrics[-1:]}")

    x_test = splits["test"]
    pyro.clear_param_store()  # what load_run restores must come from the run directory alone
    lvm = pyro_lvm.load_run(run, device="cpu").model
    truth = truth_se = None
    if case.truth is not None:
        per_point, per_point_se = case.truth(lvm, x_test)
        per_point_se = torch.zeros_like(per_point) if per_point_se is None else per_point_se
        points = {name: AIS_POINTS if name == "ais" else len(per_point) for name in DEFAULT_SAMPLES}
        truth = {name: float(per_point[:n].mean()) for name, n in points.items()}
        truth_se = {name: float(per_point_se[:n].pow(2).sum().sqrt() / n) for name, n in points.items()}
        if case.floor is not None and truth["exact"] < case.floor(splits):
            problems.append(f"the fitted model's test log p(x) {truth['exact']:.4f} (independent value) is below "
                            f"{case.floor(splits):.4f}: the fit did not learn what it should have")
    # a guide with one parameter per training point runs on the training points only
    _check_restored(case, run, splits["train"] if case.train_split else x_test, lvm, problems)
    records = _evaluate_all(case, run, lvm, splits, truth, truth_se, capsys, problems)
    _check_sample(run, capsys, problems)
    _check_diagnose_and_report(case, run, lvm, x_test, records, tmp_path, capsys, problems)
    if case.train_split:
        # A guide with one parameter per training point has codes for the training split: the report shows them.
        code, _, err = _command(capsys, "report", run, "--split", "train", "--out", tmp_path / "train-report",
                                "--device", "cpu")
        if code != 0 or not (tmp_path / "train-report" / "reconstructions.png").is_file():
            problems.append(f"report --split train: exit {code}, no reconstructions: {err[-800:]}")
    assert not problems, f"{case.name}:\n  " + "\n  ".join(problems)


# Programs that pyro-lvm cannot fit as they stand: each must be refused by ``fit`` with exit status 2
# and one ``error:`` line that says what to change (matched by ``hint``), never exit 1 nor a
# traceback; a fit refused before its first checkpoint leaves no run directory (``leaves_run``: the
# program fails only mid-training, after checkpoints a ``--resume`` could continue from).
REFUSED = [
    ("bayesian_regression.py", linear_gaussian, r"observes no data.*obs=", False),
    ("factor_likelihood.py:FactorModel", linear_gaussian, r"observes no data.*obs=", False),
    ("argparse_at_import.py", normal_1d, r"argparse_at_import\.py.*line \d+.*__name__ == \"__main__\"", False),
    ("sequential_enum.py:SequentialMixture", lambda: binary_digits(), r"'enumerate': 'parallel'", False),
    ("standardized_obs.py:StandardizedFA", linear_gaussian, r"not a part of x.*Jacobian.*observe x itself", False),
    ("bug_mid_training.py:BuggyVAE", linear_gaussian, r"bug_mid_training\.py:\d+ \(in model\): NameError", True),
]


@pytest.mark.parametrize("program, data, hint, leaves_run", REFUSED, ids=[r[0].split(".py")[0] for r in REFUSED])
def test_pyro_program_refused(program, data, hint, leaves_run, tmp_path, capsys):
    path = tmp_path / "data.npz"
    np.savez(path, **data())
    run = tmp_path / "run"
    hyper = hp(data_dim=64) if program.startswith("sequential_enum") else ()
    args = ("fit", str(PROGRAMS / program), "--data", path, *hyper, "--epochs", "10", "--device", "cpu", "--quiet",
            "--out", run)
    if program.startswith("argparse"):
        # argparse reads sys.argv: only a process of its own has pyro-lvm's command line there
        done = cli_process(*args)
        code, err = done.returncode, done.stderr
    else:
        code, _, err = _command(capsys, *args)
    assert _one_line_refusal(code, err), f"expected exit 2 with one error line, got {code}: {err[-1500:]}"
    assert re.search(hint, err), f"the refusal does not say what to change ({hint!r}): {err.strip()}"
    assert leaves_run or not run.exists(), f"a refused fit left {run} behind"


# ---------------------------------------------------------------------------------------------
# The corpus is valid Pyro, and the independent values are right: checks that need no pyro-lvm
# command, on programs built directly and on parameters set by hand.
# ---------------------------------------------------------------------------------------------

def load_program(case, overrides=None):
    """The case's program built from its file the way Pyro users do: the class with the -p values of
    the case (typed by the constructor's defaults), or the file's ``model`` and ``guide``."""
    import importlib.util
    import inspect
    import types

    path, _, class_name = case.program.partition(":")
    spec = importlib.util.spec_from_file_location(f"corpus_{case.name}", PROGRAMS / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not class_name:
        return types.SimpleNamespace(model=module.model, guide=module.guide)
    cls = getattr(module, class_name)
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    pairs = [case.fit[i + 1].split("=", 1) for i, arg in enumerate(case.fit) if arg == "-p"]
    kwargs = {}
    for key, text in pairs + list((overrides or {}).items()):
        default = defaults[key]
        kwargs[key] = (tuple(int(v) for v in str(text).split(",")) if isinstance(default, tuple)
                       else type(default)(text) if default is not None else text)
    return cls(**kwargs)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_program_is_valid_pyro(case):
    """Each program runs under Pyro's own TraceEnum_ELBO (no pyro-lvm) and gives a finite loss."""
    from pyro.infer import TraceEnum_ELBO

    splits = mnist_like(case) if case.needs_mnist else case.data()
    x = torch.from_numpy(splits["train"][:64])
    pyro.clear_param_store()
    # Pyro's default settings, as in a user's fresh process (other test modules turn module_local_params on)
    with pyro.settings.context(module_local_params=False):
        lvm = load_program(case)
        elbo = TraceEnum_ELBO(max_plate_nesting=2, strict_enumeration_warning=False)
        losses = [elbo.loss(lvm.model, lvm.guide, x) for _ in range(2)]
    assert all(math.isfinite(loss) for loss in losses), losses


def mnist_like(case):
    """Random binary 28x28 images: the VAE tutorial's network without the MNIST files."""
    generator = np.random.default_rng(0)
    return {"train": (generator.random((64, 1, 28, 28)) < 0.2).astype(np.float32)}


def test_quadrature_equals_the_gaussian_closed_form():
    """x | z ~ N(A z + b, s^2 I) with z ~ N(0, I): the quadrature against N(b, A A^T + s^2 I), in one
    and two dimensions, for a broad posterior (s = 1) and a sharp one (s = 0.01)."""
    generator = torch.Generator().manual_seed(0)
    for dim, s in itertools.product((1, 2), (1.0, 0.01)):
        A = torch.randn(3, dim, generator=generator, dtype=torch.float64)
        b = torch.randn(3, generator=generator, dtype=torch.float64)
        x = (torch.randn(4, dim, generator=generator, dtype=torch.float64) @ A.T + b
             + s * torch.randn(4, 3, generator=generator, dtype=torch.float64))

        def log_lik(z, rows):
            return dist.Normal(z @ A.T + b, s).log_prob(x[rows].unsqueeze(1)).sum(-1)

        expected = mvn_log_prob(x, b, A @ A.T + s ** 2 * torch.eye(3))
        assert torch.allclose(quadrature(log_lik, len(x), dim), expected, atol=1e-5), (dim, s)


def test_two_layer_quadrature_equals_a_brute_force_double_integral():
    """p(x) of the two-layer VAE by the harness's nested quadrature vs one fine 2-D grid over (z1, z2)."""
    import types

    generator = torch.Generator().manual_seed(1)
    w, v = torch.randn(4, 1, generator=generator), torch.randn(4, generator=generator)
    lvm = types.SimpleNamespace(prior_z1=lambda z2: (1.5 * z2 + 0.3, 0.4 + 0.2 * torch.sigmoid(z2)),
                                decoder=lambda z1: torch.sigmoid(z1 @ w.T + v))
    x = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    z, cell = _grid(torch.tensor([-9.0, -9.0]), torch.tensor([9.0, 9.0]), 1201, 2)
    z1, z2 = z[:, :1], z[:, 1:]
    loc, scale = lvm.prior_z1(z2)
    joint = (bernoulli_log_lik(x, lvm.decoder(z1.float())) + standard_normal_log_prob(z2)
             + dist.Normal(loc, scale).log_prob(z1).sum(-1))
    expected = torch.logsumexp(joint, -1) + math.log(cell)
    assert torch.allclose(truth_two_layer_vae(lvm, x)[0], expected, atol=1e-4)


def test_prodlda_difference_integral_equals_the_two_dimensional_one():
    """With two topics, the 1-D integral over d = logtheta_1 - logtheta_2 equals the 2-D one."""
    import types

    generator = torch.Generator().manual_seed(2)
    beta = torch.randn(2, 5, generator=generator)
    lvm = types.SimpleNamespace(eval=lambda: None, decoder=lambda theta: torch.softmax(theta @ beta, -1))
    docs = torch.tensor([[3.0, 0.0, 1.0, 5.0, 1.0], [0.0, 2.0, 2.0, 0.0, 6.0]])
    z, cell = _grid(torch.tensor([-9.0, -9.0]), torch.tensor([9.0, 9.0]), 1201, 2)
    joint = multinomial_log_prob(docs, lvm.decoder(torch.softmax(z.float(), -1))) + standard_normal_log_prob(z)
    expected = torch.logsumexp(joint, -1) + math.log(cell)
    assert torch.allclose(truth_prodlda(lvm, docs)[0], expected, atol=1e-4)


def test_multinomial_log_prob_equals_torch():
    docs = torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 2.0]])
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    expected = torch.stack([dist.Multinomial(4, p).log_prob(docs) for p in probs], -1)
    assert torch.allclose(multinomial_log_prob(docs, probs).float(), expected, atol=1e-5)


def test_mixture_density_integrates_to_one():
    x = torch.linspace(-30.0, 40.0, 200001, dtype=torch.float64)
    log_p = mixture_1d_log_prob(x, torch.tensor([0.3, 0.7]), torch.tensor([0.0, 6.0]), torch.tensor(1.5))
    assert abs(float(log_p.exp().sum() * (x[1] - x[0])) - 1.0) < 1e-6


def test_sigmoid_belief_net_enumeration_matches_pyro_traces_and_normalizes():
    """The enumeration over hidden configurations against log p(x, h) read from Pyro traces of the
    corpus model conditioned on each configuration, and sum_x p(x) = 1 over all binary x."""
    case = next(c for c in CASES if c.name == "sigmoid_belief_net")
    torch.manual_seed(3)
    lvm = load_program(case, {"input_dim": 3, "h1_dim": 2, "h2_dim": 2})
    with torch.no_grad():
        for p in lvm.parameters():
            p.normal_()
    xs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))
    log_px = truth_sigmoid_belief_net(lvm, xs)[0]
    assert abs(float(log_px.exp().sum()) - 1.0) < 1e-6
    joints = []
    for h1, h2 in itertools.product(itertools.product([0.0, 1.0], repeat=2), repeat=2):
        values = {"h1": torch.tensor(h1).expand(len(xs), 2), "h2": torch.tensor(h2).expand(len(xs), 2)}
        trace = traced(poutine.condition(lvm.model, data=values), xs)
        trace.compute_log_prob()
        joints.append(sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample"))
    assert torch.allclose(log_px.float(), torch.logsumexp(torch.stack(joints), 0), atol=1e-5)


def test_hmm_forward_algorithm_matches_paths_and_pyro_enumeration():
    """The forward algorithm against a sum over all hidden paths, and against Pyro's own
    TraceEnum_ELBO on the corpus HMM with the globals fixed (include_prior=False, empty guide)."""
    import functools

    from pyro.infer import TraceEnum_ELBO

    case = next(c for c in CASES if c.name == "hmm_vectorized")
    program = load_program(case)
    H = 3
    generator = torch.Generator().manual_seed(4)
    probs_x = torch.rand(H, H, generator=generator).softmax(-1)
    probs_y = torch.rand(H, 2, generator=generator)
    seqs = (torch.rand(5, 4, 2, generator=generator) < 0.5).float()
    forward = hmm_log_prob(seqs, probs_x, probs_y)

    paths = []
    for path in itertools.product(range(H), repeat=seqs.shape[1]):
        log_p, previous = torch.zeros(len(seqs), dtype=torch.float64), 0
        for t, state in enumerate(path):
            log_p += probs_x[previous, state].double().log()
            log_p += dist.Bernoulli(probs_y[state].double()).log_prob(seqs[:, t].double()).sum(-1)
            previous = state
        paths.append(log_p)
    assert torch.allclose(forward, torch.logsumexp(torch.stack(paths), 0), atol=1e-8)

    conditioned = poutine.condition(functools.partial(program.model, include_prior=False),
                                    data={"probs_x": probs_x, "probs_y": probs_y})
    loss = TraceEnum_ELBO(max_plate_nesting=2).loss(conditioned, lambda *args, **kwargs: None, seqs)
    assert abs(-loss - float(forward.sum())) < 1e-3


def test_toy_mixture_closed_form_matches_monte_carlo():
    """E_q[p(A, C | p_A, p_B, p_C)] in closed form against Monte Carlo over the Beta guides."""
    a = torch.tensor([[2.0, 5.0]])
    b = torch.tensor([[3.0, 1.5], [0.7, 4.0]])
    c = torch.tensor([[6.0, 2.0], [1.0, 1.0]])
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    S = 200000
    torch.manual_seed(5)
    pa = dist.Beta(a[0, 0], a[0, 1]).sample((S,))
    pb, pc = dist.Beta(b[:, 0], b[:, 1]).sample((S,)), dist.Beta(c[:, 0], c[:, 1]).sample((S,))
    A, C = x[:, 0].long(), x[:, 1]
    p_a = torch.where(A == 1, pa[:, None], 1 - pa[:, None])  # [S, 4]
    p_bc = sum(torch.where(torch.tensor(B == 1), pb[:, A], 1 - pb[:, A])
               * torch.where(C == 1, pc[:, B:B + 1], 1 - pc[:, B:B + 1]) for B in (0, 1))
    estimate, error = log_mean_exp_with_error((p_a * p_bc).double().log(), 0)
    assert torch.all((toy_mixture_log_prob(x, a, b, c) - estimate).abs() < Z_SIGMA * error + 1e-6)


def test_bayesian_ppca_predictive_reduces_to_the_closed_form():
    """With the guide's scales near 0 the predictive is N(b, W W^T + sigma^2 I) at W = the guide's mean."""
    import types

    W = torch.tensor([[1.0], [-2.0], [0.5]])
    guide = types.SimpleNamespace(locs=types.SimpleNamespace(W=W),
                                  scales=types.SimpleNamespace(W=torch.full_like(W, 1e-6)))
    lvm = types.SimpleNamespace(global_guide=guide, bias=torch.tensor([0.5, 0.0, -1.0]), sigma=torch.tensor(0.7))
    x = torch.tensor([[0.0, 1.0, 2.0], [1.0, -3.0, 0.0]])
    expected = mvn_log_prob(x, lvm.bias, W @ W.T + 0.49 * torch.eye(3))
    assert torch.allclose(truth_bayesian_ppca(lvm, x)[0], expected, atol=1e-4)


def test_monte_carlo_rate_equals_the_gaussian_kl():
    """The harness's rate E_q[log q(z|x) - log p(z)] against the closed-form KL, on the corpus PPCA."""
    case = next(c for c in CASES if c.name == "ppca_nn_module")
    torch.manual_seed(6)
    lvm = load_program(case)
    x = torch.from_numpy(linear_gaussian()["test"])
    rate, sigma_1 = _mc_rate(lvm, x, num_samples=400)
    with torch.no_grad():
        loc, scale = lvm.encoder(x)
        kl = torch.distributions.kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0)).sum(-1).mean()
    assert abs(rate - float(kl)) < Z_SIGMA * sigma_1 / math.sqrt(400)
