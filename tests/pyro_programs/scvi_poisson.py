"""A tiny scVI-style count VAE: Poisson likelihood, plate ``batch``, the tutorial's ``poutine.scale``.

Source: the scANVI tutorial (https://pyro.ai/examples/scanvi.html, tutorial/source/scanvi.ipynb): a
``nn.Module`` whose ``model(self, x)`` / ``guide(self, x)`` call ``pyro.module("scanvi", self)`` and
wrap everything in ``pyro.plate("batch", len(x)), poutine.scale(scale=self.scale)``, where
``self.scale = 1.0 / (self.batch_size * self.num_genes)`` "for numerical stability"; the decoder
gives per-gene rates from a latent z, the encoder takes log(1 + x).

Changed, and why: one latent dimension (z_dim = 1, so that log p(x) has a 1-D quadrature); the
tutorial's zero-inflated negative binomial with a library size becomes a Poisson with the rate from
the decoder; no labels. The ``scale`` is the tutorial's: it multiplies every log density by a constant.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn
from pyro import poutine


class Encoder(nn.Module):
    def __init__(self, num_genes, z_dim, hidden_dim):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(num_genes, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 2 * z_dim))

    def forward(self, x):
        h = self.fc(torch.log1p(x))
        loc, scale = h.chunk(2, dim=-1)
        return loc, nn.functional.softplus(scale) + 1e-3


class CountVAE(nn.Module):
    def __init__(self, num_genes=6, z_dim=1, hidden_dim=16, batch_size=100):
        super().__init__()
        self.num_genes, self.z_dim, self.batch_size = num_genes, z_dim, batch_size
        self.decoder = nn.Linear(z_dim, num_genes)
        self.encoder = Encoder(num_genes, z_dim, hidden_dim)
        # the tutorial's constant: scale the loss by (batch size x genes) for numerical stability
        self.scale = 1.0 / (batch_size * num_genes)

    def model(self, x):
        pyro.module("scanvi", self)
        with pyro.plate("batch", len(x)), poutine.scale(scale=self.scale):
            z = pyro.sample("z", dist.Normal(0, x.new_ones(self.z_dim)).to_event(1))
            rate = self.decoder(z).exp()
            pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("scanvi", self)
        with pyro.plate("batch", len(x)), poutine.scale(scale=self.scale):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
