"""Per-point statistics of log importance weights, and the Monte Carlo error of the estimates.

Every sampling estimator of log p(x) here reduces, per data point, to K log weights
``l_k = log w_k`` (importance sampling: ``w_k = p(x, z_k) / q(z_k | x)``; AIS: the chains' weights)
and one of two statistics:

- ``log_mean_exp``: ``L = log (1/K) sum_k w_k`` (``is``, ``iwae``, ``ais``);
- ``mean_log``: ``E = (1/K) sum_k l_k`` (``elbo``).

:class:`WeightStatistics` keeps, per point, the sufficient statistics of both: the count K,
``logsumexp_k l_k``, ``logsumexp_k 2 l_k``, and the mean and sum of squared deviations of ``l_k``
(Welford; merged across chunks with the parallel update of Chan, Golub and LeVeque, 1979). Chunks of
particles, and later batches of particles for the same points (``--target-mc-error``), are merged
exactly, so an estimate never depends on how its particles were split.

**Monte Carlo standard error.** The estimator's own error for one point, apart from the spread over
points, from its K weights (the weights are i.i.d. given x):

- ``mean_log``: the standard error of a mean, ``se(E)^2 = s_l^2 / K`` with ``s_l^2`` the sample
  variance of the l_k.
- ``log_mean_exp``: by the delta method (first-order Taylor expansion of log around the mean weight
  ``mu = E[w]``), ``Var(L) ~= Var(w) / (K mu^2)``. Estimated with the sample variance of the weights
  and their mean, this is, in terms of the Kish effective sample size ``ESS = (sum w)^2 / sum w^2``,

      se(L)^2 = (K / ESS - 1) / (K - 1),

  computed from the two logsumexps without forming a weight. It is the relative standard error of
  the mean weight, and it is itself an estimate: when the weights are heavy-tailed (PSIS k-hat above
  0.7) the sample variance is unreliable and the error is understated, so read it with k-hat
  (Owen, 2013, "Monte Carlo theory, methods and examples", ch. 9; Vehtari et al., 2024, JMLR 25(72)).

  The error of ``L`` as an estimate of log p(x) also has a bias of about ``-Var(L) / 2`` (Jensen);
  at a standard error of 0.1 nats that is 0.005 nats, far below the error itself.

Both are undefined (NaN) for K = 1. For a mean over N points, independent given the model, the
standard error is ``sqrt(sum_n se_n^2) / N``.
"""

import math

import torch

STATISTICS = ("log_mean_exp", "mean_log")


class WeightStatistics:
    """Sufficient statistics of K_n log weights for each of n points (float64 tensors ``[n]``).

    ``dtype`` is the dtype of the log weights they came from: estimates are returned in it.
    """

    def __init__(self, count, lse, lse2, mean, m2, dtype):
        self.count, self.lse, self.lse2, self.mean, self.m2 = count, lse, lse2, mean, m2
        self.dtype = dtype

    @classmethod
    def from_log_weights(cls, log_weights):
        """From a ``[K, n]`` tensor of log weights (K particles or chains of n points)."""
        lw = log_weights.detach().double()
        num = lw.shape[0]
        count = torch.full(lw.shape[1:], float(num), dtype=torch.float64, device=lw.device)
        mean = lw.mean(0)
        m2 = (lw - mean).pow(2).sum(0) if num > 1 else torch.zeros_like(mean)
        return cls(count, lw.logsumexp(0), (2.0 * lw).logsumexp(0), mean, m2, log_weights.dtype)

    @classmethod
    def constant(cls, log_weight, num):
        """``num`` particles that all have the same log weight ``log_weight`` ``[n]``: what an
        estimator would see for a model whose latents are all summed out exactly."""
        lw = log_weight.detach().double()
        log_num = math.log(num)
        count = torch.full_like(lw, float(num))
        return cls(count, lw + log_num, 2.0 * lw + log_num, lw.clone(), torch.zeros_like(lw), log_weight.dtype)

    def merge(self, other):
        """Statistics of the union of both sets of weights, point by point (Chan et al. 1979)."""
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta.pow(2) * (self.count * other.count / count)
        # A zero weight (log w = -inf) makes the mean of the log weights -inf, whatever the others
        # are; the update above would give NaN there.
        finite = torch.isfinite(self.mean) & torch.isfinite(other.mean)
        mean = torch.where(finite, mean, self.mean + other.mean)
        return WeightStatistics(count, torch.logaddexp(self.lse, other.lse), torch.logaddexp(self.lse2, other.lse2),
                                mean, m2, torch.promote_types(self.dtype, other.dtype))

    @staticmethod
    def cat(parts):
        """Statistics of several groups of points, concatenated in order."""
        fields = ("count", "lse", "lse2", "mean", "m2")
        dtype = parts[0].dtype
        for part in parts[1:]:
            dtype = torch.promote_types(dtype, part.dtype)
        return WeightStatistics(*(torch.cat([getattr(p, f) for p in parts]) for f in fields), dtype)

    def select(self, index):
        """The statistics of the points ``index`` (a boolean mask or indices)."""
        return WeightStatistics(self.count[index], self.lse[index], self.lse2[index], self.mean[index],
                                self.m2[index], self.dtype)

    def update(self, index, other):
        """Replace the statistics of the points ``index`` (integer indices) by ``other``'s."""
        for field in ("count", "lse", "lse2", "mean", "m2"):
            getattr(self, field)[index] = getattr(other, field)
        self.dtype = torch.promote_types(self.dtype, other.dtype)

    def __len__(self):
        return self.count.shape[0]

    def estimate(self, statistic):
        """The per-point estimate, float64: ``log_mean_exp`` or ``mean_log`` of the weights."""
        if statistic == "log_mean_exp":
            return self.lse - self.count.log()
        if statistic == "mean_log":
            return self.mean.clone()
        raise ValueError(f"unknown statistic {statistic!r}; use one of {STATISTICS}")

    def effective_sample_size(self):
        """Kish's ESS ``(sum w)^2 / sum w^2`` per point, in [1, K] (NaN where every weight is 0)."""
        return torch.exp(2.0 * self.lse - self.lse2)

    def mc_variance(self, statistic):
        """The squared Monte Carlo standard error of :meth:`estimate`, per point (see the module)."""
        count = self.count
        if statistic == "log_mean_exp":
            relative = torch.exp(self.lse2 - 2.0 * self.lse + count.log())  # K sum w^2 / (sum w)^2 = K / ESS
            variance = (relative - 1.0) / (count - 1.0)
        elif statistic == "mean_log":
            variance = self.m2 / ((count - 1.0) * count)
        else:
            raise ValueError(f"unknown statistic {statistic!r}; use one of {STATISTICS}")
        # Equal log weights (m2 = 0: every latent enumerated, or a guide equal to the posterior) give
        # an exact estimate; the formula above would leave rounding there.
        variance = torch.where(self.m2 == 0, torch.zeros_like(variance), variance.clamp_min(0.0))
        return torch.where(count > 1, variance, torch.full_like(variance, math.nan))

    def mc_stderr(self, statistic):
        return self.mc_variance(statistic).sqrt()


def stderr_of_mean(per_point_variance):
    """The Monte Carlo standard error of the mean over points of independent per-point estimates."""
    variance = per_point_variance.double()
    return float(variance.sum().sqrt() / variance.numel())


__all__ = ["STATISTICS", "WeightStatistics", "stderr_of_mean"]
