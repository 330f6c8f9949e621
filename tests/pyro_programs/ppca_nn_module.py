"""Probabilistic PCA as a plain ``nn.Module`` registered with ``pyro.module``, noise via ``pyro.param``.

    z ~ N(0, I),    x | z ~ N(W z + b, sigma^2 I),    q(z | x) = N(encoder(x), diag(scale^2))

Written like the VAE tutorial (https://pyro.ai/examples/vae.html): ``nn.Linear`` networks owned by an
``nn.Module``, ``pyro.module("decoder", ...)`` in the model and ``pyro.module("encoder", ...)`` in the
guide, ``model(self, x)``; the noise scale is a ``pyro.param`` with a positive constraint, as in the
intro tutorial's ``simple_model`` (https://pyro.ai/examples/intro_long.html). Tipping & Bishop (1999):
the exact marginal is N(b, W W^T + sigma^2 I), and the linear Gaussian guide can equal the posterior.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from torch.distributions import constraints


class Encoder(nn.Module):
    def __init__(self, data_dim, z_dim):
        super().__init__()
        self.fc_loc = nn.Linear(data_dim, z_dim)
        self.fc_scale = nn.Linear(data_dim, z_dim)

    def forward(self, x):
        return self.fc_loc(x), torch.exp(self.fc_scale(x))


class PPCA(nn.Module):
    def __init__(self, data_dim=3, z_dim=1):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Linear(z_dim, data_dim)
        self.encoder = Encoder(data_dim, z_dim)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
            pyro.sample("obs", dist.Normal(self.decoder(z), sigma).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
