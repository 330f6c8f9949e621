"""Pyro distributions the zoo needs that Pyro lacks.

:class:`PixelCNNBernoulli` is the autoregressive likelihood of a binary image given a context,

.. math::

    p(x \\mid s) = \\prod_{i=1}^{H W} \\prod_{c=1}^{C}
        \\mathrm{Bernoulli}\\big(x_{c,i} \\mid \\sigma(f_{c,i}(x_{<(c,i)}, s))\\big),

where :math:`f` is a masked-convolution network (:class:`pyro_lvm.nn.PixelCNN` or
:class:`pyro_lvm.nn.GatedPixelCNN`) whose logit at (channel ``c``, pixel ``i``) depends only on image
values earlier in raster-then-channel order, and :math:`s` a context computed from the latent code
``z`` in the ``pixelcnn-vae`` model (a map for the plain PixelCNN, the vector ``z`` itself for the
gated one). Because of the masks every conditional is available from one pass over the observed
image, so ``log_prob`` is exact and parallel; ``sample`` must go pixel by pixel
(:func:`autoregressive_sample`).

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
        autoregressive in raster-then-channel order (e.g. :class:`pyro_lvm.nn.PixelCNN`). Its
        attribute ``context_event_dim`` (default 3: a map) says how many rightmost dimensions of the
        context belong to one item; its optional ``sampler(context)`` speeds up sampling.
    :param torch.Tensor context: shape ``batch_shape + context_event_shape``; the rest of its
        dimensions are the distribution's batch shape.

    Values are 0./1. float tensors of shape ``batch_shape + (C, H, W)``.
    """

    support = constraints.independent(constraints.boolean, 3)
    has_rsample = False

    def __init__(self, network, context, validate_args=None):
        self.context_event_dim = getattr(network, "context_event_dim", 3)
        if context.dim() < self.context_event_dim:
            raise ValueError(f"context must have at least {self.context_event_dim} dimensions (the network's "
                             f"context_event_dim), got shape {tuple(context.shape)}")
        self.network = network
        self.context = context
        batch_shape = context.shape[: context.dim() - self.context_event_dim]
        super().__init__(batch_shape, torch.Size(network.data_shape), validate_args=validate_args)

    @property
    def arg_constraints(self):
        return {"context": constraints.independent(constraints.real, self.context_event_dim)}

    @property
    def _context_event_shape(self):
        return self.context.shape[self.context.dim() - self.context_event_dim:]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(PixelCNNBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new.network = self.network
        new.context_event_dim = self.context_event_dim
        new.context = self.context.expand(batch_shape + self._context_event_shape)
        super(PixelCNNBernoulli, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _flat_context(self, batch_shape):
        event_shape = self._context_event_shape
        return self.context.expand(batch_shape + event_shape).reshape((-1,) + event_shape)

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
        """Exact ancestral sampling, one (pixel, channel) at a time (:func:`autoregressive_sample`)."""
        batch_shape = torch.Size(sample_shape) + self.batch_shape
        context = self._flat_context(batch_shape)
        uniforms = torch.rand((context.shape[0],) + self.event_shape, dtype=context.dtype, device=context.device)
        with torch.no_grad():
            x = autoregressive_sample(self.network, context, uniforms)
        return x.reshape(batch_shape + self.event_shape)


class _FullPassSampler:
    """The fallback for a network without ``sampler``: a whole forward pass for every pixel."""

    def __init__(self, network, context):
        self.network, self.context = network, context

    def start_row(self, x, i):
        pass

    def pixel_logits(self, x, i, j):
        return self.network(x, self.context)[:, :, i, j]


def autoregressive_sample(network, context, uniforms):
    """Draw binary images from an autoregressive ``network`` pixel by pixel in raster order, channel
    by channel within a pixel: ``x[c, i, j] = 1`` exactly when ``uniforms[c, i, j] < sigmoid(logit)``,
    the logit given everything drawn before. ``context`` [N, *context_event_shape], ``uniforms``
    [N, C, H, W] in [0, 1); returns x [N, C, H, W].

    The logits come from ``network.sampler(context)`` where the network has one (an object with
    ``start_row(x, i)``, called once before row ``i``, and ``pixel_logits(x, i, j)`` -> [N, C], exact
    for channel ``c`` once the channels before it are drawn); it caches what does not depend on the
    pixels still to be drawn (the conditioning, the rows above). Otherwise every pixel takes a whole
    forward pass. Either way: one pass per pixel and channel, ``H * W * C`` in all.
    """
    channels, height, width = uniforms.shape[-3:]
    make_sampler = getattr(network, "sampler", None)
    sampler = make_sampler(context) if make_sampler is not None else _FullPassSampler(network, context)
    x = uniforms.new_zeros(uniforms.shape)
    for i in range(height):
        sampler.start_row(x, i)
        for j in range(width):
            for c in range(channels):
                # Pixels not yet drawn are zero; the masks guarantee the logit ignores them.
                probability = torch.sigmoid(sampler.pixel_logits(x, i, j)[:, c])
                x[:, c, i, j] = (uniforms[:, c, i, j] < probability).to(x.dtype)
    return x
