"""Network building blocks shared by the model zoo and by users' models.

Everything here is a plain :class:`torch.nn.Module`: put one inside a :class:`~pyro.nn.PyroModule`
model and its parameters become part of the model (``model.parameters()``, ``state_dict()``, and
Pyro's ``param`` sites when the submodule is accessed inside ``model`` or ``guide``).

All networks accept arbitrary leading batch dimensions, because estimators run models under a
vectorized particle plate: a decoder sees ``z`` of shape ``[K, n, latent_dim]`` as often as
``[n, latent_dim]``.

- :class:`MLP`: a multilayer perceptron with hidden widths and an activation given by name.
- :class:`ConvEncoder` / :class:`ConvDecoder`: small strided convolution stacks for images
  ``(C, H, W)`` of any size (8x8 digits, 28x28 MNIST), mirror images of each other.
- :class:`MaskedConv2d` and :class:`PixelCNN`: masked convolutions and the conditional PixelCNN
  network built from them (van den Oord et al., 2016), the autoregressive decoder of the
  ``pixelcnn-vae`` zoo model; see :class:`pyro_lvm.distributions.PixelCNNBernoulli`.
- :class:`GatedPixelCNN`: the gated PixelCNN of van den Oord et al. (2016), "Conditional Image
  Generation with PixelCNN Decoders": a vertical and a horizontal stack (no blind spot), gated
  tanh-sigmoid units, conditioned on a vector (the latent code); ``pixelcnn-vae -p decoder=gated``.

The autoregressive networks also offer ``sampler(context)``, an object that computes the logits of
one pixel at a time with everything cached that does not depend on the pixels still to be drawn
(see :func:`pyro_lvm.distributions.autoregressive_sample`).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

_ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}


def activation(name):
    """A fresh activation module from its name (``"tanh"``, ``"relu"``, ``"elu"``, ``"gelu"``, ...)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(sorted(_ACTIVATIONS))}") from None


def flatten_event(x, event_dim):
    """Merge the rightmost ``event_dim`` dimensions of ``x`` into one, keeping batch dimensions."""
    return x.reshape(x.shape[: x.dim() - event_dim] + (-1,))


def _apply_to_flat_batch(fn, x, event_dim):
    """Apply ``fn``, which takes exactly one batch dimension, to ``x`` with any batch dimensions."""
    batch_shape = x.shape[: x.dim() - event_dim]
    y = fn(x.reshape((-1,) + x.shape[x.dim() - event_dim:]))
    return y.reshape(batch_shape + y.shape[1:])


class MLP(nn.Sequential):
    """A multilayer perceptron ``in_features -> hidden[0] -> ... -> hidden[-1] -> out_features``.

    An activation follows every hidden layer, none follows the output layer. ``output_bias=False``
    drops the last layer's bias, for a model that keeps its own output bias (see ``VAE``).
    """

    def __init__(self, in_features, hidden, out_features, activation_name="tanh", output_bias=True):
        layers = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), activation(activation_name)]
            width = h
        layers.append(nn.Linear(width, out_features, bias=output_bias))
        super().__init__(*layers)
        self.in_features = in_features
        self.out_features = out_features


def _conv_output_size(size):
    # kernel 3, stride 2, padding 1: ceil(size / 2)
    return (size - 1) // 2 + 1


class ConvEncoder(nn.Module):
    """Strided convolutions ``(C, H, W) -> features``: each layer a 3x3 convolution with stride 2.

    The spatial size halves (rounding up) at every layer: 8x8 -> 4x4 -> 2x2, 28x28 -> 14x14 -> 7x7.
    The feature map is flattened and mapped by an :class:`MLP` with widths ``hidden`` to
    ``out_features``. Inputs may have any leading batch dimensions.
    """

    def __init__(self, data_shape, out_features, channels=(32, 64), hidden=(), activation_name="relu"):
        super().__init__()
        c, h, w = data_shape
        layers = []
        for out_c in channels:
            layers += [nn.Conv2d(c, out_c, 3, stride=2, padding=1), activation(activation_name)]
            c, h, w = out_c, _conv_output_size(h), _conv_output_size(w)
        self.convs = nn.Sequential(*layers)
        self.feature_shape = (c, h, w)
        self.head = MLP(c * h * w, hidden, out_features, activation_name)

    def forward(self, x):
        features = _apply_to_flat_batch(self.convs, x, 3)
        return self.head(flatten_event(features, 3))


class ConvDecoder(nn.Module):
    """The mirror image of :class:`ConvEncoder`: ``features -> (C, H, W)``.

    An :class:`MLP` maps the input to the encoder's final feature map, then 3x3 transposed
    convolutions with stride 2 double the spatial size back to exactly ``data_shape`` (the output
    padding of each layer is chosen so odd sizes such as 7 -> 14 -> 28 or 4 -> 7 come out right).
    The last layer is linear (logits or means); ``output_bias=False`` drops its bias.
    """

    def __init__(self, in_features, data_shape, channels=(32, 64), hidden=(), activation_name="relu",
                 output_bias=True):
        super().__init__()
        c, h, w = data_shape
        sizes = [(h, w)]
        for _ in channels:
            h, w = _conv_output_size(h), _conv_output_size(w)
            sizes.append((h, w))
        self.feature_shape = (channels[-1], h, w) if channels else tuple(data_shape)
        self.head = MLP(in_features, hidden, math.prod(self.feature_shape), activation_name)
        self.head_activation = activation(activation_name) if channels else nn.Identity()
        layers = []
        in_channels = list(reversed(channels))
        out_channels = in_channels[1:] + [c]
        for i, (in_c, out_c) in enumerate(zip(in_channels, out_channels)):
            (h_in, w_in), (h_out, w_out) = sizes[-1 - i], sizes[-2 - i]
            last = i == len(channels) - 1
            # A transposed 3x3 convolution with stride 2 and padding 1 maps size s to 2s - 1 + output_padding.
            layers.append(nn.ConvTranspose2d(in_c, out_c, 3, stride=2, padding=1,
                                             output_padding=(h_out - 2 * h_in + 1, w_out - 2 * w_in + 1),
                                             bias=output_bias or not last))
            if not last:
                layers.append(activation(activation_name))
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z):
        features = self.head_activation(self.head(z))
        features = features.reshape(features.shape[:-1] + self.feature_shape)
        return _apply_to_flat_batch(self.deconvs, features, 3)


def _channel_groups_allowed(out_channels, in_channels, data_channels, mask_type):
    """Which input channels an output channel may read at the current pixel: channel ``j`` belongs to
    group ``j % data_channels``; mask ``"A"`` allows groups ``< g`` for output group ``g``, ``"B"``
    groups ``<= g``. A float matrix [out_channels, in_channels] of zeros and ones."""
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    out_group = torch.arange(out_channels) % data_channels
    in_group = torch.arange(in_channels) % data_channels
    if mask_type == "A":
        return (out_group[:, None] > in_group[None, :]).float()
    return (out_group[:, None] >= in_group[None, :]).float()


class MaskedConv2d(nn.Conv2d):
    r"""A 2-d convolution masked so that output pixel ``i`` sees only input pixels before ``i``.

    Pixels are ordered in raster order (row by row, left to right) and, within a pixel, by channel
    (van den Oord et al., 2016, "Pixel Recurrent Neural Networks", section 3.4). Input and output
    channels are split into ``data_channels`` groups (channel ``j`` belongs to group
    ``j % data_channels``; the image's own channels are the groups themselves). The kernel is zero
    below the centre row and right of the centre in the centre row. At the centre, mask ``"A"`` (the
    first layer, which reads the image) connects output group ``g`` to input groups ``< g`` only,
    and mask ``"B"`` (later layers, which read features) to groups ``<= g``. Stacking one ``"A"``
    layer and any number of ``"B"`` layers gives a network whose output at (pixel ``i``, channel
    ``c``) depends only on image values strictly earlier in that order.
    """

    def __init__(self, in_channels, out_channels, kernel_size, mask_type, data_channels=1, bias=True):
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so the kernel has a centre, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.mask_type = mask_type
        centre = kernel_size // 2
        mask = torch.ones(out_channels, in_channels, kernel_size, kernel_size)
        mask[:, :, centre + 1:, :] = 0
        mask[:, :, centre, centre + 1:] = 0
        mask[:, :, centre, centre] = _channel_groups_allowed(out_channels, in_channels, data_channels, mask_type)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.mask, self.bias, self.stride, self.padding)


class PixelCNN(nn.Module):
    r"""A conditional PixelCNN: per-pixel Bernoulli logits of a binary image, given a context map.

    .. math::

        h_1 = \mathrm{relu}(A \star x + V_1 s), \quad
        h_l = h_{l-1} + \mathrm{relu}(B_l \star h_{l-1} + V_l s), \quad
        \mathrm{logits} = B_{\mathrm{out}} \star h_L + V_{\mathrm{out}} s + \beta

    with :math:`A` a masked convolution of type ``"A"`` (``first_kernel_size``), :math:`B_l`
    masked convolutions of type ``"B"`` (``kernel_size``), :math:`B_{\mathrm{out}}` a 1x1 type
    ``"B"`` convolution, :math:`V_l` 1x1 convolutions of the context map :math:`s` (location
    dependent conditioning, van den Oord et al., 2016, "Conditional Image Generation with PixelCNN
    Decoders", section 2.3) and :math:`\beta` a per-pixel output bias (``output_bias``, which a
    model may set to the logit of the mean image). The context depends on the latent code only, so
    it cannot break the autoregressive order. The type ``"B"`` layers are residual
    (:math:`h_l = h_{l-1} + \mathrm{relu}(\dots)`), which keeps deeper stacks trainable.

    ``forward(x, context)`` takes ``x`` of shape ``[N, C, H, W]`` and ``context`` of shape
    ``[N, context_channels, H, W]`` and returns logits of shape ``[N, C, H, W]``.

    Stacked masked convolutions have a blind spot: the logit at pixel (i, j) never sees pixels
    above and to the right, such as (i - 1, j + 2), however deep the stack (van den Oord et al.,
    2016, "Conditional Image Generation with PixelCNN Decoders", figure 1); :class:`GatedPixelCNN`
    has none.
    """

    context_event_dim = 3  # the context is a map (channels, height, width)

    def __init__(self, data_shape, context_channels, num_layers=4, channels=32, first_kernel_size=7,
                 kernel_size=3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a PixelCNN needs at least one layer, got num_layers={num_layers}")
        c = data_shape[0]
        channels = max(channels, c) - max(channels, c) % c  # a whole number of channel groups
        self.data_shape = tuple(data_shape)
        self.context_channels = context_channels
        self.convs = nn.ModuleList(
            [MaskedConv2d(c, channels, first_kernel_size, "A", data_channels=c)]
            + [MaskedConv2d(channels, channels, kernel_size, "B", data_channels=c) for _ in range(num_layers - 1)])
        self.conditioners = nn.ModuleList(
            [nn.Conv2d(context_channels, channels, 1, bias=False) for _ in range(num_layers)])
        self.output = MaskedConv2d(channels, c, 1, "B", data_channels=c, bias=False)
        self.output_conditioner = nn.Conv2d(context_channels, c, 1, bias=False)
        self.output_bias = nn.Parameter(torch.zeros(data_shape))

    def condition(self, context):
        """The context's term in every layer and in the output (a list of maps), computed once."""
        return [conditioner(context) for conditioner in self.conditioners] + [self.output_conditioner(context)]

    def forward(self, x, context):
        return self.forward_conditioned(x, self.condition(context))

    def forward_conditioned(self, x, conditioning, rows=slice(None)):
        """Logits from ``x`` and the terms of :meth:`condition`; ``x`` may hold only the image rows
        ``rows`` (a slice from the top): a masked convolution's output at row r reads rows <= r only,
        so the logits of those rows are exact."""
        *layer_terms, output_term = conditioning
        # Centre binary inputs at zero, so that the zero padding outside the image differs from
        # both pixel values.
        h = torch.relu(self.convs[0](2 * x - 1) + layer_terms[0][:, :, rows])
        for conv, term in zip(self.convs[1:], layer_terms[1:]):
            h = h + torch.relu(conv(h) + term[:, :, rows])
        return self.output(h) + output_term[:, :, rows] + self.output_bias[:, rows]

    def sampler(self, context):
        """Pixel-by-pixel logits for ancestral sampling (see :func:`pyro_lvm.distributions.autoregressive_sample`):
        the context's terms are computed once, and each pass runs on the rows drawn so far only."""
        return _PlainPixelCNNSampler(self, context)


class _PlainPixelCNNSampler:
    def __init__(self, network, context):
        self.network = network
        self.conditioning = network.condition(context)

    def start_row(self, x, i):
        pass

    def pixel_logits(self, x, i, j):
        rows = slice(0, i + 1)
        return self.network.forward_conditioned(x[:, :, rows], self.conditioning, rows)[:, :, i, j]


# ---------------------------------------------------------------------------------------------------
# Gated PixelCNN


def _gate(pre_activation):
    """The gated activation unit tanh(a) * sigmoid(b), a and b the two halves of the channels."""
    a, b = pre_activation.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def _crop(tensor, rows=slice(None), cols=slice(None)):
    """``tensor[..., rows, cols]`` on its last two dimensions, leaving a dimension of size 1 (a term
    broadcast over the image) as it is."""
    rows = rows if tensor.shape[-2] > 1 else slice(None)
    cols = cols if tensor.shape[-1] > 1 else slice(None)
    return tensor[..., rows, cols]


class VerticalConv2d(nn.Conv2d):
    """The vertical stack's convolution: a ``(k // 2 + 1) x k`` kernel whose bottom row is the current
    row, so the output at row r reads input rows ``r - k // 2 .. r`` and columns ``c - k // 2 .. c + k // 2``
    (zero padding above and at the sides, none below)."""

    def __init__(self, in_channels, out_channels, kernel_size):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so the kernel has a centre, got {kernel_size}")
        super().__init__(in_channels, out_channels, (kernel_size // 2 + 1, kernel_size))
        self.reach = kernel_size // 2

    def forward(self, x):
        return super().forward(F.pad(x, (self.reach, self.reach, self.reach, 0)))


class HorizontalConv2d(nn.Conv2d):
    """The horizontal stack's convolution: a ``1 x (k // 2 + 1)`` kernel whose last tap is the current
    pixel, so the output at column c reads columns ``c - k // 2 .. c`` of the same row. At the current
    pixel the channel groups are masked as in :class:`MaskedConv2d` (``"A"``: groups strictly before,
    for the layer that reads the image; ``"B"``: up to and including, for later layers)."""

    def __init__(self, in_channels, out_channels, kernel_size, mask_type, data_channels=1):
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so the kernel has a centre, got {kernel_size}")
        super().__init__(in_channels, out_channels, (1, kernel_size // 2 + 1))
        self.reach = kernel_size // 2
        self.mask_type = mask_type
        mask = torch.ones(out_channels, in_channels, 1, self.reach + 1)
        mask[:, :, 0, self.reach] = _channel_groups_allowed(out_channels, in_channels, data_channels, mask_type)
        self.register_buffer("mask", mask)

    def forward(self, x):
        return F.conv2d(F.pad(x, (self.reach, 0, 0, 0)), self.weight * self.mask, self.bias)


class GatedPixelCNNLayer(nn.Module):
    r"""One layer of the gated PixelCNN: a vertical and a horizontal stack, gated, conditioned.

    .. math::

        a_v = W_v \star v, \qquad
        v' = \tanh(a_v^{f} + c_v^{f}) \odot \sigma(a_v^{g} + c_v^{g}),

        a_h = W_h \star h + U \,\mathrm{shift}_\downarrow(a_v) + c_h, \qquad
        h' = [h] + R\,\big(\tanh(a_h^{f}) \odot \sigma(a_h^{g})\big),

    with :math:`W_v` a :class:`VerticalConv2d`, :math:`W_h` a :class:`HorizontalConv2d`, :math:`U` and
    :math:`R` 1x1 convolutions (:math:`R` channel-masked, type ``"B"``), :math:`f, g` the two halves of
    ``2 * channels`` channels, and :math:`c_v, c_h` the conditioning terms of :meth:`condition`. The
    vertical stack's pre-activation is shifted down one row before it enters the horizontal stack, so
    that what the horizontal stack receives at row i comes from rows < i only. The horizontal stack is
    residual (the :math:`[h]` term) except in the first layer, whose input is the image.
    """

    def __init__(self, in_channels, channels, kernel_size, mask_type, data_channels, context_dim,
                 conditioning_channels):
        super().__init__()
        self.channels = channels
        self.residual = mask_type == "B"
        self.vertical = VerticalConv2d(in_channels, 2 * channels, kernel_size)
        self.horizontal = HorizontalConv2d(in_channels, 2 * channels, kernel_size, mask_type, data_channels)
        self.vertical_to_horizontal = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.horizontal_out = MaskedConv2d(channels, channels, 1, "B", data_channels=data_channels)
        # z as the conditioning vector (V^T h, eq. 4 of the paper), for both stacks at once ...
        self.condition_vector = nn.Linear(context_dim, 4 * channels, bias=False)
        # ... and, from the map s = m(z), a location-dependent term (V * s, eq. 5).
        self.condition_map = (nn.Conv2d(conditioning_channels, 4 * channels, 1, bias=False)
                              if conditioning_channels else None)

    def condition(self, context, context_map=None):
        """The conditioning terms (c_v, c_h) of the two stacks, each [N, 2 * channels, H or 1, W or 1]."""
        term = self.condition_vector(context)[:, :, None, None]
        if self.condition_map is not None:
            term = term + self.condition_map(context_map)
        return term.chunk(2, dim=1)

    def vertical_step(self, v, condition_v):
        """The vertical stack: (its pre-activation a_v, its output v')."""
        pre_activation = self.vertical(v)
        return pre_activation, _gate(pre_activation + condition_v)

    def from_vertical(self, vertical_pre_activation):
        """U shift(a_v): what the horizontal stack receives from the vertical one, already shifted down."""
        shifted = F.pad(vertical_pre_activation, (0, 0, 1, 0))[:, :, :-1]
        return self.vertical_to_horizontal(shifted)

    def horizontal_step(self, h, from_vertical, condition_h):
        out = self.horizontal_out(_gate(self.horizontal(h) + from_vertical + condition_h))
        return h + out if self.residual else out


class GatedPixelCNN(nn.Module):
    r"""The gated PixelCNN (van den Oord et al., 2016, "Conditional Image Generation with PixelCNN
    Decoders"): per-pixel Bernoulli logits of a binary image ``(C, H, W)``, given a vector ``context``.

    ``num_layers`` :class:`GatedPixelCNNLayer`\ s (the first of kernel size ``first_kernel_size``, type
    ``"A"`` at the current pixel, the others ``kernel_size``, type ``"B"``), then the output head

    .. math::

        \mathrm{logits} = O_2\, \mathrm{relu}(O_1\, \mathrm{relu}(h_L)) + \beta

        + V_{\mathrm{out}} s,

    with :math:`O_1, O_2` channel-masked 1x1 convolutions and :math:`\beta` a per-pixel output bias
    (``output_bias``, which a model may set to the logit of the mean image). Every layer is
    conditioned on the context vector ``z`` (``context_dim`` wide) through a linear term (eq. 4 of the
    paper), and, when ``conditioning_channels > 0``, on the map ``s = m(z)`` through a 1x1 convolution
    (eq. 5), where ``m`` is an :class:`MLP` with widths ``conditioning_hidden`` (none: linear) whose
    output is reshaped to ``conditioning_channels x H x W``. The map also enters the logits directly
    (:math:`V_{\mathrm{out}} s`, a 1x1 convolution), so that with the autoregressive weights at zero the
    network is a factorized decoder ``m`` of ``z``: the autoregressive part can only add to it.

    The vertical stack at row i sees the rows above (a widening window), the horizontal stack the
    pixels to the left in row i, so with enough layers for the image's size the logit at a pixel
    depends on *every* earlier pixel: there is no blind spot (receptive field after L layers of
    reach r = k // 2: the rows i - 1 - r L .. i - 1 at columns j - r L .. j + r L, and row i at
    columns j - r L .. j - 1; the first layer's reach is that of ``first_kernel_size``).

    ``forward(x, context)`` takes ``x`` [N, C, H, W] and ``context`` [N, context_dim] and returns
    logits [N, C, H, W], autoregressive in raster-then-channel order.
    """

    context_event_dim = 1  # the context is a vector (the latent code)

    def __init__(self, data_shape, context_dim, num_layers=4, channels=32, first_kernel_size=7, kernel_size=3,
                 conditioning_channels=4, conditioning_hidden=(), conditioning_activation="relu"):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a PixelCNN needs at least one layer, got num_layers={num_layers}")
        if conditioning_channels < 0:
            raise ValueError(f"conditioning_channels must be >= 0, got {conditioning_channels}")
        c, height, width = data_shape
        channels = max(channels, c) - max(channels, c) % c  # a whole number of channel groups
        self.data_shape = tuple(data_shape)
        self.context_dim = context_dim
        self.channels = channels
        self.conditioning_shape = (conditioning_channels, height, width)
        self.context_map = (MLP(context_dim, tuple(conditioning_hidden), conditioning_channels * height * width,
                                conditioning_activation) if conditioning_channels else None)
        self.layers = nn.ModuleList(
            [GatedPixelCNNLayer(c, channels, first_kernel_size, "A", c, context_dim, conditioning_channels)]
            + [GatedPixelCNNLayer(channels, channels, kernel_size, "B", c, context_dim, conditioning_channels)
               for _ in range(num_layers - 1)])
        self.output_hidden = MaskedConv2d(channels, channels, 1, "B", data_channels=c)
        self.output = MaskedConv2d(channels, c, 1, "B", data_channels=c, bias=False)
        self.output_conditioner = nn.Conv2d(conditioning_channels, c, 1, bias=False) if conditioning_channels else None
        self.output_bias = nn.Parameter(torch.zeros(data_shape))

    def _context_map(self, context):
        """The map s = m(z) [N, *conditioning_shape] (None without one) and the output's term (the
        bias, plus V_out s where there is a map)."""
        if self.context_map is None:
            return None, self.output_bias
        context_map = self.context_map(context).reshape((context.shape[0],) + self.conditioning_shape)
        return context_map, self.output_bias + self.output_conditioner(context_map)

    def condition(self, context):
        """The conditioning, computed once from the context [N, context_dim]: every layer's terms
        (c_v, c_h), and last the output's term (for the sampler, which reuses them for every pixel)."""
        context_map, output_term = self._context_map(context)
        return [layer.condition(context, context_map) for layer in self.layers] + [output_term]

    def forward(self, x, context):
        # Centre binary inputs at zero, so that the zero padding outside the image differs from
        # both pixel values.
        x = 2 * x - 1
        # One layer at a time, its conditioning computed where it is used: without autograd a pass
        # holds a few maps per image, not every layer's (the same operations as the sampler's
        # vertical_stack and horizontal_logits, in another order).
        context_map, output_term = self._context_map(context)
        v, h = x, x
        for layer in self.layers:
            condition_v, condition_h = layer.condition(context, context_map)
            pre_activation, v = layer.vertical_step(v, condition_v)
            h = layer.horizontal_step(h, layer.from_vertical(pre_activation), condition_h)
        hidden = torch.relu(self.output_hidden(torch.relu(h)))
        return self.output(hidden) + output_term

    def vertical_stack(self, x, conditioning, rows=slice(None)):
        """Every layer's vertical pre-activation a_v on the centred image ``x``, which may hold only
        the image rows ``rows`` (a slice from the top): row r of the vertical stack reads rows <= r."""
        v, pre_activations = x, []
        for layer, (condition_v, _) in zip(self.layers, conditioning[:-1]):
            pre_activation, v = layer.vertical_step(v, _crop(condition_v, rows))
            pre_activations.append(pre_activation)
        return pre_activations

    def horizontal_logits(self, x, from_vertical, conditioning, rows=slice(None), cols=slice(None)):
        """The horizontal stack and the output head on the centred image ``x``, which may be the crop
        ``rows`` x ``cols`` of the image (``from_vertical`` cropped alike); a crop that keeps every
        column left of the last one gives that column's exact logits."""
        h = x
        for layer, term, (_, condition_h) in zip(self.layers, from_vertical, conditioning[:-1]):
            h = layer.horizontal_step(h, term, _crop(condition_h, rows, cols))
        hidden = torch.relu(self.output_hidden(torch.relu(h)))
        return self.output(hidden) + conditioning[-1][..., rows, cols]

    def sampler(self, context):
        """Pixel-by-pixel logits for ancestral sampling (see :func:`pyro_lvm.distributions.autoregressive_sample`):
        the conditioning terms are computed once; the vertical stack once per row, on the rows above;
        each pixel then takes one pass of the horizontal stack over its row, up to the pixel."""
        return _GatedPixelCNNSampler(self, context)


class _GatedPixelCNNSampler:
    def __init__(self, network, context):
        self.network = network
        self.conditioning = network.condition(context)

    def start_row(self, x, i):
        network = self.network
        if i == 0:  # nothing above: the shifted vertical stack is the zero padding
            zeros = x.new_zeros((x.shape[0], 2 * network.channels, 1, x.shape[-1]))
            self.from_vertical = [layer.vertical_to_horizontal(zeros) for layer in network.layers]
            return
        # The shifted term at row i is U a_v at row i - 1, which reads the rows < i only.
        pre_activations = network.vertical_stack(2 * x[:, :, :i] - 1, self.conditioning, rows=slice(0, i))
        self.from_vertical = [layer.vertical_to_horizontal(pre_activation[:, :, -1:])
                              for layer, pre_activation in zip(network.layers, pre_activations)]

    def pixel_logits(self, x, i, j):
        cols = slice(0, j + 1)
        row = 2 * x[:, :, i : i + 1, cols] - 1
        terms = [term[..., cols] for term in self.from_vertical]
        logits = self.network.horizontal_logits(row, terms, self.conditioning, slice(i, i + 1), cols)
        return logits[:, :, 0, j]
