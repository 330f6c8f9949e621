"""A VAE whose model has a bug that shows only mid-training: a data-dependent branch with a typo.

Users' models often carry a code path that runs rarely (here: once the decoder's output becomes
large, a rescaling branch that misspells a variable). Written as the VAE tutorial writes a model
(``nn.Module``, ``pyro.module``, ``model(self, x)``); the branch raises ``NameError`` after some
steps. pyro-lvm must report it as the user's error: exit 2, the exception, and this file and line.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn


class BuggyVAE(nn.Module):
    def __init__(self, data_dim=3, fail_after=20):
        super().__init__()
        self.decoder = nn.Linear(1, data_dim)
        self.encoder = nn.Linear(data_dim, 2)
        self.fail_after = fail_after
        self.calls = 0

    def model(self, x):
        pyro.module("decoder", self.decoder)
        self.calls += 1
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            loc = self.decoder(z)
            if self.calls > self.fail_after:
                loc = loc / normaliser  # noqa: F821 -- the bug
            pyro.sample("obs", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
