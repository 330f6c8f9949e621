"""Doubly-reparameterized gradients (DReG) for the importance-weighted bound.

The IWAE bound L_K = E[log (1/K) sum_k w_k], z_k = z(eps_k, phi) reparameterized, has the usual
gradient estimator sum_k w~_k grad log w_k (w~ the normalized weights). For the guide's parameters
phi it is noisy and its signal-to-noise ratio *falls* as K grows (Rainforth et al., 2018). Tucker,
Lawson, Gu and Maddison (2019, "Doubly Reparameterized Gradient Estimators for Monte Carlo
Objectives", arXiv:1810.04152) remove the score-function part of it, which has expectation zero:

    grad_phi L_K  =  E[ sum_k w~_k^2  (d log w_k / d z_k) (d z_k / d phi) ],

where in d log w_k / d z_k the guide's parameters are held fixed (log q_{stop(phi)}). The model's
parameters keep the plain IWAE gradient sum_k w~_k grad_theta log w_k. Same bound, same expectation,
lower variance for the guide.

Implementation (no second pass through the model): the guide's values z_k are passed to the model
and to log q through an identity node z'_k whose backward multiplies the incoming gradient by
w~_k (a tensor hook, the weights filled in once the forward pass has computed them); log q is
evaluated with the guide distributions' parameters detached; the surrogate is
sum_k stop(w~_k) log w_k. The model's parameters then see w~_k, the guide's w~_k * w~_k. Because the
hook sits on z' and not on z, gradients that flow from a later guide site into an earlier one inside
the guide (hierarchical guides) are weighted once, not twice.

Every guide site must be reparameterized; otherwise :class:`~pyro_lvm.errors.UserError`.
"""

import torch
from pyro.util import warn_if_nan

from ..errors import UserError
from ..estimators.importance_weights import compute_importance_weights
from ..protocol.plates import plate_frame, program_frames
from .iwae import IWAE_ELBO


class _GradientWeights:
    """Normalized weights [K, n], set after the forward pass, read by the hooks during backward."""

    def __init__(self, max_plate_nesting, data_plate=None):
        self.max_plate_nesting = max_plate_nesting
        self.data_plate = data_plate
        self.weights = None

    def weighted_identity(self, site):
        fn = site["fn"]
        if not fn.has_rsample:
            raise UserError(f"iwae-dreg needs reparameterized guide sites, but {site['name']!r} "
                            f"({type(fn).__name__}) is not; use the iwae objective")
        value = site["value"]
        if not value.requires_grad:
            return value
        frame = plate_frame(site, self.data_plate) if self.data_plate else None
        if frame is None:  # the data plate of a program read without ModelInfo: the plate of the site
            frames = program_frames(site)
            if not frames:
                raise UserError(f"guide site {site['name']!r} is outside the data plate: iwae-dreg is a bound per "
                                f"data point; use --objective elbo")
            frame = frames[0]
        data_dim = frame.dim
        event_dim = fn.event_dim
        batch_dims = self.max_plate_nesting + 1

        def scale_gradient(grad):
            shape = [1] * batch_dims
            shape[0] = self.weights.shape[0]
            shape[batch_dims + data_dim] = self.weights.shape[1]
            return grad * self.weights.reshape(shape + [1] * event_dim)

        value = value.view_as(value)
        value.register_hook(scale_gradient)
        return value


class DReG_IWAE_ELBO(IWAE_ELBO):
    """The IWAE bound with doubly-reparameterized gradients (Tucker et al., 2019).

    Same loss value as :class:`~pyro_lvm.objectives.iwae.IWAE_ELBO`; lower-variance gradients for
    the guide. Requires reparameterized guide sites. Enumerated model sites are summed out.
    """

    name = "iwae-dreg"

    def differentiable_loss(self, model, guide, *args, **kwargs):
        max_plate_nesting = self._plate_nesting(model, guide, args, kwargs)
        gradient_weights = _GradientWeights(max_plate_nesting, self.data_plate)
        weights = compute_importance_weights(model, guide, args, kwargs, self.num_particles,
                                             max_plate_nesting,
                                             replay_transform=gradient_weights.weighted_identity,
                                             detach_guide_params=True, data_plate=self.data_plate,
                                             objective="--objective iwae-dreg")
        log_weights = weights.log_weights
        normalized = torch.softmax(log_weights.detach(), dim=0)
        gradient_weights.weights = normalized
        bound = self._log_mean_weight(log_weights)
        # Value: the bound; gradient: sum_k w~_k grad log w_k (the hook adds the second w~_k).
        surrogate = bound.detach() + (normalized * (log_weights - log_weights.detach())).sum(0)
        loss = -(weights.scale * surrogate).sum()
        warn_if_nan(loss, "loss")
        return loss
