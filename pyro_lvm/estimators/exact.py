"""Exact per-point log p(x): the model's own ``log_marginal``, or enumeration.

A model with a closed-form marginal (PPCA: x ~ N(b, W W^T + s^2 I)) says so by defining
``log_marginal(x)``. A model whose only latents are discrete sites it enumerates, with an empty
guide (a mixture), has log p(x) = log sum_c p(x, c), computed exactly by the same variable
elimination as the importance weights (:mod:`pyro_lvm.estimators.importance_weights`) with one
"particle" and a guide that samples nothing. Any other model has no exact log p(x) here.
"""

import pyro.poutine as poutine
import torch

from ..errors import UserError
from .importance_weights import compute_importance_weights, guess_max_plate_nesting

_OTHER_ESTIMATORS = "is, iwae, elbo or ais"


def _no_exact(lvm, why):
    return UserError(f"{type(lvm).__name__} has no exact log p(x) ({why}); use --estimator {_OTHER_ESTIMATORS}")


def exact_log_marginal(lvm, x, batch_size):
    """log p(x_n) for every point, exactly; returns ``(per_point [N], extras)``."""
    log_marginal = getattr(lvm, "log_marginal", None)
    if callable(log_marginal):
        per_point = torch.cat([log_marginal(xb).reshape(-1) for xb in x.split(batch_size)])
        return per_point, {"method": "log_marginal"}

    with poutine.block():
        guide_trace = poutine.trace(lvm.guide).get_trace(x[:1])
    guide_latents = [name for name, site in guide_trace.nodes.items()
                     if site["type"] == "sample" and not site["is_observed"]]
    if guide_latents:
        raise _no_exact(lvm, f"no log_marginal method, and the guide samples {', '.join(guide_latents)}")
    max_plate_nesting = guess_max_plate_nesting(lvm.model, lvm.guide, (x[:1],), {})
    pieces = []
    for xb in x.split(batch_size):
        try:
            weights = compute_importance_weights(lvm.model, lvm.guide, (xb,), {}, 1, max_plate_nesting)
        except UserError as err:
            raise _no_exact(lvm, f"no log_marginal method, and {err}") from None
        pieces.append(weights.log_weights[0])
    return torch.cat(pieces), {"method": "enumeration"}
