"""Factor analysis that standardizes the data inside the model: ``obs=(x - self.mean) / self.std``.

A common habit (scikit-learn's ``StandardScaler`` moved into the model): the model then defines the
density of the standardized values, not of x, and log p(x) differs by the Jacobian, -sum_d log s_d per
point, a silent wrong number if reported as log p(x). pyro-lvm must refuse it with a line that says
to observe x itself (and put the transform in the distribution, or in the data file).
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn


class StandardizedFA(nn.Module):
    def __init__(self, data_dim=3):
        super().__init__()
        self.register_buffer("mean", torch.tensor([1.0, 0.0, -1.0]))
        self.register_buffer("std", torch.tensor([2.0, 1.0, 1.0]))
        self.decoder = nn.Linear(1, data_dim)
        self.encoder = nn.Linear(data_dim, 2)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=(x - self.mean) / self.std)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder((x - self.mean) / self.std).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
