"""A likelihood written as ``pyro.factor`` instead of an observed site, and a ``pyro.deterministic``.

Pyro users write unnormalised or hand-computed likelihoods with ``pyro.factor(name, log_factor)``
(https://docs.pyro.ai/en/stable/primitives.html#pyro.primitives.factor), and record derived
quantities with ``pyro.deterministic``. Here the Gaussian likelihood of a one-factor model is a
``pyro.factor`` of ``Normal(...).log_prob(x)``: nothing is observed with ``obs=``, so pyro-lvm cannot
tell which data the model explains, and ``log p(x)`` of an unnormalised factor is not defined;
it must be refused with a line that says to observe the data with ``obs=``.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn


class FactorModel(nn.Module):
    def __init__(self, data_dim=3):
        super().__init__()
        self.decoder = nn.Linear(1, data_dim)
        self.encoder = nn.Linear(data_dim, 2)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            loc = pyro.deterministic("loc", self.decoder(z), event_dim=1)
            pyro.factor("likelihood", dist.Normal(loc, 0.5).log_prob(x).sum(-1))

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
