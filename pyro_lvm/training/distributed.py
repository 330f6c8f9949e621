"""Data-parallel SVI and sharded evaluation with PyTorch's own distributed engine.

Launch one process per device with ``torchrun``; each process runs ``pyro-lvm fit ... --distributed``:

::

    # one machine, 4 processes (CPU: gloo; one GPU each: nccl)
    torchrun --nproc_per_node 4 -m pyro_lvm.cli fit vae --data mnist --distributed --out runs/vae-ddp
    # two machines: the same line on each, with --node_rank 0 and 1
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST0 --master_port 29500 \\
        -m pyro_lvm.cli fit vae --data mnist --distributed --out runs/vae-ddp
    torchrun --nproc_per_node 4 -m pyro_lvm.cli evaluate runs/vae-ddp --estimator is --distributed --json

Training. Every rank holds the whole training split and draws the same global minibatch of B points
(the batch order is seeded, :class:`~pyro_lvm.data.DeviceBatches`); rank r takes the contiguous slice
of b_r points ``batch[B r / W : B (r+1) / W]``. Its objective runs under ``DataPlateScale(N)`` on
that slice, so its loss L_r estimates the bound with scale N / b_r. The loss is evaluated by a
:class:`~torch.nn.parallel.DistributedDataParallel` module around the objective (the parameters are
the model's), and DDP *averages* the W gradients; multiplying L_r by ``c_r = W b_r / B`` makes the
average exactly the single-process gradient,

    (1/W) sum_r c_r grad L_r = (N/B) sum_r sum_{n in shard r} grad l_n = grad L,

the same for the loss value (all-reduced every step, which is also what keeps every rank's decision
on a non-finite loss the same). Rank 0's RNG stream is the single-process one; rank r > 0 draws its
latents from a stream seeded by (seed, r), so shards do not share their noise. With W = 1 a run is
the single-process run. Rank 0 alone validates, writes metrics, TensorBoard events and checkpoints
(which hold every rank's RNG state, so ``--resume`` with the same W continues exactly); time-based
checkpoints are off, since ranks must agree on when to checkpoint.

Evaluation. The points are split into whole evaluation batches, contiguous per rank; each rank
estimates its batches with the seeds the single-process run gives those batches, and the per-point
estimates are gathered, so the sharded result equals the single-process one point for point.
"""

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..errors import UserError

LAUNCH = "torchrun --nproc_per_node N -m pyro_lvm.cli fit MODEL ... --distributed"


@dataclasses.dataclass
class Context:
    """This process's place in the process group."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def main_only(self, log):
        """``log`` on rank 0, silence elsewhere."""
        return log if self.is_main else (lambda message: None)


def setup(device="auto"):
    """Join the process group that ``torchrun`` describes in the environment; a :class:`Context`.

    The backend is ``nccl`` when the ranks use CUDA devices (one per local rank), else ``gloo``.
    """
    if not dist.is_available():
        raise UserError("this PyTorch has no torch.distributed; run without --distributed")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise UserError(f"--distributed needs the environment torchrun sets up; launch with: {LAUNCH}")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is available here; use --device cpu")
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if dist.get_backend() == "nccl":
        return Context(rank, world, torch.device("cuda", torch.cuda.current_device()))
    return Context(rank, world, torch.device("cpu"))


def shard_bounds(n, rank, world_size):
    """``(start, stop)`` of rank's contiguous share of ``n`` items (sizes differ by at most one)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def rank_seed(seed, rank, step=0):
    """The torch seed of rank r's latent draws from ``step`` on (rank 0 keeps the single-process stream)."""
    from ..data.loader import _mix

    return _mix(seed, 0xD15, rank, step)


class _LossModule(torch.nn.Module):
    """The objective as a module (parameters: the model's), for DDP to wrap."""

    def __init__(self, lvm, step_loss):
        super().__init__()
        self.lvm = lvm
        self.step_loss = step_loss

    def forward(self, x):
        if x.shape[0] == 0:  # a rank without points this step still joins the gradient all-reduce
            return sum(p.sum() for p in self.lvm.parameters() if p.requires_grad) * 0.0
        return self.step_loss(x)


def _unused_parameters(lvm, step_loss, probe, device, seed):
    """Whether some parameter gets no gradient from the loss (DDP must then look for them each step)."""
    from .rng import forked_rng

    with forked_rng(device, seed):
        loss = step_loss(probe)
        grads = torch.autograd.grad(loss, [p for p in lvm.parameters() if p.requires_grad], allow_unused=True)
    return any(g is None for g in grads)


class DataParallelLoss:
    """``loss(global_batch)``: this rank's shard of the step loss, scaled so DDP's average is exact.

    ``reduce(value)`` turns this rank's (detached) loss into the global one, on every rank.
    """

    def __init__(self, ctx, lvm, step_loss, probe, seed):
        self.ctx = ctx
        unused = _unused_parameters(lvm, step_loss, probe, ctx.device, seed)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        self.module = DistributedDataParallel(_LossModule(lvm, step_loss), device_ids=device_ids,
                                              find_unused_parameters=unused)

    def __call__(self, batch):
        size, world = len(batch), self.ctx.world_size
        start, stop = shard_bounds(size, self.ctx.rank, world)
        loss = self.module(batch[start:stop])
        if world * (stop - start) != size:  # c_r = W b_r / B, exactly 1 when the shards are equal
            loss = loss * (world * (stop - start) / size)
        return loss

    def reduce(self, value):
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.ctx.world_size


def gather_rng_states(ctx, state):
    """Every rank's RNG state, on every rank (a list indexed by rank)."""
    states = [None] * ctx.world_size
    dist.all_gather_object(states, {k: v.cpu() for k, v in state.items()})
    return states


@contextlib.contextmanager
def _batch_offset(offset):
    """The importance-sampling estimators seed each batch by its index in ``x``; a shard starting at
    batch ``offset`` must use the indices of the whole split, so the seeds are shifted here."""
    from ..estimators import importance_sampling

    original = importance_sampling.block_seed
    importance_sampling.block_seed = lambda seed, batch, block: original(seed, batch + offset, block)
    try:
        yield
    finally:
        importance_sampling.block_seed = original


def _combine_extras(extras, sizes):
    """Per-shard extras of an estimator into the whole split's: maxima, minima, point-weighted means."""
    combined = {}
    total = sum(sizes)
    for key in extras[0]:
        values = [e.get(key) for e in extras]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            combined[key] = values[0]
        elif key in ("samples_total", "points_refined", "points_above_target"):  # --target-mc-error's counts
            combined[key] = sum(values)
        elif key.endswith("_max") or key == "rounds":
            combined[key] = max(values)
        elif key.endswith("_min"):
            combined[key] = min(values)
        elif "_mean" in key or "frac" in key:
            combined[key] = sum(v * n for v, n in zip(values, sizes)) / total
        else:
            combined[key] = values[0]
    return combined


def estimate_sharded(ctx, lvm, x, estimator="is", batch_size=100, **kwargs):
    """:func:`~pyro_lvm.estimators.estimate_log_marginal` with the points sharded over the ranks.

    Every rank returns the whole split's :class:`LogMarginalEstimate` (per-point values gathered).
    """
    from ..estimators import estimate_log_marginal, summarize

    num_batches = -(-len(x) // batch_size)
    first, last = shard_bounds(num_batches, ctx.rank, ctx.world_size)
    shard = x[first * batch_size:last * batch_size]
    result = None
    if len(shard):
        with _batch_offset(first):
            result = estimate_log_marginal(lvm, shard, estimator=estimator, batch_size=batch_size, **kwargs)
    parts = [None] * ctx.world_size
    mine = None if result is None else (
        result.per_point.cpu(), result.seconds, result.extras, result.per_point_mc_stderr.cpu(),
        None if result.samples_per_point is None else result.samples_per_point.cpu())
    dist.all_gather_object(parts, mine)
    parts = [p for p in parts if p is not None]
    per_point = torch.cat([p[0] for p in parts]).to(x.device)
    per_point_mc = torch.cat([p[3] for p in parts]).to(x.device)
    samples = None if parts[0][4] is None else torch.cat([p[4] for p in parts]).to(x.device)
    extras = _combine_extras([p[2] for p in parts], [len(p[0]) for p in parts])
    template = result if result is not None else None
    return summarize(per_point, per_point_mc, samples, template.estimator if template else estimator,
                     template.num_samples if template else kwargs.get("num_samples"), max(p[1] for p in parts),
                     extras)


def context_for(flag, device=None):
    """The :class:`Context` when ``flag`` (``fit/evaluate --distributed``) is set, else ``None``."""
    return setup(str(device or "auto")) if flag else None


class _NoLock:
    def release(self):
        pass


def run_lock(ctx, out):
    """The run directory's lock, held by rank 0 alone (the only rank that writes there)."""
    from ..runs import RunLock

    return RunLock(out).acquire() if ctx is None or ctx.is_main else _NoLock()
