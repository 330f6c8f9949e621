"""Factor analysis: a complete user-written pyro-lvm model (the README walks through this file).

    z ~ N(0, I_L),    x | z ~ N(W z + b, diag(psi))

A linear-Gaussian LVM like PPCA but with one noise variance per observed dimension. The guide is
an amortized diagonal Gaussian q(z|x) = N(A x + c, diag(s^2)). Because the marginal is Gaussian,
N(b, W W^T + diag(psi)), the model also offers an exact ``log_marginal``, which lets
``pyro-lvm evaluate --estimator exact`` check every other estimator.

Fit it with ``pyro-lvm fit examples/factor_analysis.py:FactorAnalysis --data faithful -p latent_dim=1``.
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints


class FactorAnalysis(PyroModule):
    """Factor analysis with a linear amortized Gaussian guide."""

    def __init__(self, data_shape, latent_dim=2, init_scale=0.1):
        super().__init__()
        if len(data_shape) != 1:
            raise ValueError(f"factor analysis models vectors, got points of shape {tuple(data_shape)}")
        (dim,) = data_shape
        self.latent_dim = latent_dim
        # Generative parameters.
        self.weight = PyroParam(init_scale * torch.randn(dim, latent_dim))
        self.bias = PyroParam(torch.zeros(dim))
        self.noise_scale = PyroParam(torch.ones(dim), constraint=constraints.positive)
        # Guide parameters: an affine map from x to the posterior mean, and one scale per latent.
        self.encoder = PyroModule[torch.nn.Linear](dim, latent_dim)
        self.posterior_scale = PyroParam(torch.ones(latent_dim), constraint=constraints.positive)

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(self.posterior_scale), 1.0).to_event(1))
            loc = z @ self.weight.T + self.bias
            return pyro.sample("x", dist.Normal(loc, self.noise_scale).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.encoder(x - self.bias), self.posterior_scale).to_event(1))

    def initialize(self, x):
        # Start at the data's mean and spread so that the first steps are not spent finding them;
        # loadings start small (a tenth of each dimension's spread) and are learned.
        self.bias = x.mean(0)
        self.noise_scale = x.std(0) + 1e-3
        self.weight = 0.1 * x.std(0).unsqueeze(-1) * torch.randn(x.shape[-1], self.latent_dim, device=x.device)

    def log_marginal(self, x):
        covariance = self.weight @ self.weight.T + torch.diag(self.noise_scale ** 2)
        return dist.MultivariateNormal(self.bias, covariance_matrix=covariance).log_prob(x)
