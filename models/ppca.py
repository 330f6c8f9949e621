"""Probabilistic PCA: linear Gaussian LVM, exact log p(x), a linear guide that can be exact.

.. math::

    p(z) = \\mathcal{N}(0, I_L), \\qquad p(x \\mid z) = \\mathcal{N}(W z + b, s^2 I_D), \\qquad
    p(x) = \\mathcal{N}(b, W W^T + s^2 I_D).

The posterior is Gaussian with a covariance that does not depend on ``x``,

.. math::

    p(z \\mid x) = \\mathcal{N}\\big(M^{-1} W^T (x - b),\\; s^2 M^{-1}\\big), \\qquad M = W^T W + s^2 I_L,

so the amortized linear guide :math:`q(z \\mid x) = \\mathcal{N}(A x + c, L L^T)` (``L`` lower
triangular) contains it: at :math:`A = M^{-1} W^T`, :math:`c = -A b`, :math:`L L^T = s^2 M^{-1}` the
ELBO equals :math:`\\log p(x)` for every point (:meth:`PPCA.set_guide_to_exact_posterior`).

The maximum-likelihood solution is closed form (Tipping & Bishop, 1999, "Probabilistic Principal
Component Analysis", JRSS B 61(3)): with :math:`S = U \\Lambda U^T` the sample covariance,
:math:`b = \\bar x`, :math:`s^2 = \\frac{1}{D - L} \\sum_{j > L} \\lambda_j` and
:math:`W = U_L (\\Lambda_L - s^2 I)^{1/2}` (up to a rotation of ``z``). :meth:`PPCA.initialize`
sets it (and the guide to its exact posterior), so a fit from there only refines it on new data;
fitting by SVI from the constructor's start reaches the same optimum.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn


class PPCA(PyroModule):
    """Probabilistic PCA with ``latent_dim`` components of ``D``-dimensional vectors, ``data_shape == (D,)``."""

    def __init__(self, data_shape, latent_dim=2):
        super().__init__()
        if len(data_shape) != 1:
            raise ValueError(f"PPCA models vectors, data_shape (D,); got {tuple(data_shape)}")
        if not 1 <= latent_dim <= data_shape[0]:
            raise ValueError(f"latent_dim must be between 1 and D={data_shape[0]}, got {latent_dim}")
        self.data_shape = tuple(data_shape)
        self.latent_dim = latent_dim
        dim = data_shape[0]
        # A private generator: deterministic construction that leaves the global RNG alone.
        generator = torch.Generator().manual_seed(0)
        # Generative model p(x|z) = N(W z + b, s^2 I).
        self.weight = nn.Parameter(0.1 * torch.randn(dim, latent_dim, generator=generator))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.noise_scale = PyroParam(torch.tensor(1.0), constraint=dist.constraints.positive)
        # Guide q(z|x) = N(A x + c, L L^T).
        self.encoder_weight = nn.Parameter(torch.zeros(latent_dim, dim))
        self.encoder_bias = nn.Parameter(torch.zeros(latent_dim))
        self.encoder_scale_tril = PyroParam(torch.eye(latent_dim), constraint=dist.constraints.lower_cholesky)

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        weight, bias, noise_scale = self.weight, self.bias, self.noise_scale
        prior_loc = bias.new_zeros(self.latent_dim)
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(prior_loc, 1.0).to_event(1))
            loc = z @ weight.T + bias
            pyro.sample("x", dist.Normal(loc, noise_scale).to_event(1), obs=x)

    def guide(self, x):
        loc = x @ self.encoder_weight.T + self.encoder_bias
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, scale_tril=self.encoder_scale_tril))

    def marginal(self):
        """``p(x) = N(b, W W^T + s^2 I)`` as a low-rank multivariate normal (cost linear in ``D``)."""
        noise_var = self.noise_scale.pow(2).expand(self.data_shape)
        return dist.LowRankMultivariateNormal(self.bias, self.weight, noise_var)

    def log_marginal(self, x):
        """Exact ``log p(x)`` per point, shape ``[n]``."""
        return self.marginal().log_prob(x)

    def exact_posterior(self):
        """``(A, c, Sigma)`` with ``p(z|x) = N(A x + c, Sigma)`` under the current parameters."""
        weight, bias = self.weight, self.bias
        noise_var = self.noise_scale.pow(2)
        eye = torch.eye(self.latent_dim, dtype=weight.dtype, device=weight.device)
        m = weight.T @ weight + noise_var * eye
        a = torch.linalg.solve(m, weight.T)
        return a, -a @ bias, noise_var * torch.linalg.inv(m)

    @torch.no_grad()
    def set_guide_to_exact_posterior(self):
        """Set the guide to the true posterior, so that the ELBO equals ``log p(x)`` exactly."""
        a, c, covariance = self.exact_posterior()
        self.encoder_weight.copy_(a)
        self.encoder_bias.copy_(c)
        # Symmetrize: inv(m) is symmetric only up to rounding, and cholesky reads one triangle.
        self.encoder_scale_tril = torch.linalg.cholesky((covariance + covariance.T) / 2)

    @torch.no_grad()
    def initialize(self, x):
        """PCA start: ``b`` the data mean, ``W`` the top principal directions, ``s^2`` the residual variance.

        This is the Tipping & Bishop maximum-likelihood solution for ``x``; the guide is set to its
        exact posterior.
        """
        x = x.reshape(x.shape[0], -1)
        mean = x.mean(0)
        covariance = (x - mean).T @ (x - mean) / x.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        latent_dim, dim = self.latent_dim, x.shape[1]
        if latent_dim < dim:
            noise_var = eigenvalues[latent_dim:].mean()
        else:
            noise_var = eigenvalues.mean()
        noise_var = noise_var.clamp_min(1e-6 * eigenvalues[0].clamp_min(1e-12))
        scales = (eigenvalues[:latent_dim] - noise_var).clamp_min(0).sqrt()
        self.bias.copy_(mean)
        self.weight.copy_(eigenvectors[:, :latent_dim] * scales)
        self.noise_scale = noise_var.sqrt()
        self.set_guide_to_exact_posterior()
