"""Fitting a model with stochastic variational inference, one readable loop.

Each step draws a minibatch (sliced on the device; for a program whose data plate subsamples itself,
the whole split and the batch's indices, :meth:`pyro_lvm.protocol.Program.training_batches`),
computes the objective's differentiable loss -- a Pyro ``ELBO`` run on the model and guide under
:class:`~pyro_lvm.protocol.DataPlateScale`, so that a minibatch of B points estimates the bound on
all N training points -- and takes an Adam step on the program's parameters (``pyro.param`` s
included; gradients clipped to a norm if asked), then the learning-rate schedule's step
(:mod:`.schedules`). After every epoch the objective's bound is computed on the validation split with
a fixed seed (the global latents' terms charged once per N training points,
:class:`~pyro_lvm.protocol.EvaluationScale`); :class:`~.checkpoints.ValidationTracker` keeps the
best-validation checkpoint and decides early stopping; a line goes to ``metrics.jsonl`` and a
checkpoint is written. A checkpoint holds the RNG states, the position in the epoch, the optimizer,
the scheduler and the tracker, so ``--resume`` after a crash continues exactly as the uninterrupted
run would have (bit for bit on CPU).
"""

import math
import os
import sys
import time

import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch

from ..data import DeviceBatches, iterate_in_order
from ..errors import UserError
from ..protocol import DataPlateScale, EvaluationScale
from ..runs import append_jsonl, atomic_write_bytes, read_jsonl, save_checkpoint
from .checkpoints import ValidationTracker
from .fast import select_fast_path
from .rng import forked_rng, rng_state, set_rng_state
from .schedules import make_scheduler

ON_NAN = ("stop", "skip")


class TrainingDiverged(UserError):
    """The loss or its gradient became NaN or infinite; the message names the step and the site."""


def bad_sites(model, guide, batch):
    """Names of the sample sites whose log-probability is not finite, for the NaN message."""
    with torch.no_grad(), poutine.block():
        try:
            guide_trace = poutine.trace(guide).get_trace(batch)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
        except Exception as err:  # a distribution refusing NaN parameters names the culprit too
            return [f"(tracing failed: {str(err).splitlines()[0][:160]})"]
        names = []
        for where, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site_is_subsample(site):
                    continue
                value_ok = torch.isfinite(site["value"]).all()
                logp_ok = torch.isfinite(site["fn"].log_prob(site["value"])).all()
                if not (value_ok and logp_ok):
                    names.append(f"{where} site {name!r}")
        return names


def make_step_loss(objective, lvm, num_train, probe, device, config, log=print):
    """``loss(batch)`` for one training step: the objective's differentiable loss on a minibatch.

    When it is exact for this model, the fast path of :mod:`pyro_lvm.training.fast` computes it (same value
    and gradient, a fraction of Pyro's per-step bookkeeping); otherwise the Pyro objective runs on
    the model and guide under :class:`DataPlateScale`. ``config["fast"] = False`` or the
    environment variable ``PYRO_LVM_FAST=0`` turns the fast path off.
    """
    scale = training_scale(lvm, num_train)
    model, guide = scale(lvm.model), scale(lvm.guide)

    def plain(batch):
        return objective.differentiable_loss(model, guide, batch)

    if not config.get("fast", True) or os.environ.get("PYRO_LVM_FAST", "1") == "0":
        return plain
    # The probe runs under a forked RNG, so the training stream is the same with and without it.
    with forked_rng(device, config["seed"]):
        fast, reason = select_fast_path(objective, lvm, num_train, probe, fallback=plain)
    if fast is None and config.get("verbose_fast"):
        log(f"fast path off: {reason}")
    return fast or plain


def make_optimizer(lvm, lr, betas=(0.9, 0.999), eps=1e-8):
    """Adam over the model's parameters, in its multi-tensor (``foreach``) form on every device.

    PyTorch picks that form by default on CUDA only; on the CPU its default loops over the tensors in
    Python. Both forms compute the same values bit for bit; the multi-tensor one makes a dozen calls
    instead of a dozen per parameter (0.3 ms of a 5-10 ms VAE step on a CPU core).

    ``eps`` is added to the root of the second moment of the gradient of the training loss, which is
    scaled to all N training points (Pyro's convention); Adam's step is unchanged when the loss and
    ``eps`` are scaled together, so ``eps`` stated for a minibatch *sum* of B points is ``eps * N / B`` here.
    """
    return torch.optim.Adam(lvm.parameters(), lr=lr, betas=tuple(betas), eps=eps, foreach=True)


def with_cuda_graph(step_loss, lvm, config, device):
    """``step_loss`` replayed as a CUDA graph (:mod:`pyro_lvm.training.cuda_graph`) when that is exact and
    wanted: the fast path's loss on a CUDA device; else ``step_loss`` itself."""
    from .cuda_graph import GraphedStepLoss, wants_cuda_graph
    from .fast import FastObjective

    if isinstance(step_loss, FastObjective) and wants_cuda_graph(config, device) and not getattr(lvm, "subsampling", False):
        return GraphedStepLoss(step_loss, lvm)
    return step_loss


def take_step(step_loss, optimizer, batch, reduce_loss=None, clip_grad_norm=0.0):
    """One SVI step on ``batch``: loss, gradients, the optimizer's update.

    Returns ``(loss, finite)``, the loss detached (reduced over ranks by ``reduce_loss``); a
    non-finite loss (or, with clipping, gradient norm) is returned with ``finite=False`` and no
    update. A ``step_loss`` with ``computes_gradients`` (a replayed CUDA graph) has already written
    the gradients. ``clip_grad_norm > 0`` rescales the gradients to at most that total norm
    (:func:`torch.nn.utils.clip_grad_norm_`), in units of the N-scaled loss.
    """
    loss = step_loss(batch)
    value = loss.detach() if reduce_loss is None else reduce_loss(loss.detach())
    graphed = getattr(step_loss, "computes_gradients", False)
    if not graphed:
        optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(value):
        return value, False
    if not graphed:
        loss.backward()
    if clip_grad_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not torch.isfinite(torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            return value, False
    optimizer.step()
    return value, True


def training_scale(lvm, num_train):
    """The handler that scales a minibatch of ``lvm`` to the ``num_train`` training points."""
    info = getattr(lvm, "info", None)
    return DataPlateScale(num_train, info.data_plate.name if info is not None else "data",
                          getattr(lvm, "current_points", None))


def _evaluation_batches(lvm, x, batch_size):
    if hasattr(lvm, "batches"):
        return lvm.batches(x, batch_size)
    return ((batch, len(batch)) for batch in iterate_in_order(x, batch_size))


def bound_per_point(objective, model, guide, x, batch_size, device, seed, num_train=None, lvm=None):
    """The objective's bound per data point on ``x``, with a fixed seed: local terms unscaled, the
    global latents' terms charged ``b / num_train`` per batch of b points (once per training set)."""
    total = 0.0
    plate = lvm.info.data_plate.name if getattr(lvm, "info", None) is not None else "data"
    with forked_rng(device, seed), torch.no_grad():
        for batch, valid in _evaluation_batches(lvm, x, batch_size):
            if num_train is None:
                total -= objective.loss(model, guide, batch)
                continue
            share = EvaluationScale(num_train, valid, plate)
            total -= objective.loss(share(model), share(guide), batch)
    return total / len(x)


def model_device(lvm, data):
    """The device of the program's parameters, else of the data (a program may have none before its first trace)."""
    for tensor in list(lvm.parameters()) + list(lvm.buffers()):
        return tensor.device
    return data.device


def train(lvm, data, objective, config, run_dir, resume_state=None, progress=True, log=print, distributed=None):
    """Run SVI on ``lvm`` with ``objective`` for ``config["epochs"]`` epochs; returns the metrics.

    ``config`` holds ``epochs``, ``batch_size``, ``lr``, ``seed``, ``checkpoint_every`` (steps,
    0 for epoch ends only), ``checkpoint_minutes``, ``on_nan`` (``stop`` or ``skip``) and
    ``data["binarize"]``, and optionally the Adam settings ``adam_betas`` and ``adam_eps``, the
    schedule (``schedule``, ``lr_decay``, ``lr_step``, ``lr_min``; :mod:`.schedules`),
    ``clip_grad_norm``, and early stopping ``patience`` / ``min_delta`` (:mod:`.checkpoints`).
    ``run_dir`` receives checkpoints (the last and the best), metrics and TensorBoard events.
    ``distributed``: a :class:`pyro_lvm.training.distributed.Context` to train data-parallel (see there).
    """
    from torch.utils.tensorboard import SummaryWriter

    device = model_device(lvm, data.train)
    num_train = len(data.train)
    if hasattr(lvm, "training_batches"):
        batches = lvm.training_batches(data.train, config["batch_size"], seed=config["seed"],
                                       dynamic_binarize=data.binarize == "dynamic")
    else:
        batches = DeviceBatches(data.train, config["batch_size"], seed=config["seed"],
                                dynamic_binarize=data.binarize == "dynamic")
    scale = training_scale(lvm, num_train)
    model, guide = scale(lvm.model), scale(lvm.guide)
    optimizer = make_optimizer(lvm, config["lr"], config.get("adam_betas") or (0.9, 0.999),
                               config.get("adam_eps") or 1e-8)
    scheduler = make_scheduler(optimizer, config, len(batches))
    clip_grad_norm = float(config.get("clip_grad_norm") or 0.0)

    # Objectives set themselves up lazily at their first call (Pyro guesses max_plate_nesting from
    # a trace, which draws random numbers). One call under a forked RNG does that now, so the
    # training stream is the same for a fresh run and for one resumed mid-way.
    evaluable = getattr(lvm, "has_posterior_for", lambda x: True)
    if len(data.valid) and evaluable(data.valid):
        probe_data = data.valid
    elif data.binarize == "dynamic":
        # The first training batch, binarized by the batches' own seeded generator (the global
        # stream is untouched): raw intensities are not in a Bernoulli's support.
        probe_data = next(batches.epoch(0))[1]
    else:
        probe_data = data.train
    if not torch.is_tensor(probe_data):  # a self-subsampling plate's batch: one the program accepts
        probe = probe_data
    elif hasattr(lvm, "probe"):
        probe = lvm.probe(probe_data)
    else:
        probe = probe_data[:2]
    with forked_rng(device, config["seed"]), torch.no_grad():
        objective.loss(model, guide, probe)
    step_loss = make_step_loss(objective, lvm, num_train, probe, device, config, log)
    reduce_loss = None  # the loss of the whole global batch, from this process's loss
    main = distributed is None or distributed.is_main
    tracker = ValidationTracker(run_dir, config.get("patience"), config.get("min_delta"), write=main)
    if distributed is None:
        step_loss = with_cuda_graph(step_loss, lvm, config, device)
    if config.get("cuda_graph") and not getattr(step_loss, "computes_gradients", False):
        log("--cuda-graph has no effect here: it needs a CUDA device, one process and a model on the fast "
            "path; training eagerly")
    if distributed is not None:
        from .distributed import DataParallelLoss

        step_loss = DataParallelLoss(distributed, lvm, step_loss, probe, config["seed"])
        reduce_loss = step_loss.reduce
        log, progress = distributed.main_only(log), progress and main

    epoch, start_step, global_step, elapsed = 0, 0, 0, 0.0
    running = torch.zeros((), device=device, dtype=torch.float64)
    running_points = 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume_state["scheduler"])
        tracker.load_state(resume_state.get("validation"))
        set_rng_state(resume_state["rng"], device)
        epoch, start_step = int(resume_state["epoch"]), int(resume_state["step_in_epoch"])
        global_step, elapsed = int(resume_state["global_step"]), float(resume_state["seconds"])
        running = resume_state["running_elbo_sum"].to(device=device, dtype=torch.float64)
        running_points = int(resume_state["running_points"])
        if main:
            _truncate_metrics(run_dir / "metrics.jsonl", epoch)
    if distributed is not None:
        from .distributed import rank_seed

        # Rank 0 keeps the single-process stream; the others draw their own latents.
        ranks = (resume_state or {}).get("rng_ranks")
        if ranks is not None and len(ranks) == distributed.world_size:
            set_rng_state(ranks[distributed.rank], device)
        elif distributed.rank > 0:
            torch.manual_seed(rank_seed(config["seed"], distributed.rank, global_step))

    writer = SummaryWriter(log_dir=str(run_dir), purge_step=global_step if resume_state else None) if main else None
    last_save = time.monotonic()
    checkpoint_every = int(config.get("checkpoint_every") or 0)
    # Ranks must agree on when to checkpoint: with several, only step counts decide.
    checkpoint_seconds = 60.0 * float(config.get("checkpoint_minutes") or 0) if distributed is None else 0.0
    on_nan = config.get("on_nan", "stop")
    schedule_hook = getattr(objective, "set_step", None)
    skipped = 0

    def checkpoint(next_epoch, next_step):
        state = {
            "model": lvm.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(device),
            "epoch": next_epoch, "step_in_epoch": next_step, "global_step": global_step,
            "seconds": elapsed + (time.monotonic() - started),
            "running_elbo_sum": running.detach().cpu(), "running_points": running_points,
            "skipped_steps": skipped, "validation": tracker.state(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        if distributed is not None:
            from .distributed import gather_rng_states

            state["rng_ranks"] = gather_rng_states(distributed, state["rng"])
        if main:
            save_checkpoint(run_dir / "checkpoint.pt", state)

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    lvm.train()
    try:
        while epoch < config["epochs"]:
            started = time.monotonic()
            bar = _progress_bar(len(batches), start_step, epoch, config["epochs"], progress)
            for step, batch in batches.epoch(epoch, start_step):
                if schedule_hook is not None:  # objectives with a schedule (KL warm-up) follow the step
                    schedule_hook(global_step)
                value, finite = take_step(step_loss, optimizer, batch, reduce_loss, clip_grad_norm)
                if scheduler is not None:  # the rate is a function of the global step, skipped steps included
                    scheduler.step()
                if not finite:
                    _diverged(lvm, batch, epoch, step, global_step, on_nan, log)
                    skipped += 1
                    global_step += 1
                    continue
                # The loss is -bound scaled to N points; the running sum stays on the device so
                # that no step waits for a GPU-to-host copy.
                running -= value * (len(batch) / num_train)
                running_points += len(batch)
                global_step += 1
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0:
                        bar.set_postfix(loss=f"{-running.item() / max(running_points, 1):.3f}")
                if checkpoint_every and global_step % checkpoint_every == 0 and step + 1 < len(batches):
                    checkpoint(epoch, step + 1)
                    last_save = time.monotonic()
                elif checkpoint_seconds and time.monotonic() - last_save > checkpoint_seconds and step + 1 < len(batches):
                    checkpoint(epoch, step + 1)
                    last_save = time.monotonic()
            if bar is not None:
                bar.close()

            lvm.eval()
            # A guide with one parameter per training point has no bound on other points (NaN).
            valid = bound_per_point(objective, lvm.model, lvm.guide, data.valid, config["batch_size"],
                                    device, seed=config["seed"] + 1, num_train=num_train, lvm=lvm
                                    ) if len(data.valid) and main and evaluable(data.valid) else float("nan")
            lvm.train()
            elapsed += time.monotonic() - started
            train_elbo = running.item() / max(running_points, 1)
            stop = tracker.update(valid, epoch + 1, global_step, lvm.state_dict())
            record = {"epoch": epoch + 1, "step": global_step, "train_loss": -train_elbo,
                      "train_elbo": train_elbo, "valid_elbo": valid, "seconds": round(elapsed, 3),
                      "lr": optimizer.param_groups[0]["lr"]}
            if skipped:
                record["skipped_steps"] = skipped
            metrics.append(record)
            if main:
                append_jsonl(run_dir / "metrics.jsonl", record)
                writer.add_scalar("train/elbo", train_elbo, global_step)
                writer.add_scalar("valid/elbo", valid, global_step)
                writer.add_scalar("train/lr", record["lr"], global_step)
                writer.flush()
            log(f"epoch {epoch + 1}/{config['epochs']}  train bound {train_elbo:.4f}  "
                f"valid bound {valid:.4f}  ({elapsed:.1f} s)")
            epoch, start_step = epoch + 1, 0
            running = torch.zeros((), device=device, dtype=torch.float64)
            running_points = 0
            started = time.monotonic()
            checkpoint(epoch, 0)
            last_save = time.monotonic()
            if stop:
                log(f"early stopping after epoch {epoch}: no better validation bound than {tracker.best:.4f} "
                    f"(epoch {tracker.best_epoch}) for {tracker.patience} epochs")
                break
    finally:
        if writer is not None:
            writer.close()
    if distributed is not None:
        distributed.barrier()  # rank 0's last checkpoint is on disk before any rank goes on
    lvm.eval()
    return metrics


def _progress_bar(total, initial, epoch, epochs, enabled):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr)


def _diverged(lvm, batch, epoch, step, global_step, on_nan, log):
    sites = bad_sites(lvm.model, lvm.guide, batch) or ["no single site (the loss itself overflowed)"]
    where = f"epoch {epoch + 1}, step {step} (global step {global_step})"
    if on_nan == "skip":
        log(f"warning: non-finite loss at {where} in {', '.join(sites)}; step skipped (--on-nan skip)")
        return
    raise TrainingDiverged(
        f"the loss or its gradient became NaN or infinite at {where}, in {', '.join(sites)}; the last good checkpoint "
        f"is kept. Try a lower --lr, a lower bound on scales in the model, or --on-nan skip, then --resume")


def _truncate_metrics(path, completed_epochs):
    """Drop metrics of epochs that the checkpoint being resumed had not completed."""
    records = [r for r in read_jsonl(path) if r.get("epoch", 0) <= completed_epochs]
    import json

    atomic_write_bytes(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def check_finite_number(name, value, minimum=None):
    if not isinstance(value, (int, float)) or not math.isfinite(value) or (minimum is not None and value < minimum):
        raise UserError(f"{name} must be a finite number{f' >= {minimum}' if minimum is not None else ''}, got {value!r}")
    return value
