"""Remedies for posterior collapse: KL warm-up and free bits, as a Pyro ``ELBO``.

For a model p(z) p(x|z) and guide q(z|x), with N data points,

    ELBO = sum_n E_q[log p(x_n | z)] - sum_n KL(q(z|x_n) || p(z)).

:class:`RegularizedELBO` trains with the surrogate

    L_beta,lambda = sum_n E_q[log p(x_n | z)] - beta(step) * sum_sites R_site,

- **KL warm-up** (deterministic annealing; Bowman et al. 2016, Sonderby et al. 2016):
  ``beta(step) = start + (1 - start) * min(1, step / kl_warmup)``, rising linearly from ``start``
  (default 0) to 1 over ``kl_warmup`` optimizer steps, then 1 for good. ``set_step(global_step)``
  (called by the training loop before every step) sets it, so the schedule depends only on the
  global step and a resumed run continues it exactly.
- **free bits** (Kingma et al. 2016, "Improved variational inference with inverse autoregressive
  flow", eq. 15): for every local latent site whose guide and prior factorise over dimensions,
  ``R_site = N * sum_d max(lambda, mean_batch KL_d)``, with ``KL_d`` the analytic per-dimension
  KL(q(z_d|x) || p(z_d)) averaged over the minibatch. A dimension whose average KL is below
  ``lambda`` nats gets no gradient from the KL term, so the optimizer is free to spend up to
  ``lambda`` nats per dimension on encoding x. It needs a closed-form per-dimension KL
  (``Normal`` against ``Normal``, anything in torch's KL registry between univariate factors);
  other models are refused with a :class:`~pyro_lvm.errors.UserError`.

Without free bits ``R_site`` is the base objective's KL term: ``elbo`` uses the Monte Carlo
estimate ``log q(z) - log p(z)`` at the guide's sample (Pyro's ``Trace_ELBO``), ``meanfield`` the
analytic KL where torch has one (Pyro's ``TraceMeanField_ELBO``). With free bits the KL of the
sites it covers is analytic for both bases.

**What each method returns** (so that every number the toolkit reports stays a bound):

- ``loss(model, guide, x)``: the true negative ELBO (beta = 1, no free bits) of the base
  objective, a float. The training loop's validation bound uses it.
- ``differentiable_loss(model, guide, x)``: a tensor whose *value* is the true negative ELBO and
  whose *gradient* is that of the regularized surrogate (``s + (t - s).detach()``), so the
  ``train_elbo`` the training loop records is the ELBO even during the warm-up.
- ``surrogate_loss(model, guide, x)``: the regularized surrogate -L_beta,lambda itself, value and
  gradient.
- ``loss_and_grads``: back-propagates the surrogate, returns the true loss (for ``pyro.infer.SVI``).

Enumerated discrete sites and non-reparameterized guide sites are refused: the surrogate here has
no score-function term. The importance-weighted objectives have no separate KL term to anneal
and are refused by :func:`pyro_lvm.objectives.get_objective`.
"""

import math

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from ..errors import UserError
from ..protocol.plates import program_frames



def kl_weight(step, kl_warmup, start=0.0):
    """beta at optimizer step ``step`` (0-based): ``start`` at step 0, 1 from step ``kl_warmup`` on."""
    if kl_warmup <= 0:
        return 1.0
    return float(start + (1.0 - start) * min(1.0, max(0, step) / kl_warmup))


def check_remedies(kl_warmup=0, free_bits=0.0, kl_warmup_start=0.0):
    """Validated ``(kl_warmup, free_bits, kl_warmup_start)``; :class:`UserError` naming the flag otherwise."""
    if kl_warmup is None:
        kl_warmup = 0
    if free_bits is None:
        free_bits = 0.0
    if kl_warmup_start is None:
        kl_warmup_start = 0.0
    if isinstance(kl_warmup, bool) or not isinstance(kl_warmup, int) or kl_warmup < 0:
        raise UserError(f"--kl-warmup must be an integer number of steps >= 0 (0: off), got {kl_warmup!r}")
    if (isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)) or not math.isfinite(free_bits)
            or free_bits < 0):
        raise UserError(f"--free-bits must be a finite number of nats per latent dimension >= 0 (0: off), "
                        f"got {free_bits!r}")
    if (isinstance(kl_warmup_start, bool) or not isinstance(kl_warmup_start, (int, float))
            or not math.isfinite(kl_warmup_start) or not 0 <= kl_warmup_start <= 1):
        raise UserError(f"--kl-warmup-start must be a number in [0, 1], got {kl_warmup_start!r}")
    return int(kl_warmup), float(free_bits), float(kl_warmup_start)


def _unwrap(fn):
    from ..diagnostics.traces import unwrap_factors

    return unwrap_factors(fn)


def _sum_scaled(value, scale, mask=None):
    if mask is not None and mask is not True:
        value = value * mask
    return (value * scale).sum() if torch.is_tensor(value) else value * scale


class RegularizedELBO(Trace_ELBO):
    """The ELBO with KL warm-up and/or free bits; see the module docstring.

    :param base: ``elbo`` (Monte Carlo KL) or ``meanfield`` (analytic KL where registered).
    :param kl_warmup: steps over which beta rises linearly to 1 (0: beta = 1 throughout).
    :param kl_warmup_start: beta at step 0.
    :param free_bits: lambda, nats per latent dimension (0: off).
    """

    def __init__(self, base="elbo", num_particles=1, kl_warmup=0, kl_warmup_start=0.0, free_bits=0.0,
                 max_plate_nesting=float("inf"), **kwargs):
        if base not in ("elbo", "meanfield"):
            raise UserError(f"KL warm-up and free bits apply to --objective elbo or meanfield, not {base!r}")
        super().__init__(num_particles=num_particles, vectorize_particles=True,
                         max_plate_nesting=max_plate_nesting, **kwargs)
        self.base = base
        self.kl_warmup = int(kl_warmup)
        self.kl_warmup_start = float(kl_warmup_start)
        self.free_bits = float(free_bits)
        self.step = 0
        self.beta = kl_weight(0, self.kl_warmup, self.kl_warmup_start)

    def set_step(self, step):
        """Follow the training loop's global step (the warm-up schedule depends on it only)."""
        self.step = int(step)
        self.beta = kl_weight(self.step, self.kl_warmup, self.kl_warmup_start)

    # -- the terms ---------------------------------------------------------------------------

    def _check(self, model_trace, guide_trace):
        for trace, where in ((model_trace, "model"), (guide_trace, "guide")):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                if site["infer"].get("enumerate"):
                    raise UserError(f"KL warm-up and free bits do not support enumerated sites ({where} site "
                                    f"{name!r}); fit this model without --kl-warmup/--free-bits")
                if where == "guide" and not site["is_observed"] and not site["fn"].has_rsample:
                    raise UserError(f"KL warm-up and free bits need reparameterized guide sites; guide site "
                                    f"{name!r} ({type(site['fn']).__name__}) is not")

    def _free_bits_kl(self, name, q_site, p_site):
        """N-scaled sum_d max(lambda, mean_batch KL_d) for one site, and the plain N-scaled KL."""
        frames = [f.name for f in program_frames(q_site)]
        if len(frames) != 1:
            raise UserError(f"--free-bits applies to local latent sites whose only plate is the data plate; "
                            f"site {name!r} sits in plates {frames or 'none (a global latent)'}")
        q, p, value = q_site["fn"], p_site["fn"], q_site["value"]
        q_factor, p_factor = _unwrap(q), _unwrap(p)
        if q_factor.event_shape != () or p_factor.event_shape != ():
            raise UserError(f"--free-bits needs a guide and prior that factorise over dimensions; site {name!r} "
                            f"has q = {type(q_factor).__name__}, p = {type(p_factor).__name__}")
        try:
            terms = kl_divergence(q_factor, p_factor)
        except NotImplementedError:
            raise UserError(f"--free-bits needs the analytic KL per dimension, and torch has none for "
                            f"{type(q_factor).__name__} against {type(p_factor).__name__} (site {name!r})") from None
        event_dims = len(q.event_shape)
        batch_shape = value.shape[:value.dim() - event_dims]
        per_dim = terms.expand(value.shape).reshape(*batch_shape, -1)  # [..., n, D]
        scale = q_site["scale"]
        if q_site["mask"] is not None and q_site["mask"] is not True:
            raise UserError(f"--free-bits does not support masked site {name!r}")
        weight = (torch.as_tensor(scale, dtype=per_dim.dtype, device=per_dim.device)
                  .expand(batch_shape).sum() / self.num_particles)  # N for one minibatch under DataPlateScale
        mean_kl = per_dim.reshape(-1, per_dim.shape[-1]).mean(0)  # KL_d averaged over the minibatch
        clamped = weight * torch.clamp(mean_kl, min=self.free_bits).sum()
        return clamped, weight * mean_kl.sum()

    def _terms(self, model, guide, args, kwargs):
        """(log-likelihood, true latent term, regularized latent term), N-scaled, particle-averaged.

        The latent terms are E_q[log p(z) - log q(z)] (minus the KL): the ELBO is loglik + latent.
        """
        loglik, latent, regularized = 0.0, 0.0, 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            self._check(model_trace, guide_trace)
            for name, site in model_trace.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                if site["is_observed"]:
                    loglik = loglik + site["log_prob_sum"]
                    continue
                if name not in guide_trace.nodes:
                    raise UserError(f"model latent {name!r} has no guide site; KL warm-up and free bits need one")
                q_site = guide_trace.nodes[name]
                true_term = None
                if self.base == "meanfield":
                    try:
                        kl = kl_divergence(q_site["fn"], site["fn"])
                        true_term = -_sum_scaled(kl, q_site["scale"], q_site["mask"])
                    except NotImplementedError:
                        pass
                if true_term is None:
                    true_term = site["log_prob_sum"] - q_site["log_prob_sum"]
                if self.free_bits > 0:
                    clamped, analytic = self._free_bits_kl(name, q_site, site)
                    reg_term = -clamped
                else:
                    reg_term = true_term
                latent = latent + true_term
                regularized = regularized + reg_term
            # guide sites the model does not have (auxiliary variables), as Trace_ELBO counts them
            for name, q_site in guide_trace.nodes.items():
                if (q_site["type"] == "sample" and not site_is_subsample(q_site) and not q_site["is_observed"]
                        and name not in model_trace.nodes):
                    latent = latent - q_site["log_prob_sum"]
                    regularized = regularized - q_site["log_prob_sum"]
        k = self.num_particles
        return loglik / k, latent / k, regularized / k

    # -- the ELBO interface --------------------------------------------------------------------

    def surrogate_loss(self, model, guide, *args, **kwargs):
        """-(E log p(x|z) + beta * regularized latent term): the loss whose gradient trains."""
        loglik, _, regularized = self._terms(model, guide, args, kwargs)
        return -(loglik + self.beta * regularized)

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """Value: the true negative ELBO. Gradient: the regularized surrogate's."""
        loglik, latent, regularized = self._terms(model, guide, args, kwargs)
        surrogate = -(loglik + self.beta * regularized)
        true = -(loglik + latent)
        if not torch.is_tensor(surrogate):
            return torch.as_tensor(true)
        return surrogate + (torch.as_tensor(true) - surrogate).detach()

    def loss(self, model, guide, *args, **kwargs):
        """The true negative ELBO of the base objective (beta = 1, no free bits), a float."""
        with torch.no_grad():
            loglik, latent, _ = self._terms(model, guide, args, kwargs)
        return float(torch_item(-(loglik + latent)))

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)

    def check_model(self, model, guide, *args, **kwargs):
        """Raise :class:`UserError` now if the remedies do not apply to this model (one trace)."""
        with torch.no_grad():
            self._terms(model, guide, args, kwargs)


__all__ = ["RegularizedELBO", "check_remedies", "kl_weight"]
