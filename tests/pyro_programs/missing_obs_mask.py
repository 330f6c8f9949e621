"""Factor analysis on data with missing entries (NaN), masked as Pyro users mask them.

Pyro's idiom for missing observations: ``poutine.mask`` (or ``Distribution.mask``) with a mask of the
observed entries, and the NaNs replaced by any finite value so that the log density stays finite
(https://forum.pyro.ai/ and the docs of ``pyro.poutine.mask``; ``obs_mask=`` does the same and adds an
imputation site). The likelihood is per coordinate (a ``features`` plate at dim -1 inside the data
plate at dim -2), so masking a coordinate removes exactly its factor: log p(x_obs) is the Gaussian
marginal of the observed coordinates, N(x_o; mu_o, (w w^T + diag(psi))_oo).
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro import poutine
from torch.distributions import constraints


class MissingFA(nn.Module):
    def __init__(self, data_dim=3):
        super().__init__()
        self.w = nn.Parameter(torch.ones(data_dim))
        self.mu = nn.Parameter(torch.zeros(data_dim))
        self.log_psi = nn.Parameter(torch.zeros(data_dim))
        self.encoder = nn.Linear(2 * data_dim, 2)

    def model(self, x):
        pyro.module("fa", self)
        observed = ~torch.isnan(x)
        x_filled = torch.where(observed, x, torch.zeros_like(x))
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0))
            with pyro.plate("features", x.shape[1], dim=-1), poutine.mask(mask=observed):
                pyro.sample("obs", dist.Normal(self.mu + z * self.w, self.log_psi.exp().sqrt()), obs=x_filled)

    def guide(self, x):
        pyro.module("fa", self)
        observed = ~torch.isnan(x)
        x_filled = torch.where(observed, x, torch.zeros_like(x))
        loc, log_scale = self.encoder(torch.cat([x_filled, observed.float()], -1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(loc, log_scale.exp()))
