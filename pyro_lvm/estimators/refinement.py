"""``--target-mc-error EPS``: more particles for exactly the points whose estimate needs them.

A sampling estimator runs first with K particles (chains for AIS) for every point. Each point's
Monte Carlo standard error comes from its weights (:mod:`pyro_lvm.estimators.monte_carlo`); the
points whose error exceeds EPS (or is undefined, as with K = 1) get K more particles, doubling their
count, and their new weights are merged with the old ones (the statistics merge exactly, so the
result is the estimate from all 2K particles). That repeats, with the count doubling each round, for
the points still above EPS, until every point is at or below EPS or the next doubling would exceed
``max_samples`` (default :data:`DEFAULT_CAP_FACTOR` times K, i.e. six doublings); the points left
above EPS are counted. So hard points get many particles and easy ones only the first K.

The error is itself estimated from the weights, and stopping when it falls below EPS makes the
number of particles depend on them: for weights with a finite variance the effect on the estimate
is of smaller order than the error (a sequential stopping rule of the kind of Chow and Robbins,
1965), but with heavy-tailed weights (PSIS k-hat above 0.7) an error that looks small may not be.

Randomness. Round r >= 1 draws from its own seed, a hash of ``(seed, r)``; within a round a point's
new particles come from the batch it belongs to (its index in the split's batches, only its
selected points), so the result does not depend on how points are sharded over processes as long as
shards are whole batches (``--distributed``).
"""

import numpy as np
import torch

#: The default cap on particles per point is this many times the first round's count.
DEFAULT_CAP_FACTOR = 64


def round_seed(seed, round_index):
    """The seed of refinement round ``round_index`` (round 0 uses ``seed`` itself)."""
    if round_index == 0:
        return seed
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x6D63, round_index]).generate_state(1)[0])


class RefinementResult:
    """Per-point statistics after refinement, with how many particles each point took."""

    def __init__(self, stats, samples_per_point, rounds, khat, khat_samples, extras, above_target):
        self.stats = stats
        self.samples_per_point = samples_per_point
        self.rounds = rounds
        self.khat = khat
        self.khat_samples = khat_samples
        self.extras = extras
        self.above_target = above_target


def sample_with_target(sample, x, batch_size, num_samples, statistic, seed, target=None, max_samples=None,
                       cost=None, progress=None, batches=None):
    """Run ``sample`` on every point, then refine the points above ``target`` (see the module).

    :param sample: ``f(batches, num_samples, seed) -> (WeightStatistics, extras, khat or None,
        khat_samples or None)`` for ``batches = [(batch_index, xb), ...]``, the statistics in the
        order of the batches' points.
    :param statistic: ``log_mean_exp`` or ``mean_log``, whose error is compared with ``target``.
    :param target: EPS, or ``None`` for one round.
    :param max_samples: the cap on particles per point (default ``DEFAULT_CAP_FACTOR * num_samples``).
    :param cost: ``f(num_points, num_samples) -> units`` of progress for a round.
    :param batches: the ``[(batch_index, xb), ...]`` to sample (default: ``x`` split in ``batch_size``
        rows); the program's own batches where it has them (:meth:`pyro_lvm.protocol.Program.batches`).
    """
    cost = cost or (lambda points, k: points * k)
    batches = batches if batches is not None else list(enumerate(x.split(batch_size)))
    starts = np.cumsum([0] + [xb.shape[0] for _, xb in batches])
    if progress is not None:
        progress.add(cost(x.shape[0], num_samples))
    stats, extras, khat, khat_samples = sample(batches, num_samples, seed)
    num_points = x.shape[0]
    samples_per_point = torch.full((num_points,), num_samples, dtype=torch.int64)
    khat_samples = np.full(num_points, khat_samples if khat_samples is not None else 0)
    if target is None:
        return RefinementResult(stats, samples_per_point, 1, khat, khat_samples, [extras], None)

    cap = max_samples if max_samples is not None else DEFAULT_CAP_FACTOR * num_samples
    count, rounds, all_extras = num_samples, 1, [extras]

    def above_target():
        # The error as it is reported, in the model's dtype, decides; an undefined one (NaN) is above.
        return ~(stats.mc_stderr(statistic).to(stats.dtype) <= target).cpu()

    while True:
        above = above_target()
        if 2 * count > cap or not bool(above.any()):
            break
        selected, new_batches = [], []
        for (batch_index, xb), start in zip(batches, starts):
            local = above[start:start + xb.shape[0]].nonzero().flatten()
            if local.numel():
                selected.append(local + int(start))
                new_batches.append((batch_index, xb[local.to(xb.device)]))
        index = torch.cat(selected)
        if progress is not None:
            progress.add(cost(index.numel(), count), desc=f"evaluate (round {rounds + 1}, {index.numel()} points)")
        new_stats, new_extras, new_khat, new_khat_samples = sample(new_batches, count, round_seed(seed, rounds))
        device_index = index.to(stats.count.device)
        stats.update(device_index, stats.select(device_index).merge(new_stats))
        samples_per_point[index] += count
        if khat is not None and new_khat is not None:
            # k-hat describes the proposal's weights at this point; the latest round has the most.
            khat[index.numpy()] = new_khat
            khat_samples[index.numpy()] = new_khat_samples or 0
        all_extras.append(new_extras)
        count *= 2
        rounds += 1
    above = above_target()
    return RefinementResult(stats, samples_per_point, rounds, khat, khat_samples, all_extras, int(above.sum()))


__all__ = ["DEFAULT_CAP_FACTOR", "RefinementResult", "round_seed", "sample_with_target"]
