"""AIS of pyro-lvm (``evaluate --estimator ais``) against a hand-written PyTorch AIS, same VAE, same run.

The model is the zoo ``vae`` with its defaults (784-200-200-50 tanh networks of the IWAE paper, a
Bernoulli decoder) on the embedded 8x8 ``digits``, statically binarized, fitted inline for
``--train-steps`` Adam steps of the ELBO so that the posterior means something. log p(x) of
``--points`` test digits is estimated with ``--chains`` chains, ``--steps`` annealing steps of the
sigmoid schedule, HMC with ``--leapfrog`` leapfrog steps from step size 0.05, and the step-size rule
of Wu et al. (2017) (x1.02 above an acceptance rate of 0.65, /1.02 below, within [1e-4, 0.5]), by:

- ``hand``: the AIS a PyTorch user writes for this model: log p(z) and log p(x|z) in closed form,
  ``torch.autograd.grad`` for the gradient, the same leapfrog integrator and Metropolis step;
- ``ours``: :func:`pyro_lvm.estimators.ais.annealed_importance_log_marginal`, which runs the
  model's own Pyro program for every density (the light recorder of ``ais.py``);
- ``traced``: the same with ``use_traces=True``, a ``poutine.trace`` of the model per density;
- ``baseline`` (with ``--baseline-commit C``): ``pyro_lvm/estimators/ais.py`` as it was at git commit
  C of this repository, loaded from ``git show`` (47eaac1 is the AIS before issue 14).

The three are interleaved, ``--repeats`` times, so that noise from other processes falls on all
alike; the table gives median wall-clock and CPU seconds, the ratios to ``hand``, and the estimates
(mean over points) with their Monte Carlo standard errors (from the chains, delta method), which
must agree. The first repeat is a warm-up and is not counted.

    python benchmarks/ais_vs_hand.py [--repeats 5] [--points 50] [--chains 16] [--steps 100]
        [--leapfrog 10] [--train-steps 300] [--threads 1] [--device cpu|cuda] [--baseline-commit C] [--json]
"""

import argparse
import json
import math
import os
import platform
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pyro_lvm.data import load_dataset  # noqa: E402
from pyro_lvm.estimators import ais  # noqa: E402
from pyro_lvm.estimators.monte_carlo import WeightStatistics, stderr_of_mean  # noqa: E402
from pyro_lvm.protocol import build_model, load_model_class  # noqa: E402

pyro.settings.set(module_local_params=True)
LOG_2PI = math.log(2 * math.pi)


def train_vae(x_train, steps, seed=0, batch=100, lr=1e-3):
    """The zoo VAE (default hyperparameters), ``steps`` Adam steps of the ELBO."""
    pyro.set_rng_seed(seed)
    lvm = build_model(load_model_class("vae"), tuple(x_train.shape[1:]), {}, x_train.device)
    lvm.initialize(x_train)
    optim = torch.optim.Adam(lvm.parameters(), lr=lr)
    elbo = pyro.infer.Trace_ELBO()
    for _ in range(steps):
        optim.zero_grad()
        index = torch.randint(len(x_train), (batch,), device=x_train.device)
        elbo.differentiable_loss(lvm.model, lvm.guide, x_train[index]).backward()
        optim.step()
    lvm.eval()
    return lvm


def sigmoid_schedule(num_steps, radius=4.0):
    fraction = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    s = torch.sigmoid(radius * (2.0 * fraction - 1.0))
    betas = (s - s[0]) / (s[-1] - s[0])
    betas[0], betas[-1] = 0.0, 1.0
    return betas.tolist()


def hand_written_ais(vae, x, num_chains, num_steps, leapfrog_steps, step_size=0.05):
    """AIS from the prior with HMC, as written by hand for this VAE; returns log weights [C, n]."""
    num_points, latent_dim = x.shape[0], vae.latent_dim
    betas = sigmoid_schedule(num_steps)

    def densities(z, beta, grad=True):
        with torch.enable_grad():
            z = z.detach().requires_grad_(grad)
            log_prior = -0.5 * z.pow(2).sum(-1) - 0.5 * latent_dim * LOG_2PI
            logits = vae.decode(z)
            log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(2).sum(-1)
            g = torch.autograd.grad((log_prior + beta * log_lik).sum(), z)[0] if grad else None
        return log_prior.detach(), log_lik.detach(), g

    z = torch.randn(num_chains, num_points, latent_dim, device=x.device)
    log_w = torch.zeros(num_chains, num_points, device=x.device)
    eps = torch.full((num_points,), step_size, device=x.device)
    for t in range(1, num_steps + 1):
        move = t < num_steps
        log_prior, log_lik, g = densities(z, betas[t], move)
        log_w = log_w + (betas[t] - betas[t - 1]) * log_lik
        if not move:
            break
        e, beta = eps.unsqueeze(-1), betas[t]
        momentum = torch.randn_like(z)
        energy = -(log_prior + beta * log_lik) + 0.5 * momentum.pow(2).sum(-1)
        p = momentum + 0.5 * e * g
        z_new = z
        for step in range(leapfrog_steps):
            z_new = z_new + e * p
            prior_new, lik_new, g = densities(z_new, beta)
            p = p + (e if step < leapfrog_steps - 1 else 0.5 * e) * g
        energy_new = -(prior_new + beta * lik_new) + 0.5 * p.pow(2).sum(-1)
        accept_prob = (energy - energy_new).nan_to_num(nan=-math.inf).clamp(max=0.0).exp()
        accept = torch.rand_like(accept_prob) < accept_prob
        z = torch.where(accept.unsqueeze(-1), z_new, z)
        rate = accept_prob.mean(0)
        eps = (eps * torch.where(rate > 0.65, 1.02, 1 / 1.02)).clamp(1e-4, 0.5)
    return log_w


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each (after one warm-up)")
    parser.add_argument("--points", type=int, default=50)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100, help="annealing steps")
    parser.add_argument("--leapfrog", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-traced", action="store_true", help="skip the poutine.trace variant")
    parser.add_argument("--baseline-commit", help="also time ais.py of this git commit (47eaac1: before issue 14)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    data = load_dataset("digits", None, "static").to(device)
    lvm = train_vae(data.train, args.train_steps)
    x = data.test[: args.points]
    assert sigmoid_schedule(args.steps) == ais.annealing_schedule(args.steps).tolist()

    options = dict(num_chains=args.chains, ais_steps=args.steps, leapfrog_steps=args.leapfrog, hmc_step_size=0.05)
    runs = {
        "hand": lambda seed: _hand(lvm, x, args, seed),
        "ours": lambda seed: _ours(lvm, x, options, seed, use_traces=False),
    }
    if not args.no_traced:
        runs["traced"] = lambda seed: _ours(lvm, x, options, seed, use_traces=True)
    if args.baseline_commit:
        baseline = _module_at_commit(args.baseline_commit, "pyro_lvm/estimators/ais.py")
        runs["baseline"] = lambda seed: _baseline(baseline, lvm, x, options, seed)
    load_start = os.getloadavg()
    times = {name: {"wall": [], "cpu": []} for name in runs}
    estimates = {name: [] for name in runs}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):
            for name, run in runs.items():
                (log_px, mc), wall, cpu = _timed(lambda: run(repeat), device)
                if repeat > 0:  # the first round warms up allocators, autograd and caches
                    times[name]["wall"].append(wall)
                    times[name]["cpu"].append(cpu)
                    estimates[name].append((log_px, mc))
    load_end = os.getloadavg()

    median = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    result = {
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "pyro": pyro.__version__, "threads": torch.get_num_threads(),
        "points": args.points, "chains": args.chains, "steps": args.steps, "leapfrog": args.leapfrog,
        "repeats": args.repeats, "load_average_start": load_start, "load_average_end": load_end,
        "seconds": times, "median_seconds": median,
        "ratio_wall": {name: median[name]["wall"] / median["hand"]["wall"] for name in runs if name != "hand"},
        "ratio_cpu": {name: median[name]["cpu"] / median["hand"]["cpu"] for name in runs if name != "hand"},
        "log_px": {name: [e[0] for e in est] for name, est in estimates.items()},
        "mc_stderr": {name: [e[1] for e in est] for name, est in estimates.items()},
    }
    # The estimates agree within their Monte Carlo errors: repeats use different seeds, so the
    # spread of (ours - hand) over the repeats is compared with the reported errors too.
    diffs = [o[0] - h[0] for o, h in zip(estimates["ours"], estimates["hand"])]
    result["ours_minus_hand"] = diffs
    result["ours_minus_hand_mc_stderr"] = [math.hypot(o[1], h[1]) for o, h in zip(estimates["ours"], estimates["hand"])]
    if args.json:
        print(json.dumps(result))
        return
    print(f"AIS, zoo vae on {args.points} digits: {args.chains} chains, {args.steps} steps, {args.leapfrog} leapfrog "
          f"steps; {args.repeats} repeats; load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    print(f"{'':8s} {'wall s':>8s} {'cpu s':>8s} {'wall/hand':>10s} {'cpu/hand':>9s} {'log p(x)':>10s} {'mc stderr':>10s}")
    for name in runs:
        log_px = statistics.mean(e[0] for e in estimates[name])
        mc = statistics.mean(e[1] for e in estimates[name])
        rw = median[name]["wall"] / median["hand"]["wall"]
        rc = median[name]["cpu"] / median["hand"]["cpu"]
        print(f"{name:8s} {median[name]['wall']:8.3f} {median[name]['cpu']:8.3f} {rw:10.3f} {rc:9.3f} "
              f"{log_px:10.4f} {mc:10.4f}")
    print("ours - hand per repeat:", " ".join(f"{d:+.4f}" for d in diffs),
          f"(each +- {statistics.mean(result['ours_minus_hand_mc_stderr']):.4f})")


def _hand(lvm, x, args, seed):
    torch.manual_seed(seed)
    log_w = hand_written_ais(lvm, x, args.chains, args.steps, args.leapfrog)
    stats = WeightStatistics.from_log_weights(log_w)
    return float(stats.estimate("log_mean_exp").mean()), stderr_of_mean(stats.mc_variance("log_mean_exp"))


def _ours(lvm, x, options, seed, use_traces):
    options = dict(options)
    batches = [(0, x)]
    chains = options.pop("num_chains")
    stats, _ = ais.ais_statistics(lvm, batches, chains, seed, options, use_traces=use_traces)
    return float(stats.estimate("log_mean_exp").mean()), stderr_of_mean(stats.mc_variance("log_mean_exp"))


def _module_at_commit(commit, path):
    """The module at ``path`` as it was at git ``commit`` of this repository (it may import pyro_lvm)."""
    repo = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "-C", str(repo), "show", f"{commit}:{path}"], capture_output=True, text=True,
                            check=True).stdout
    file = Path(tempfile.mkdtemp(prefix="ais-baseline-")) / "ais_baseline.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("ais_baseline", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _baseline(module, lvm, x, options, seed):
    """The old ``annealed_importance_log_marginal`` (its steps were ``num_steps``); it returns no
    weights, so its error is not reported."""
    old = dict(options)
    old["num_steps"] = old.pop("ais_steps")
    per_point, _ = module.annealed_importance_log_marginal(lvm, x, seed=seed, **old)
    return float(per_point.mean()), math.nan


if __name__ == "__main__":
    main()
