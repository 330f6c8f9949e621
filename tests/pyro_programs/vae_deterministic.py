"""A Gaussian VAE with ``pyro.deterministic`` sites, as Pyro users record derived quantities.

Written like the VAE tutorial (``nn.Module``, ``pyro.module``, ``model(self, x)``), with the
decoder's mean recorded by ``pyro.deterministic("x_loc", ..., event_dim=1)`` inside the plate and a
global derived value ``pyro.deterministic("noise_var", sigma ** 2)``, as the Bayesian regression
and modules tutorials record derived quantities
(https://docs.pyro.ai/en/stable/primitives.html#pyro.primitives.deterministic). In Pyro a
deterministic site is an observed ``Delta`` site that is masked out: it is neither data nor a latent.
The decoder is linear, so log p(x) = N(x; b, W W^T + sigma^2 I) (Tipping & Bishop 1999).
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from torch.distributions import constraints


class DeterministicVAE(nn.Module):
    def __init__(self, data_dim=3, z_dim=1):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Linear(z_dim, data_dim)
        self.encoder_loc = nn.Linear(data_dim, z_dim)
        self.encoder_scale = nn.Linear(data_dim, z_dim)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
        pyro.deterministic("noise_var", sigma ** 2)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            x_loc = pyro.deterministic("x_loc", self.decoder(z), event_dim=1)
            pyro.sample("obs", dist.Normal(x_loc, sigma).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder_loc", self.encoder_loc)
        pyro.module("encoder_scale", self.encoder_scale)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.encoder_loc(x), self.encoder_scale(x).exp()).to_event(1))
