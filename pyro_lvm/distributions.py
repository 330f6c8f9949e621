"""Pyro distributions the zoo needs that Pyro lacks.

:class:`PixelCNNBernoulli` is the autoregressive likelihood of a binary image given a context,

.. math::

    p(x \\mid s) = \\prod_{i=1}^{H W} \\prod_{c=1}^{C}
        \\mathrm{Bernoulli}\\big(x_{c,i} \\mid \\sigma(f_{c,i}(x_{<(c,i)}, s))\\big),

where :math:`f` is a masked-convolution network (:class:`pyro_lvm.nn.PixelCNN`) whose logit at
(channel ``c``, pixel ``i``) depends only on image values earlier in raster-then-channel order, and
:math:`s` a context (a map computed from the latent code ``z`` in the ``pixelcnn-vae`` model).
Because of the masks every conditional is available from one pass over the observed image, so
``log_prob`` is exact and parallel; ``sample`` must go pixel by pixel.

Reference: van den Oord, Kalchbrenner, Kavukcuoglu (2016), "Pixel Recurrent Neural Networks";
van den Oord et al. (2016), "Conditional Image Generation with PixelCNN Decoders";
Gulrajani et al. (2017), "PixelVAE".
"""

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.nn import functional as F


class PixelCNNBernoulli(TorchDistribution):
    """Binary images ``(C, H, W)`` from an autoregressive network, given a per-item context.

    :param network: a module with attribute ``data_shape == (C, H, W)`` called as
        ``network(x, context)`` on ``x`` of shape ``[N, C, H, W]`` and ``context`` of shape
        ``[N, *context_event_shape]``, returning Bernoulli logits ``[N, C, H, W]`` that are
        autoregressive in raster-then-channel order (e.g. :class:`pyro_lvm.nn.PixelCNN`).
    :param torch.Tensor context: shape ``batch_shape + (context_channels, H', W')``; its three
        rightmost dimensions are the network's context, the rest the distribution's batch shape.

    Values are 0./1. float tensors of shape ``batch_shape + (C, H, W)``.
    """

    arg_constraints = {"context": constraints.independent(constraints.real, 3)}
    support = constraints.independent(constraints.boolean, 3)
    has_rsample = False

    def __init__(self, network, context, validate_args=None):
        if context.dim() < 3:
            raise ValueError(f"context must have at least 3 dimensions (channels, height, width), got shape "
                             f"{tuple(context.shape)}")
        self.network = network
        self.context = context
        super().__init__(context.shape[:-3], torch.Size(network.data_shape), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(PixelCNNBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new.network = self.network
        new.context = self.context.expand(batch_shape + self.context.shape[-3:])
        super(PixelCNNBernoulli, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _flat_context(self, batch_shape):
        context_event_shape = self.context.shape[-3:]
        return self.context.expand(batch_shape + context_event_shape).reshape((-1,) + context_event_shape)

    def logits(self, value):
        """The network's logits for every (channel, pixel) of ``value``, in one parallel pass."""
        event_shape = self.event_shape
        batch_shape = torch.broadcast_shapes(value.shape[: value.dim() - 3], self.batch_shape)
        flat_value = value.expand(batch_shape + event_shape).reshape((-1,) + event_shape)
        logits = self.network(flat_value, self._flat_context(batch_shape))
        return logits.reshape(batch_shape + event_shape)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        logits = self.logits(value)
        value = value.expand(logits.shape)
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum((-3, -2, -1))

    def sample(self, sample_shape=torch.Size()):
        """Ancestral sampling, one (pixel, channel) at a time: ``H * W * C`` network passes."""
        batch_shape = torch.Size(sample_shape) + self.batch_shape
        context = self._flat_context(batch_shape)
        channels, height, width = self.event_shape
        x = context.new_zeros((context.shape[0],) + self.event_shape)
        with torch.no_grad():
            for i in range(height):
                for j in range(width):
                    for c in range(channels):
                        # Pixels not yet drawn are zero; the masks guarantee the logit ignores them.
                        logits = self.network(x, context)[:, c, i, j]
                        x[:, c, i, j] = torch.bernoulli(torch.sigmoid(logits))
        return x.reshape(batch_shape + self.event_shape)
