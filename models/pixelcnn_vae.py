"""PixelCNN VAE: Gaussian z, an autoregressive masked-convolution decoder over binary pixels.

.. math::

    p(z) = \\mathcal{N}(0, I), \\qquad
    p(x \\mid z) = \\prod_{i} \\mathrm{Bernoulli}\\big(x_i \\mid \\sigma(f_\\theta(x_{<i}, s(z))_i)\\big), \\qquad
    q_\\phi(z \\mid x) = \\mathcal{N}\\big(\\mu_\\phi(x), \\operatorname{diag} \\sigma_\\phi(x)^2\\big).

The decoder is a conditional PixelCNN (van den Oord et al., 2016) over pixels in raster order,
chosen by ``decoder``:

- ``"plain"`` (the default): a type "A" masked convolution, then type "B" ones, each layer receiving
  a conditioning map :math:`s(z)` (a linear function of ``z`` reshaped to
  ``conditioning_channels x H x W``) through a 1x1 convolution (:class:`pyro_lvm.nn.PixelCNN`). Its
  stacked masks leave a blind spot above and to the right of each pixel.
- ``"gated"``: the gated PixelCNN of van den Oord et al. (2016), "Conditional Image Generation with
  PixelCNN Decoders": vertical and horizontal stacks (no blind spot), gated tanh-sigmoid units, ``z``
  the conditioning vector of every layer, plus a location-dependent map :math:`s(z)` from an MLP with
  the encoder's widths reversed, which also enters the logits directly
  (:class:`pyro_lvm.nn.GatedPixelCNN`): with the autoregressive weights at zero it is the factorized
  ``vae``'s decoder, so ``pixelcnn_layers``, its depth, only adds power.

Either way the likelihood is a :class:`pyro_lvm.distributions.PixelCNNBernoulli`. This is the PixelVAE of
Gulrajani et al. (2017),
"PixelVAE: A Latent Variable Model for Natural Images", in its simplest form. A decoder that can
model the images alone may ignore ``z`` (posterior collapse, Chen et al., 2017, "Variational Lossy
Autoencoder"): that is the optimum of the ELBO, not a bug, and ``pyro-lvm diagnose`` measures it.
The images are binary ``(C, H, W)`` (0./1. floats); sampling is exact and takes one network pass per
pixel (per pixel and channel), with the conditioning and, for the gated decoder, the rows above cached.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn import functional as F

from pyro_lvm.distributions import PixelCNNBernoulli
from pyro_lvm.nn import MLP, ConvEncoder, GatedPixelCNN, PixelCNN, flatten_event

DECODERS = ("plain", "gated")


class PixelCNNVAE(PyroModule):
    """A VAE with a PixelCNN decoder over binary images ``(C, H, W)``: ``decoder`` plain or gated (no blind spot)."""

    def __init__(self, data_shape, latent_dim=32, hidden=(200,), activation="relu", architecture="mlp",
                 pixelcnn_layers=4, pixelcnn_channels=32, first_kernel_size=7, kernel_size=3,
                 conditioning_channels=4, decoder="plain"):
        super().__init__()
        if len(data_shape) != 3:
            raise ValueError(f"a PixelCNN decoder needs images, data_shape (C, H, W); got {tuple(data_shape)}")
        if architecture not in ("mlp", "conv"):
            raise ValueError(f"architecture must be 'mlp' or 'conv', got {architecture!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.data_shape = tuple(data_shape)
        self.latent_dim = latent_dim
        self.architecture = architecture
        self.decoder = decoder
        self.conditioning_shape = (conditioning_channels,) + self.data_shape[1:]
        hidden = tuple(hidden)
        if architecture == "mlp":
            self.encoder = MLP(math.prod(self.data_shape), hidden, 2 * latent_dim, activation)
        else:
            self.encoder = ConvEncoder(self.data_shape, 2 * latent_dim, (32, 64), hidden, activation)
        if decoder == "gated":
            # z itself is the context: the gated network conditions every layer on it, and on the map
            # s(z) of an MLP mirroring the encoder's widths (the factorized vae's decoder, in effect).
            self.pixelcnn = GatedPixelCNN(self.data_shape, latent_dim, num_layers=pixelcnn_layers,
                                          channels=pixelcnn_channels, first_kernel_size=first_kernel_size,
                                          kernel_size=kernel_size, conditioning_channels=conditioning_channels,
                                          conditioning_hidden=tuple(reversed(hidden)),
                                          conditioning_activation=activation)
        else:
            self.conditioner = nn.Linear(latent_dim, math.prod(self.conditioning_shape))
            self.pixelcnn = PixelCNN(self.data_shape, conditioning_channels, num_layers=pixelcnn_layers,
                                     channels=pixelcnn_channels, first_kernel_size=first_kernel_size,
                                     kernel_size=kernel_size)

    def encode(self, x):
        """Mean and standard deviation of ``q(z|x)``, each of shape ``x.shape[:-3] + (latent_dim,)``."""
        if self.architecture == "mlp":
            x = flatten_event(x, 3)
        loc, raw_scale = self.encoder(x).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + 1e-5

    def likelihood_dist(self, z):
        """``p(x|z)``: a :class:`PixelCNNBernoulli` with batch shape ``z.shape[:-1]``."""
        if self.decoder == "gated":
            return PixelCNNBernoulli(self.pixelcnn, z)
        context = self.conditioner(z).reshape(z.shape[:-1] + self.conditioning_shape)
        return PixelCNNBernoulli(self.pixelcnn, context)

    def model(self, x=None, num_samples=1):
        n = x.shape[0] if x is not None else num_samples
        prior_loc = self.pixelcnn.output_bias.new_zeros(self.latent_dim)
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.Normal(prior_loc, 1.0).to_event(1))
            pyro.sample("x", self.likelihood_dist(z), obs=x)

    def guide(self, x):
        loc, scale = self.encode(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def initialize(self, x):
        """Set the PixelCNN's per-pixel output bias to the logit of the mean image."""
        self.pixelcnn.output_bias.copy_(torch.logit(x.mean(0).clamp(1e-3, 1 - 1e-3)))
