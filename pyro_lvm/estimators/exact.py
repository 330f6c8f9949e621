"""Exact per-point log p(x): the model's own ``log_marginal``, or enumeration.

A model with a closed-form marginal (PPCA: x ~ N(b, W W^T + s^2 I)) says so by defining
``log_marginal(x)``. A model whose local latents are all discrete and enumerated (in the model or in
the guide; a mixture, an HMM with ``pyro.markov``) has log p(x) = log sum_c p(x, c), computed
exactly by the variable elimination of :mod:`pyro_lvm.estimators.importance_weights` with one
"particle" and no particle plate. Global latents are allowed when the guide gives them a point mass
(``AutoDelta``, MAP): the result is then log p(x_n | theta_MAP), exactly. Any other model has no
exact log p(x) here.
"""

import torch

from ..errors import UserError
from .importance_weights import compute_importance_weights, ensure_info

_OTHER_ESTIMATORS = "is, iwae, elbo or ais"


def _no_exact(program, why):
    return UserError(f"{program.program_name} has no exact log p(x) ({why}); use --estimator {_OTHER_ESTIMATORS}")


def exact_log_marginal(lvm, x, batch_size):
    """log p(x_n) for every point, exactly; returns ``(per_point [N], extras)``."""
    from ..protocol import as_program

    program = as_program(lvm)
    info = ensure_info(program, x)
    log_marginal = getattr(program, "log_marginal", None)
    if callable(log_marginal):
        per_point = torch.cat([log_marginal(xb).reshape(-1) for xb in x.split(batch_size)])
        return per_point, {"method": "log_marginal"}

    random = [s.name for s in info.guide_latents if not s.enumerated and not s.point_mass] + list(info.guide_only_sites)
    if random:
        raise _no_exact(program, f"no log_marginal method, and the guide samples {', '.join(random)}")
    pieces = []
    for batch, valid in program.batches(x, batch_size):
        try:
            weights = compute_importance_weights(program.model, program.guide, (batch,), {}, 1, info.max_plate_nesting,
                                                 data_plate=info.data_plate.name, allow_global=True, vectorize=False)
        except UserError as err:
            raise _no_exact(program, f"no log_marginal method, and {err}") from None
        pieces.append(weights.log_weights[0][:valid])
    return torch.cat(pieces), {"method": "enumeration"}
