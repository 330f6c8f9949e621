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
        out_group = torch.arange(out_channels) % data_channels
        in_group = torch.arange(in_channels) % data_channels
        if mask_type == "A":
            allowed = out_group[:, None] > in_group[None, :]
        else:
            allowed = out_group[:, None] >= in_group[None, :]
        mask[:, :, centre, centre] = allowed.to(mask.dtype)
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
    """

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

    def forward(self, x, context):
        # Centre binary inputs at zero, so that the zero padding outside the image differs from
        # both pixel values.
        h = torch.relu(self.convs[0](2 * x - 1) + self.conditioners[0](context))
        for conv, conditioner in zip(self.convs[1:], self.conditioners[1:]):
            h = h + torch.relu(conv(h) + conditioner(context))
        return self.output(h) + self.output_conditioner(context) + self.output_bias
