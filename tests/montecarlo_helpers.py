"""Checks that an estimator's reported Monte Carlo standard error is the spread of its estimates."""
import math

import torch


def assert_reported_error_matches_spread(estimates, errors, mean_errors, num_se=4.0, max_relative_se=0.12):
    """Estimates ``[S, N]`` of N points under S seeds, with their reported per-point errors ``[S, N]``
    and the reported errors of the mean over points ``[S]``.

    Per point, the variance of the estimate over seeds is compared with the reported variance
    (averaged over seeds), pooled over points: the ratio ``sum_n var_n / sum_n sigma_n^2`` must be 1
    within ``num_se`` of its own standard error, which comes from the sampling error of the S-seed
    variances (their fourth moments) and of the averaged reported variances. The same for the mean
    over points, whose sampling error is that of one variance from S values.
    """
    estimates, errors, mean_errors = estimates.double(), errors.double(), mean_errors.double()
    num_seeds = estimates.shape[0]
    spread = estimates.var(0)                                   # [N], over seeds
    reported = errors.pow(2).mean(0)                            # [N], averaged over seeds
    centered = estimates - estimates.mean(0)
    fourth = centered.pow(4).mean(0)
    var_of_spread = ((fourth - spread.pow(2) * (num_seeds - 3) / (num_seeds - 1)) / num_seeds).clamp_min(0.0)
    se_spread = var_of_spread.sum().sqrt() / spread.sum()
    se_reported = errors.pow(2).sum(1).std() / math.sqrt(num_seeds) / reported.sum()
    ratio = float(spread.sum() / reported.sum())
    se_ratio = ratio * math.hypot(float(se_spread), float(se_reported))
    assert se_ratio < max_relative_se, f"too few seeds or points to tell: standard error of the ratio {se_ratio:.3f}"
    assert abs(ratio - 1.0) < num_se * se_ratio, (
        f"spread over seeds / reported variance = {ratio:.3f} +- {se_ratio:.3f} (pooled over points)")

    mean_spread = float(estimates.mean(1).var())
    mean_reported = float(mean_errors.pow(2).mean())
    mean_ratio = mean_spread / mean_reported
    mean_se = mean_ratio * math.sqrt(2.0 / (num_seeds - 1))
    assert abs(mean_ratio - 1.0) < num_se * mean_se, (
        f"mean over points: spread over seeds / reported variance = {mean_ratio:.3f} +- {mean_se:.3f}")
    return ratio, se_ratio


def over_seeds(estimate, seeds):
    """``(per_point [S, N], per_point_mc_stderr [S, N], mc_stderr [S])`` of ``estimate(seed)``."""
    results = [estimate(seed) for seed in seeds]
    return (torch.stack([r.per_point for r in results]), torch.stack([r.per_point_mc_stderr for r in results]),
            torch.tensor([r.mc_stderr for r in results]))
