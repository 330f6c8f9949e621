"""A VAE with two stochastic layers and a hierarchical (non-mean-field) guide.

    p(z2) = N(0, I),  p(z1 | z2) = N(mu(z2), sigma(z2)),  p(x | z1) = Bernoulli(decoder(z1))
    q(z1 | x) = N(encoder(x)),  q(z2 | z1) = N(encoder2(z1))

The two-stochastic-layer architecture of Burda et al. (2015), "Importance Weighted Autoencoders"
(section 5), written exactly as Pyro's VAE tutorial writes a VAE (https://pyro.ai/examples/vae.html):
a plain ``nn.Module`` with ``Encoder``/``Decoder`` networks, ``pyro.module`` registration,
``model(self, x)`` with prior tensors built by ``x.new_zeros``, the observed site ``"obs"`` with the
image flattened. Pyro has no two-layer VAE example; this is the tutorial's pattern with one more
latent layer. The guide's q(z2 | z1) depends on the sampled z1, so the KL of the guide from the prior
has no closed form per site: a rate computed from analytic per-site KLs is wrong for this guide.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn as nn


class Gaussian(nn.Module):
    """An MLP from ``in_dim`` to the location and scale of a diagonal Gaussian over ``out_dim``."""

    def __init__(self, in_dim, hidden_dim, out_dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, out_dim)
        self.fc22 = nn.Linear(hidden_dim, out_dim)
        self.softplus = nn.Softplus()

    def forward(self, h):
        hidden = self.softplus(self.fc1(h))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, input_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, input_dim)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        hidden = self.softplus(self.fc1(z))
        return self.sigmoid(self.fc21(hidden))


class TwoLayerVAE(nn.Module):
    def __init__(self, input_dim=784, z1_dim=100, z2_dim=50, hidden_dim=200, use_cuda=False):
        super().__init__()
        self.input_dim = input_dim
        self.z2_dim = z2_dim
        # p(z1 | z2) and p(x | z1)
        self.prior_z1 = Gaussian(z2_dim, hidden_dim, z1_dim)
        self.decoder = Decoder(z1_dim, hidden_dim, input_dim)
        # q(z1 | x) and q(z2 | z1)
        self.encoder_z1 = Gaussian(input_dim, hidden_dim, z1_dim)
        self.encoder_z2 = Gaussian(z1_dim, hidden_dim, z2_dim)
        if use_cuda:
            self.cuda()
        self.use_cuda = use_cuda

    def model(self, x):
        pyro.module("prior_z1", self.prior_z1)
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z2_loc = x.new_zeros(torch.Size((x.shape[0], self.z2_dim)))
            z2_scale = x.new_ones(torch.Size((x.shape[0], self.z2_dim)))
            z2 = pyro.sample("z2", dist.Normal(z2_loc, z2_scale).to_event(1))
            z1_loc, z1_scale = self.prior_z1(z2)
            z1 = pyro.sample("z1", dist.Normal(z1_loc, z1_scale).to_event(1))
            loc_img = self.decoder(z1)
            pyro.sample("obs", dist.Bernoulli(loc_img).to_event(1), obs=x.reshape(-1, self.input_dim))

    def guide(self, x):
        pyro.module("encoder_z1", self.encoder_z1)
        pyro.module("encoder_z2", self.encoder_z2)
        with pyro.plate("data", x.shape[0]):
            z1_loc, z1_scale = self.encoder_z1(x.reshape(-1, self.input_dim))
            z1 = pyro.sample("z1", dist.Normal(z1_loc, z1_scale).to_event(1))
            z2_loc, z2_scale = self.encoder_z2(z1)
            pyro.sample("z2", dist.Normal(z2_loc, z2_scale).to_event(1))
