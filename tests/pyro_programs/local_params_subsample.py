"""Non-amortized local guide parameters sliced by a self-subsampling plate (Pyro's ``event_dim`` idiom).

Source: the SVI part II tutorial on subsampling (https://pyro.ai/examples/svi_part_ii.html) and the
``pyro.param`` documentation: a ``pyro.param`` created inside ``pyro.plate("data", N,
subsample_size=B)`` with ``event_dim`` given is sliced by Pyro to the plate's indices automatically.
The model is factor analysis with one factor, ``nn.Module`` parameters through ``pyro.module``; the
guide keeps one location and scale per training point (``z_loc`` [N, 1], ``z_scale`` [N, 1]).

Such a guide knows nothing about new points: estimates on the training split only.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from torch.distributions import constraints


class LocalParamFA(nn.Module):
    def __init__(self, data_dim=3, subsample_size=50):
        super().__init__()
        self.subsample_size = subsample_size
        self.decoder = nn.Linear(1, data_dim)
        self.log_noise = nn.Parameter(torch.zeros(data_dim))

    def model(self, data):
        pyro.module("fa", self)
        with pyro.plate("data", len(data), subsample_size=self.subsample_size) as ind:
            x = data[ind]
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(ind), 1), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(self.decoder(z), self.log_noise.exp()).to_event(1), obs=x)

    def guide(self, data):
        with pyro.plate("data", len(data), subsample_size=self.subsample_size):
            z_loc = pyro.param("z_loc", torch.zeros(len(data), 1), event_dim=1)
            z_scale = pyro.param("z_scale", torch.ones(len(data), 1), constraint=constraints.positive, event_dim=1)
            pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
