"""PPCA whose data plate subsamples itself: the model and guide receive the whole data set.

    z ~ N(0, I),  x | z ~ N(W z + b, sigma^2 I),  q(z | x) = N(encoder(x), diag(scale^2))

Subsampling exactly as Pyro's SVI tutorial part II writes it (https://pyro.ai/examples/svi_part_ii.html,
"Subsampling"): ``with pyro.plate("data", len(data), subsample_size=...) as ind`` in the model and in
the guide, each selecting its points with ``data[ind]``; Pyro draws the indices once, in the guide,
replays them in the model, and scales the subsampled sites by len(data) / subsample_size. The module
is written with the ``PyroModule`` idioms of the modules tutorial (``PyroParam`` with a constraint,
``PyroModule[nn.Linear]``). ``subsample_size`` is a constructor keyword (``None``: no subsampling).

Exact marginal: N(b, W W^T + sigma^2 I).
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints


class SubsampledPPCA(PyroModule):
    def __init__(self, data_dim=3, z_dim=1, subsample_size=32):
        super().__init__()
        self.z_dim = z_dim
        self.subsample_size = subsample_size
        self.weight = PyroParam(0.1 * torch.randn(data_dim, z_dim))
        self.bias = PyroParam(torch.zeros(data_dim))
        self.sigma = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        self.encoder = PyroModule[nn.Linear](data_dim, z_dim)
        self.z_scale = PyroParam(torch.ones(z_dim), constraint=constraints.positive)

    def model(self, data):
        with pyro.plate("data", len(data), subsample_size=self.subsample_size) as ind:
            batch = data[ind]
            z = pyro.sample("z", dist.Normal(batch.new_zeros(self.z_dim), 1.0).to_event(1))
            loc = z @ self.weight.T + self.bias
            pyro.sample("obs", dist.Normal(loc, self.sigma).to_event(1), obs=batch)

    def guide(self, data):
        with pyro.plate("data", len(data), subsample_size=self.subsample_size) as ind:
            batch = data[ind]
            pyro.sample("z", dist.Normal(self.encoder(batch), self.z_scale).to_event(1))
