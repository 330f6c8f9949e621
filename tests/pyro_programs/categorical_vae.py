"""A VAE whose observations are categories: ``dist.Categorical(logits=...).to_event(1)``, ``obs=x.long()``.

Users modelling discrete data (pixel levels, tokens, genotypes) observe integer labels with a
``Categorical`` per coordinate, as the VAE tutorial observes pixels with a ``Bernoulli``
(``nn.Module``, ``pyro.module``, ``model(self, x)``, ``x.new_zeros``), converting the data with
``x.long()``. A Categorical has no numeric mean (torch's is NaN): the report must show a draw of
p(x|z) instead of E[x|z]. Here each of the 8 binary pixels is a 2-way Categorical.
"""

import pyro
import pyro.distributions as dist
import torch.nn as nn


class CategoricalVAE(nn.Module):
    def __init__(self, data_dim=8, num_categories=2, z_dim=1):
        super().__init__()
        self.data_dim, self.num_categories, self.z_dim = data_dim, num_categories, z_dim
        self.decoder = nn.Linear(z_dim, data_dim * num_categories)
        self.encoder = nn.Linear(data_dim, 2 * z_dim)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            logits = self.decoder(z).reshape(z.shape[:-1] + (self.data_dim, self.num_categories))
            pyro.sample("obs", dist.Categorical(logits=logits).to_event(1), obs=x.long())

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
