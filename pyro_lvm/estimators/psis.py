"""The Pareto k-hat of importance weights (PSIS, Vehtari et al. 2024), computed by arviz-stats.

Pareto-smoothed importance sampling fits a generalized Pareto distribution to the M largest of the
S weights w_s = p(x, z_s) / q(z_s | x) of one data point; its shape k-hat says how heavy the tail is,
and so whether an importance-sampling estimate of log p(x) can be trusted whatever its standard
error says: below 0.5 good, up to 0.7 usable, above 0.7 unreliable (Vehtari, Simpson, Gelman, Yao
and Gabry, 2024, "Pareto smoothed importance sampling", JMLR 25(72)).

The fit is arviz's: the array interface of ``arviz-stats``, the statistics package that arviz 1.x
is made of and that installs on every Python pyro-lvm supports (arviz 1.x itself has no top-level
``psislw`` any more). Its ``psislw`` is written for leave-one-out cross-validation and takes log
*likelihoods*, the negatives of the log weights, so it is called with ``-log w``.

Against arviz 0.x's ``arviz.psislw`` on the same weights (``tests/test_psis.py``): equal to rounding
for S <= 225; above, arviz 0.x fits the ceil(3 sqrt S) largest weights and arviz-stats floor(3 sqrt S)
(94 instead of 95 at S = 1000, as in the loo and posterior R packages), and the two k-hat differ by
that one draw's effect on the fit: a mean absolute difference of 0.004-0.03 on Gaussian log weights,
measured at S = 226 to 5000. The value is the same on every Python and arviz-stats release >= 0.6.
"""

import warnings

import numpy as np

from ..errors import UserError

#: Fewer weights than this leave fewer than 5 in the tail, too few to fit: k-hat is undefined (NaN).
MIN_WEIGHTS = 25


def _psislw():
    try:
        from arviz_stats.base import array_stats
    except ImportError:
        raise UserError("the Pareto k-hat needs arviz-stats, which is missing: pip install 'arviz-stats>=0.6' "
                        "(or reinstall pyro-lvm with its dependencies)") from None
    return array_stats.psislw


def pareto_khat(log_weights):
    """PSIS k-hat per point from log weights [S, b] (a CPU tensor or array); NaN where undefined.

    Undefined: fewer than :data:`MIN_WEIGHTS` weights, a weight that is NaN or infinite (a zero
    weight, log w = -inf, is fine), or a tail whose weights are all equal (a guide that is the exact
    posterior gives equal weights).
    """
    weights = np.asarray(log_weights, dtype=np.float64)
    num_weights, num_points = weights.shape
    khat = np.full(num_points, np.nan)
    if num_weights < MIN_WEIGHTS:
        return khat
    psislw = _psislw()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warnings about high k-hat: the values are reported instead
        # One point at a time: a point whose fit is undefined ("All tail values are the same")
        # raises, and must not take the others with it. arviz loops over points in Python anyway.
        for point in range(num_points):
            column = weights[:, point]
            if np.isnan(column).any() or np.isposinf(column).any():
                continue
            try:
                _, value = psislw(-column, r_eff=1.0, axis=-1)
            except (ValueError, FloatingPointError, ZeroDivisionError):
                continue
            khat[point] = float(value)
    khat[~np.isfinite(khat)] = np.nan
    return khat
