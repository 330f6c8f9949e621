"""Importance sampling of log p(x) with many particles, streamed in memory-bounded chunks.

With the guide as proposal, K particles z_k ~ q(z | x) and weights w_k = p(x, z_k) / q(z_k | x),

    log p^(x) = log (1/K) sum_k w_k

is a consistent estimate of log p(x) whose expectation is the K-sample IWAE bound (so it is biased
low, by less as K grows and as q approaches the posterior). The same weights give the ELBO,
(1/K) sum_k log w_k, and two diagnostics of the proposal:

- the effective sample size ESS = (sum_k w_k)^2 / sum_k w_k^2, per point, in [1, K];
- the Pareto k-hat of the weights' upper tail (PSIS, Vehtari et al. 2024, JMLR 25(72)): above 0.7
  the estimate is unreliable, whatever its standard error says.

Streaming. K can be far larger than fits in memory at once (K = 5000 over a batch of MNIST digits
is 5000 x batch x 784 decoder outputs). Particles are processed in chunks; each chunk's weights are
folded into per-point :class:`~pyro_lvm.estimators.monte_carlo.WeightStatistics` (logsumexps of
log w and 2 log w, mean and squared deviations of log w: the estimate, the ESS and the Monte Carlo
standard error all come from them), so no [K, batch] tensor of model outputs is ever alive. The
chunk size comes from ``max_memory_mb`` and the bytes one particle needs for one data point,
measured on the first chunk (CUDA: the allocator's peak; CPU: the trace's tensors, times 3 for
activations the trace does not hold); on the CPU it is also capped at :data:`CPU_CHUNK_BYTES` so
that a chunk's tensors stay in cache, and it is aligned to the seed blocks
below. If a chunk still runs out of memory it is halved and retried. Distribution validation runs on
the first chunk of each batch only.

Randomness does not depend on the chunking. Particles are drawn in fixed blocks of
:data:`PARTICLES_PER_SEED`, each block from ``torch.manual_seed(f(seed, batch index, block index))``
(inside ``torch.random.fork_rng``, so the caller's RNG stream is untouched); the guide runs once per
block, and a chunk of the model pass takes any slice of the blocks' values. So a tiny memory budget,
or an out-of-memory retry, gives the same estimate point for point; changing ``batch_size`` changes
the draws (different blocks), not their distribution.

k-hat needs the weights themselves: per batch the first ``M`` log weights of each point are kept
(the particles are i.i.d., so they are a random subset), with ``M = K`` when [K, batch] float32 fits
in a quarter of the budget, else as many as fit (at least 1). k-hat is then computed by
:func:`pyro_lvm.estimators.psis.pareto_khat` (arviz-stats) on the kept weights; with fewer than 25
weights per point it is undefined and reported as ``None``.

A guide that draws nothing (every latent of the model enumerated) makes every particle's weight the
same, the exact log p(x): one particle is computed instead of K (:func:`enumerated_statistics`).
"""

import contextlib
import math
from typing import NamedTuple, Optional

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from ..errors import UserError
from .importance_weights import (GuideTerms, combine, compute_importance_weights, guide_log_density,
                                 model_log_density, trace_guide, trace_model)
from .monte_carlo import WeightStatistics
from .psis import pareto_khat

#: Particles drawn per seeded guide pass. Part of what a ``seed`` means: changing it changes draws.
PARTICLES_PER_SEED = 128

# CPU memory estimates come from the tensors in the trace; the network's hidden activations are not
# there, so the estimate is multiplied by this factor.
_CPU_ACTIVATION_FACTOR = 3.0

#: On the CPU a chunk is also capped at this many (estimated) bytes, whatever ``max_memory_mb`` allows.
#: The elementwise work of a model pass (activations, log densities, their sums) is bound by memory
#: traffic: a chunk whose tensors stay in the last-level cache ran about 2x faster than chunks of
#: hundreds of MB (784-200-200-50 MNIST VAE, 1 thread), while the matrix products gain nothing from
#: more rows. Much smaller chunks (a few MB) lose again with 2 threads on a loaded machine, where
#: every small parallel op waits for a preempted thread; 64 MiB (about 64 particles x 100 MNIST
#: points) was the best of 8-128 MiB there.
CPU_CHUNK_BYTES = 64 * 2 ** 20


def block_seed(seed, batch_index, block_index):
    """The torch seed of one block of particles: a hash of (seed, batch, block)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, batch_index, block_index]).generate_state(2)
    return int(state[0]) << 32 | int(state[1]) >> 1


def is_out_of_memory(err):
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(err, oom_type)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def _particle_axis(site, max_plate_nesting):
    return site["value"].dim() - site["fn"].event_dim - (max_plate_nesting + 1)


class ChunkTerms(NamedTuple):
    """The guide's terms for a chunk of particles (:class:`~.importance_weights.GuideTerms`, narrowed),
    the enumeration allocator as the guide left it, and the chunk's ``shape`` ``(k, b)``."""

    terms: GuideTerms
    enum_state: Optional[tuple]
    shape: tuple


def _narrow(tensor, axis, lo, size):
    if not torch.is_tensor(tensor) or tensor.dim() <= axis or tensor.shape[axis] == 1:
        return tensor  # does not depend on the particle (an enumerated value, a constant)
    return tensor.narrow(axis, lo, size)


def _narrow_terms(terms, lo, size):
    def cut(t):
        if not torch.is_tensor(t) or t.dim() < 2:
            return t
        t = _narrow(t, t.dim() - 2, lo, size)
        return t.expand(t.shape[:-2] + (size, t.shape[-1]))  # the chunk's particles, even where none differ

    return terms._replace(log_q=cut(terms.log_q), log_q_enumerated=cut(terms.log_q_enumerated),
                          score_log_q=cut(terms.score_log_q))


def _cat_terms(parts):
    def cat(ts):
        if not all(torch.is_tensor(t) and t.dim() >= 2 for t in ts):
            return ts[0]
        return torch.cat([t.expand(t.shape[:-2] + (t.shape[-2], max(u.shape[-1] for u in ts))) for t in ts], dim=-2)

    first = parts[0]
    return first._replace(log_q=cat([p.log_q for p in parts]),
                          log_q_enumerated=None if first.log_q_enumerated is None else cat([p.log_q_enumerated for p in parts]),
                          score_log_q=None if first.score_log_q is None else cat([p.score_log_q for p in parts]))


class _GuideBlocks:
    """Guide draws for one batch, block by block, each block from its own seed.

    ``take(start, stop)`` returns the replay trace and the guide's terms (:class:`ChunkTerms`) of
    particles ``start..stop-1``, running (and caching) the guide on the blocks that hold them.
    """

    def __init__(self, guide, x, num_particles, max_plate_nesting, seed, batch_index, device, data_plate=None):
        self.guide = guide
        self.x = x
        self.num_particles = num_particles
        self.max_plate_nesting = max_plate_nesting
        self.seed = seed
        self.batch_index = batch_index
        self.device = device
        self.data_plate = data_plate
        self.blocks = {}

    def _block(self, index):
        if index not in self.blocks:
            size = min(PARTICLES_PER_SEED, self.num_particles - index * PARTICLES_PER_SEED)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(block_seed(self.seed, self.batch_index, index))
                guide_run = trace_guide(self.guide, (self.x,), {}, size, self.max_plate_nesting)
            guide_trace = guide_run.trace
            terms = guide_log_density(guide_trace, self.max_plate_nesting, size, data_plate=self.data_plate,
                                      allow_global=True)
            sites = {name: (site["value"], _particle_axis(site, self.max_plate_nesting), site["infer"])
                     for name, site in guide_trace.nodes.items()
                     if site["type"] == "sample" and not site["is_observed"]}
            self.blocks[index] = (sites, terms, guide_run.enum_state)
        return self.blocks[index]

    def take(self, start, stop):
        first, last = start // PARTICLES_PER_SEED, (stop - 1) // PARTICLES_PER_SEED
        for index in [i for i in self.blocks if i < first]:  # chunks go forward: free used blocks
            del self.blocks[index]
        pieces = []
        for index in range(first, last + 1):
            lo = max(start - index * PARTICLES_PER_SEED, 0)
            hi = min(stop - index * PARTICLES_PER_SEED, PARTICLES_PER_SEED)
            pieces.append((self._block(index), lo, hi))
        replay = poutine.Trace()
        for name, (_, axis, infer) in pieces[0][0][0].items():
            parts = [_narrow(sites[name][0], axis, lo, hi - lo) for (sites, _, _), lo, hi in pieces]
            if len(parts) == 1 or all(part.shape[axis] == 1 for part in parts):
                value = parts[0]  # one block: a view; or a value that does not depend on the particle
            else:
                value = torch.cat([part.expand(part.shape[:axis] + (hi - lo,) + part.shape[axis + 1:])
                                   for part, (_, lo, hi) in zip(parts, pieces)], dim=axis)
            replay.add_node(name, type="sample", name=name, value=value, is_observed=False, infer=infer)
        terms = _cat_terms([_narrow_terms(terms, lo, hi - lo) for (_, terms, _), lo, hi in pieces])
        return replay, ChunkTerms(terms, pieces[0][0][2], (stop - start, self.x.shape[0] if torch.is_tensor(self.x) else len(self.x)))


def chunk_particles(budget, bytes_per_particle_point, batch, num_samples, device):
    """Particles per chunk: what fits in ``budget`` (and, on the CPU, in :data:`CPU_CHUNK_BYTES`).

    Below ``num_samples`` the size is aligned to the seed blocks (a power of two below
    :data:`PARTICLES_PER_SEED`, a multiple of it above), so that a chunk never straddles two blocks
    and its guide values are views, not copies. The chunk size never changes the estimate.
    """
    limit = budget if device.type == "cuda" else min(budget, CPU_CHUNK_BYTES)
    chunk = max(1, int(limit // (bytes_per_particle_point * batch)))
    if chunk >= num_samples:
        return num_samples
    if chunk >= PARTICLES_PER_SEED:
        return chunk - chunk % PARTICLES_PER_SEED
    return 1 << (chunk.bit_length() - 1)


def _trace_bytes(model_trace):
    """Bytes held by the tensors of a model trace (values, distribution parameters, log densities)."""
    seen, total = set(), 0

    def count(t):
        nonlocal total
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for site in model_trace.nodes.values():
        if site["type"] != "sample":
            continue
        count(site["value"])
        fn = site["fn"]
        while fn is not None:
            for v in vars(fn).values():
                count(v)
            fn = getattr(fn, "base_dist", None)
    return total


def model_chunk_log_weights(model, x, replay, log_q, max_plate_nesting, guide_names, data_plate=None):
    """``((log w, elbo) [k, b], model trace)`` for one chunk of particles: replay the model on the
    chunk's guide values (``log_q``: the chunk's :class:`ChunkTerms`)."""
    num_particles, num_points = log_q.shape
    model_trace = trace_model(model, replay, (x,), {}, num_particles, max_plate_nesting, log_q.enum_state)
    log_p, _, _ = model_log_density(model_trace, guide_names, max_plate_nesting, num_particles, data_plate=data_plate,
                                    allow_global=True, guide_enumerated_dims=log_q.terms.enumerated_dims)
    return combine(log_p, log_q.terms, num_particles, num_points), model_trace


def _sequential_chunk(model, guide, x, num_samples, max_plate_nesting, seed, batch_index, data_plate):
    """``(log w, elbo) [K, b]`` of a program whose particles run one at a time, each block of
    :data:`PARTICLES_PER_SEED` from the seed of the vectorized path."""
    log_w, elbo = [], []
    for block in range(-(-num_samples // PARTICLES_PER_SEED)):
        size = min(PARTICLES_PER_SEED, num_samples - block * PARTICLES_PER_SEED)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(block_seed(seed, batch_index, block))
            for _ in range(size):
                weights = compute_importance_weights(model, guide, (x,), {}, 1, max_plate_nesting,
                                                     data_plate=data_plate, allow_global=True, vectorize=False)
                log_w.append(weights.log_weights)
                elbo.append(weights.elbo)
    return torch.cat(log_w), torch.cat(elbo)



class ChunkPlanner:
    """How many particles a chunk takes: measured on the first chunk of all, kept across batches
    (and across the rounds of ``--target-mc-error``), lowered after an out-of-memory retry."""

    def __init__(self, max_memory_mb, device):
        self.budget = max_memory_mb * 2 ** 20
        self.device = device
        self.bytes_per_particle_point = None
        self.chunk_sizes = set()

    def first_chunk(self, xb, num_samples):
        # The first chunk of all is small and measures what a particle costs: at most 16 particles,
        # fewer when a guess of 16 bytes per data element and particle would exceed the budget.
        if self.bytes_per_particle_point is None:
            point_size = math.prod(xb.shape[1:])
            return min(16, chunk_particles(self.budget, 16.0 * point_size, xb.shape[0], num_samples, self.device))
        return chunk_particles(self.budget, self.bytes_per_particle_point, xb.shape[0], num_samples, self.device)

    def measured(self, model_trace, size, b, baseline, num_samples):
        """The chunk size for the rest of the batch, from the first chunk's ``size`` particles."""
        measured = _trace_bytes(model_trace) * _CPU_ACTIVATION_FACTOR
        if self.device.type == "cuda":
            measured = max(measured, torch.cuda.max_memory_allocated(self.device) - baseline)
        self.bytes_per_particle_point = max(measured / (size * b), 1.0)
        return chunk_particles(self.budget, self.bytes_per_particle_point, b, num_samples, self.device)

    def halved(self, size, b):
        chunk = max(1, size // 2)
        if self.bytes_per_particle_point is not None:  # later batches start from what fitted
            self.bytes_per_particle_point = max(self.bytes_per_particle_point, self.budget / (chunk * b))
        return chunk


def _statistics(log_weights, elbo):
    """:class:`WeightStatistics` of log weights ``[k, b]``; the mean of the log weights is replaced by
    that of the ELBO terms where they differ (a guide that enumerates: the ELBO is q's expectation)."""
    stats = WeightStatistics.from_log_weights(log_weights)
    if elbo is not None and elbo is not log_weights:
        terms = WeightStatistics.from_log_weights(elbo)
        stats.mean, stats.m2 = terms.mean, terms.m2
    return stats


def _batch_statistics(model, guide, xb, batch_index, num_samples, seed, max_plate_nesting, planner, keep, progress,
                      data_plate=None, vectorize=True):
    """:class:`WeightStatistics` of ``num_samples`` particles for each point of one batch, and the
    first ``keep`` log weights of each point (CPU, float32) for k-hat."""
    device = xb.device
    b = xb.shape[0]
    if not vectorize:  # a program that does not broadcast over particles: one at a time
        log_weights, elbo = _sequential_chunk(model, guide, xb, num_samples, max_plate_nesting, seed, batch_index,
                                              data_plate)
        planner.chunk_sizes.add(1)
        progress.advance(num_samples * b)
        kept = log_weights[:keep].detach().float().cpu() if keep else None
        return _statistics(log_weights, elbo), kept
    blocks = _GuideBlocks(guide, xb, num_samples, max_plate_nesting, seed, batch_index, device, data_plate)
    stats, kept, num_kept = None, [], 0
    chunk = planner.first_chunk(xb, num_samples)
    guide_names = None
    start = 0
    while start < num_samples:
        size = min(num_samples - start, chunk)
        # Distribution and support checks run on the first chunk of each batch (its data, the
        # first guide block, the model's parameters); later chunks of the batch repeat the same
        # checks on new particles only, at a cost comparable to the log densities themselves.
        checks = contextlib.nullcontext() if start == 0 else pyro.validation_enabled(False)
        measuring = planner.bytes_per_particle_point is None
        baseline = None
        try:
            with checks:
                replay, log_q = blocks.take(start, start + size)
                if guide_names is None:
                    guide_names = set(replay.nodes)
                if device.type == "cuda" and measuring:
                    torch.cuda.synchronize(device)
                    baseline = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                (log_weights, elbo), model_trace = model_chunk_log_weights(model, xb, replay, log_q,
                                                                           max_plate_nesting, guide_names, data_plate)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            del err
            if size == 1:
                raise UserError("out of memory with a single particle; lower --batch-size") from None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            chunk = planner.halved(size, b)
            continue
        if measuring:
            chunk = planner.measured(model_trace, size, b, baseline, num_samples)
        del model_trace, replay
        piece = _statistics(log_weights, elbo)
        stats = piece if stats is None else stats.merge(piece)
        if num_kept < keep:
            kept.append(log_weights[: keep - num_kept].detach().float().cpu())
            num_kept += kept[-1].shape[0]
        planner.chunk_sizes.add(size)
        progress.advance(size * b)
        start += size
    return stats, (torch.cat(kept, 0) if kept else None)


def _kept_weights(num_samples, b, budget):
    """How many log weights per point k-hat keeps: all K when [K, b] float32 fits in a quarter of
    the budget, else as many as do (at least 1)."""
    return num_samples if num_samples * b * 4 <= budget / 4 else max(1, int(budget / 4 // (4 * b)))


def guide_samples_nothing(guide, x):
    """Whether the guide draws no latent value (every latent of the model is enumerated): then every
    particle has the same weight, and one particle gives the exact log p(x)."""
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(guide).get_trace(x)
    return not any(site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
                   and site["infer"].get("enumerate") != "parallel" for site in trace.nodes.values())


def valid_points(batch):
    """How many of a batch's points are real (a self-subsampling program's last batch is padded)."""
    return getattr(batch, "valid", None) or len(batch)


def enumerated_statistics(model, guide, batches, num_samples, max_plate_nesting, progress, data_plate=None):
    """For a model whose latents are all enumerated, or whose guide draws only point masses: the log
    p(x) of each point (one particle, no particle plate, every discrete latent summed out), as the
    statistics of ``num_samples`` equal weights."""
    from .progress import or_silent

    progress = or_silent(progress)
    parts = []
    for _, xb in batches:
        weights = compute_importance_weights(model, guide, (xb,), {}, 1, max_plate_nesting, data_plate=data_plate,
                                             allow_global=True, vectorize=False)
        valid = valid_points(xb)
        stats = WeightStatistics.constant(weights.log_weights[0][:valid], num_samples)
        if weights.elbo is not None and weights.elbo is not weights.log_weights:
            stats.mean = weights.elbo[0][:valid].detach().double()  # the guide's expectation over its enumeration
        parts.append(stats)
        progress.advance(num_samples * xb.shape[0])
    return WeightStatistics.cat(parts)


def importance_sampling_statistics(model, guide, batches, num_samples, seed, max_plate_nesting, planner,
                                   khat=False, progress=None, data_plate=None, vectorize=True):
    """Weight statistics of ``num_samples`` particles per point over ``batches``, chunked by ``planner``.

    :param batches: ``[(batch_index, xb), ...]``; a batch's draws come from the seed blocks of
        ``(seed, batch_index, block)``, so the same batch index and seed give the same particles.
        A batch may be a :class:`~pyro_lvm.protocol.SubsampleBatch` (its padding is left out).
    :param data_plate: the data plate's name; ``vectorize``: False runs the particles one at a time.
    :param khat: also return the PSIS k-hat of each point (NaN where undefined).
    :returns: ``(WeightStatistics over the points of all batches in order, khat array or None,
        weights per point that k-hat used)``.
    """
    from .progress import or_silent

    progress = or_silent(progress)
    parts, khats, num_kept = [], [], None
    for batch_index, xb in batches:
        keep = _kept_weights(num_samples, xb.shape[0], planner.budget) if khat else 0
        stats, kept = _batch_statistics(model, guide, xb, batch_index, num_samples, seed, max_plate_nesting,
                                        planner, keep, progress, data_plate, vectorize)
        valid = valid_points(xb)
        if valid < len(xb):  # the padding of a self-subsampling program's last batch
            stats = stats.select(torch.arange(valid, device=stats.count.device))
            kept = kept[:, :valid] if kept is not None else None
        parts.append(stats)
        if khat:
            khats.append(pareto_khat(kept))
            num_kept = kept.shape[0] if num_kept is None else min(num_kept, kept.shape[0])
    return WeightStatistics.cat(parts), (np.concatenate(khats) if khat else None), num_kept


def importance_sampling_log_marginal(model, guide, x, num_samples, batch_size, max_memory_mb, seed,
                                     max_plate_nesting, statistic="is"):
    """Per-point log p(x) estimates and diagnostics over all of ``x``, chunked to ``max_memory_mb``.

    ``statistic``: ``"is"`` and ``"iwae"`` give log mean_k w_k, ``"elbo"`` mean_k log w_k. Returns
    ``(per_point [N] on x's device in the model's dtype, extras dict)``; see
    :func:`pyro_lvm.estimators.estimate_log_marginal` for the Monte Carlo errors.
    """
    planner = ChunkPlanner(max_memory_mb, x.device)
    batches = list(enumerate(x.split(batch_size)))
    stats, khat, num_kept = importance_sampling_statistics(model, guide, batches, num_samples, seed,
                                                           max_plate_nesting, planner, khat=statistic == "is")
    kind = "mean_log" if statistic == "elbo" else "log_mean_exp"
    extras = sampling_extras(stats, planner, khat, num_kept)
    return stats.estimate(kind).to(stats.dtype), extras


def sampling_extras(stats, planner, khat, num_kept):
    """The JSON-able diagnostics of importance sampling: ESS, chunk size, PSIS k-hat."""
    ess = stats.effective_sample_size()
    extras = {"ess_mean": float(ess.mean()), "ess_min": float(ess.min())}
    if planner is not None and planner.chunk_sizes:
        extras["max_chunk_particles"] = int(max(planner.chunk_sizes))
    if khat is not None:
        defined = khat[np.isfinite(khat)]
        extras.update({
            "khat_max": float(defined.max()) if defined.size else None,
            "khat_frac_above_0.7": float((defined > 0.7).mean()) if defined.size else None,
            "khat_samples": int(num_kept) if num_kept is not None else 0,
        })
    return extras
