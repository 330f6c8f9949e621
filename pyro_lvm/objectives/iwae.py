"""The importance-weighted autoencoder bound (IWAE).

For each data point, with K particles z_1..z_K ~ q(z | x) and weights w_k = p(x, z_k) / q(z_k | x),

    L_K(x) = E[ log (1/K) sum_k w_k ]  <=  log p(x),

which equals the ELBO at K = 1, grows with K and tends to log p(x) (Burda, Grosse and Salakhutdinov,
2015, "Importance Weighted Autoencoders", arXiv:1509.00519). The bound of a data set is the sum of
the per-point bounds.

Subsampling. When the data plate is subsampled (B of N points, site scale N/B), the unbiased
estimate of the full-data bound sum_n L_K(x_n) is (N/B) sum_{n in batch} L_K(x_n): the scale is
applied *outside* the per-point logsumexp. Pyro's ``RenyiELBO(alpha=0)`` sums scaled log weights over
the batch first and takes the logsumexp of that sum, which is the K-sample bound of a different
model (one in which the batch's points share their latents) and is biased for the full-data bound.

Gradients. With reparameterized guide sites the gradient is sum_k w~_k grad log w_k, with normalized
weights w~_k = w_k / sum_j w_j. Guide sites that are not reparameterized get the score-function term
L grad sum_k log q(z_k | x) (no baseline, so it is noisy; VIMCO would reduce its variance). Discrete
sites enumerated in the model are summed out exactly inside log w_k.
"""

import math

import torch
from pyro.infer import ELBO
from pyro.util import warn_if_nan

from ..estimators.importance_weights import (compute_importance_weights, guess_max_plate_nesting, trace_guide,
                                             trace_model)


class IWAE_ELBO(ELBO):
    """The K-particle importance-weighted bound, particles vectorized, per-point scale outside the logsumexp.

    Usable with :class:`pyro.infer.SVI` (``loss``, ``loss_and_grads``), directly
    (``differentiable_loss``) and as a module (``IWAE_ELBO(K)(model_module, guide_module)``).

    :param int num_particles: K, the number of importance samples per data point.
    :param int max_plate_nesting: the number of plates of the program (guessed from a trace if omitted).
    :param str data_plate: the data plate's name (found from the model trace if omitted).
    :param bool vectorize: False runs the particles one at a time, for a program that does not
        broadcast over a particle dimension.
    """

    name = "iwae"

    def __init__(self, num_particles=1, max_plate_nesting=float("inf"), retain_graph=None, data_plate=None,
                 vectorize=True):
        # Particles are always vectorized here (our own plate), so the base class must not shift
        # max_plate_nesting for its own particle plate.
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=False, strict_enumeration_warning=False,
                         retain_graph=retain_graph)
        self.data_plate = data_plate
        self.vectorize = vectorize

    def _plate_nesting(self, model, guide, args, kwargs):
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        return self.max_plate_nesting

    def _get_trace(self, model, guide, args, kwargs):
        """One (model trace, guide trace) pair with all particles vectorized, for introspection."""
        max_plate_nesting = self._plate_nesting(model, guide, args, kwargs)
        guide_run = trace_guide(guide, args, kwargs, self.num_particles, max_plate_nesting)
        model_trace = trace_model(model, guide_run.trace, args, kwargs, self.num_particles, max_plate_nesting,
                                  guide_run.enum_state)
        return model_trace, guide_run.trace

    def _importance_weights(self, model, guide, args, kwargs):
        return compute_importance_weights(model, guide, args, kwargs, self.num_particles,
                                          self._plate_nesting(model, guide, args, kwargs), data_plate=self.data_plate,
                                          objective=f"--objective {self.name}", vectorize=self.vectorize)

    def _log_mean_weight(self, log_weights):
        return torch.logsumexp(log_weights, dim=0) - math.log(self.num_particles)

    def _surrogate_bound(self, weights):
        """Per-point bound [n] whose value is L_K and whose gradient is the IWAE gradient."""
        bound = self._log_mean_weight(weights.log_weights)
        if weights.score_log_q is not None:
            score = weights.score_log_q.sum(0)
            bound = bound + bound.detach() * (score - score.detach())
        return bound

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """-(scale * sum_n L_K(x_n)), differentiable; the scale is N/B under subsampling."""
        weights = self._importance_weights(model, guide, args, kwargs)
        loss = -(weights.scale * self._surrogate_bound(weights)).sum()
        warn_if_nan(loss, "loss")
        return loss

    def loss(self, model, guide, *args, **kwargs):
        """The negative bound as a float, without gradients."""
        with torch.no_grad():
            weights = self._importance_weights(model, guide, args, kwargs)
            loss = -(weights.scale * self._log_mean_weight(weights.log_weights)).sum().item()
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs):
        """The negative bound as a float; accumulates its gradient in the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return loss.item()
