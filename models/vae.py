"""Variational autoencoder: Gaussian z, MLP or conv networks, Bernoulli or Gaussian pixels.

.. math::

    p(z) = \\mathcal{N}(0, I), \\qquad
    p(x \\mid z) = \\prod_j \\mathrm{Bernoulli}\\big(x_j \\mid \\sigma(f_\\theta(z)_j)\\big)
    \\ \\text{or}\\ \\prod_j \\mathcal{N}\\big(x_j \\mid f_\\theta(z)_j, \\sigma_j^2\\big), \\qquad
    q_\\phi(z \\mid x) = \\mathcal{N}\\big(\\mu_\\phi(x), \\operatorname{diag} \\sigma_\\phi(x)^2\\big).

Kingma & Welling (2014), "Auto-Encoding Variational Bayes"; Rezende, Mohamed & Wierstra (2014).
The defaults are the 784-200-200-50 tanh networks of Burda, Grosse & Salakhutdinov (2016),
"Importance Weighted Autoencoders" (one stochastic layer). ``stochastic_layers=2`` is that paper's
second architecture, a Gaussian layer ``h`` of ``intermediate_dim`` (100) units between ``z`` (50)
and ``x``, each conditional an MLP with ``intermediate_hidden`` (100, 100) units between ``z`` and
``h`` and ``hidden`` (200, 200) between ``h`` and ``x``:

.. math::

    p(z) = \\mathcal{N}(0, I), \\quad p(h \\mid z) = \\mathcal{N}(\\mu(z), \\operatorname{diag} \\sigma(z)^2),
    \\quad p(x \\mid h); \\qquad q(h \\mid x)\\, q(z \\mid h), \\ \\text{both diagonal Gaussians}.

``architecture="conv"`` replaces the x-facing MLPs by small strided convolution stacks for images ``(C, H, W)`` (``hidden`` then gives the fully
connected widths between the convolutions and ``z``). The encoder is only a proposal: log p(x) is
estimated with the toolkit's estimators, the ELBO is a lower bound on it.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.nn import functional as F

from pyro_lvm.nn import MLP, ConvDecoder, ConvEncoder, flatten_event


class VAE(PyroModule):
    """A VAE with one Gaussian stochastic layer of ``latent_dim`` units (or two: ``stochastic_layers=2``)."""

    def __init__(self, data_shape, latent_dim=50, hidden=(200, 200), activation="tanh", likelihood="bernoulli",
                 architecture="mlp", conv_channels=(32, 64), stochastic_layers=1, intermediate_dim=100,
                 intermediate_hidden=(100, 100)):
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        if architecture not in ("mlp", "conv"):
            raise ValueError(f"architecture must be 'mlp' or 'conv', got {architecture!r}")
        if architecture == "conv" and len(data_shape) != 3:
            raise ValueError(f"architecture 'conv' needs images, data_shape (C, H, W); got {tuple(data_shape)}")
        if stochastic_layers not in (1, 2):
            raise ValueError(f"stochastic_layers must be 1 or 2, got {stochastic_layers!r}")
        self.data_shape = tuple(data_shape)
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.architecture = architecture
        self.stochastic_layers = stochastic_layers
        hidden = tuple(hidden)
        num_pixels = math.prod(self.data_shape)
        # The stochastic layer next to x: z itself, or h of the two-layer model.
        x_side = latent_dim if stochastic_layers == 1 else intermediate_dim
        if architecture == "mlp":
            self.encoder = MLP(num_pixels, hidden, 2 * x_side, activation)
            self.decoder = MLP(x_side, tuple(reversed(hidden)), num_pixels, activation, output_bias=False)
        else:
            channels = tuple(conv_channels)
            self.encoder = ConvEncoder(self.data_shape, 2 * x_side, channels, hidden, activation)
            self.decoder = ConvDecoder(x_side, self.data_shape, channels, tuple(reversed(hidden)), activation,
                                       output_bias=False)
        if stochastic_layers == 2:
            self.intermediate_dim = intermediate_dim
            inner = tuple(intermediate_hidden)
            self.encoder_top = MLP(intermediate_dim, inner, 2 * latent_dim, activation)      # q(z | h)
            self.decoder_top = MLP(latent_dim, tuple(reversed(inner)), 2 * intermediate_dim, activation)  # p(h | z)
        # A per-pixel output bias kept apart from the decoder, so ``initialize`` can set it to the
        # mean image whatever the architecture.
        self.output_bias = nn.Parameter(torch.zeros(self.data_shape))
        if likelihood == "gaussian":
            self.output_scale = PyroParam(torch.ones(self.data_shape), constraint=dist.constraints.positive)

    def decode(self, z):
        """Logits (Bernoulli) or means (Gaussian) of ``p(x|z)`` (``p(x|h)`` with two stochastic layers),
        shape ``z.shape[:-1] + data_shape``."""
        out = self.decoder(z)
        if self.architecture == "mlp":
            out = out.reshape(z.shape[:-1] + self.data_shape)
        return out + self.output_bias

    def encode(self, x):
        """Mean and standard deviation of ``q(z|x)`` (``q(h|x)`` with two stochastic layers), each of shape
        ``x.shape[:-len(data_shape)] + (latent_dim,)`` (``intermediate_dim``)."""
        if self.architecture == "mlp":
            x = flatten_event(x, len(self.data_shape))
        return _gaussian(self.encoder(x))

    def likelihood_dist(self, z):
        """``p(x|z)`` with event shape ``data_shape``."""
        out = self.decode(z)
        event_dim = len(self.data_shape)
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=out).to_event(event_dim)
        return dist.Normal(out, self.output_scale).to_event(event_dim)

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        prior_loc = self.output_bias.new_zeros(self.latent_dim)
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(prior_loc, 1.0).to_event(1))
            if self.stochastic_layers == 2:
                z = pyro.sample("h", dist.Normal(*_gaussian(self.decoder_top(z))).to_event(1))
            pyro.sample("x", self.likelihood_dist(z), obs=x)

    def guide(self, x):
        loc, scale = self.encode(x)
        with pyro.plate("data", x.shape[0]):
            if self.stochastic_layers == 1:
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))
                return
            h = pyro.sample("h", dist.Normal(loc, scale).to_event(1))
            pyro.sample("z", dist.Normal(*_gaussian(self.encoder_top(h))).to_event(1))

    @torch.no_grad()
    def initialize(self, x):
        """Set the output bias to the mean data point (its logit for Bernoulli pixels).

        With the decoder's own output small at initialisation, ``p(x|z)`` then starts as the
        best z-independent fit, a standard trick (Burda et al., 2016) that skips the first phase
        of training, which would otherwise be spent learning the mean.
        """
        mean = x.mean(0)
        if self.likelihood == "bernoulli":
            self.output_bias.copy_(torch.logit(mean.clamp(1e-3, 1 - 1e-3)))
        else:
            self.output_bias.copy_(mean)
            # Per-dimension standard deviations, floored at 1% of the overall one so that constant
            # pixels (an image's empty border) do not start as near point masses.
            if x.shape[0] > 1:
                self.output_scale = x.std(0).clamp_min(1e-2 * x.std().clamp_min(1e-6).item())
            else:
                self.output_scale = torch.ones_like(mean)


def _gaussian(out):
    """A network's output split into the mean and standard deviation of a diagonal Gaussian."""
    loc, raw_scale = out.chunk(2, dim=-1)
    # softplus rather than exp: no overflow when an untrained network outputs a large value.
    return loc, F.softplus(raw_scale) + 1e-5
