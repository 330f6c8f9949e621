"""Bayesian PCA: a prior on the loadings W (a global latent) and amortized local codes z.

    W ~ N(0, 1) (D x K),    z_n ~ N(0, I_K),    x_n | z_n, W ~ N(W z_n + b, sigma^2 I)
    q(W) = AutoNormal,      q(z_n | x_n) = N(encoder(x_n), diag(scale^2))

Written with the idioms of Pyro's modules tutorial (https://pyro.ai/examples/modules.html: a
``PyroModule`` with a ``PyroSample`` prior on a weight, ``PyroParam`` with a constraint,
``PyroModule[nn.Linear]``, and ``@pyro_method`` on methods other than ``forward`` that read
``PyroSample`` attributes, as ``pyro.nn.module`` documents) and of the GMM tutorial
(https://pyro.ai/examples/gmm.html: an AutoGuide over the blocked model that exposes only the
global sites, called from a hand-written guide that adds the local ones). Bishop (1999), "Bayesian PCA".

The toolkit's per-point estimates for this model are the held-out predictive
log p(x_n | training data) ~= log E_q(W) p(x_n | W), where p(x_n | W) = N(b, W W^T + sigma^2 I).
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam, PyroSample, pyro_method
from torch.distributions import constraints


class BayesianPPCA(PyroModule):
    def __init__(self, data_dim=3, z_dim=1):
        super().__init__()
        self.z_dim = z_dim
        self.W = PyroSample(dist.Normal(0.0, 1.0).expand([data_dim, z_dim]).to_event(2))
        self.bias = PyroParam(torch.zeros(data_dim))
        self.sigma = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        self.encoder = PyroModule[nn.Linear](data_dim, z_dim)
        self.z_scale = PyroParam(torch.ones(z_dim), constraint=constraints.positive)
        self.global_guide = AutoNormal(poutine.block(self.model, expose=["W"]))

    @pyro_method
    def model(self, x):
        W = self.W
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            loc = (W @ z.unsqueeze(-1)).squeeze(-1) + self.bias
            pyro.sample("obs", dist.Normal(loc, self.sigma).to_event(1), obs=x)

    @pyro_method
    def guide(self, x):
        self.global_guide(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.encoder(x), self.z_scale).to_event(1))
