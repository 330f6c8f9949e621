"""Per-step cost of pyro-lvm's ``fit`` step against a hand-written PyTorch step, same VAE, same batches.

The model is the zoo ``vae`` with its defaults: the 784-200-200-50 tanh networks of the IWAE paper
and a Bernoulli decoder, batch 100, Adam. Three steps are timed, interleaved step by step so that
noise from other processes on the machine falls on all of them alike:

- ``hand``: a hand-written PyTorch step (reparameterized sample, closed-form log-densities,
  ``backward``, Adam) on its own copy of the same networks;
- ``ours``: exactly what ``pyro_lvm.training.train`` does per step (``make_step_loss``: the fast
  path when it is exact, else the Pyro objective; ``zero_grad``, the finiteness check, ``backward``,
  ``step`` of ``make_optimizer``'s Adam, the running sum);
- ``pyro``: the Pyro objective's ``differentiable_loss`` on the model and guide under
  ``DataPlateScale``, i.e. the step before the fast path existed.

For ``elbo``, ``meanfield`` and ``iwae`` with K = 5 it prints per-step medians (ms) and the ratios
``ours / hand`` and ``pyro / hand``; ``--json`` prints one JSON object with them instead.

    python benchmarks/svi_overhead.py --steps 200 [--device cuda [--no-cuda-graph]] [--json]

On CUDA, ``ours`` replays the step's forward and backward pass as a CUDA graph
(:mod:`pyro_lvm.training.cuda_graph`), as ``fit --cuda-graph`` does; ``--no-cuda-graph`` times the eager
fast path, what ``fit`` does on a GPU without the flag.
"""

import argparse
import copy
import json
import math
import platform
import statistics
import time

import pyro
import torch
from torch.nn import functional as F

from pyro_lvm.objectives import get_objective
from pyro_lvm.protocol import DataPlateScale, build_model, inspect_model, load_model_class
from pyro_lvm.training import make_optimizer, make_step_loss, take_step, with_cuda_graph

LOG_2PI = math.log(2 * math.pi)


def mnist_batches(data_dir, num_batches, batch_size, device):
    """``num_batches`` binarized MNIST batches (random binary images if MNIST is not there)."""
    try:
        from pyro_lvm.data import load_dataset

        x = load_dataset("mnist", data_dir, "none").train[:num_batches * batch_size]
        source = "mnist"
    except Exception:
        x = torch.rand(num_batches * batch_size, 1, 28, 28)
        source = "random"
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(x.shape, generator=gen) < x).float()
    return [b.to(device) for b in x.split(batch_size)], source


def hand_written_step(vae, optimizer, kind, particles, num_data):
    """The loop a PyTorch user writes: same networks, log-densities in closed form."""
    def step(x):
        n = x.shape[0]
        loc, raw = vae.encoder(x.reshape(n, -1)).chunk(2, dim=-1)
        scale = F.softplus(raw) + 1e-5
        shape = (particles, n, loc.shape[-1]) if kind == "iwae" else loc.shape
        eps = torch.randn(shape, device=x.device)
        z = loc + scale * eps
        logits = vae.decoder(z).reshape(z.shape[:-1] + x.shape[1:]) + vae.output_bias
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(-3).sum(-1)
        if kind == "meanfield":  # KL(N(loc, scale) || N(0, 1)) in closed form
            kl = (0.5 * (loc ** 2 + scale ** 2 - 1) - scale.log()).sum(-1)
            bound = log_px - kl
        else:
            log_pz = (-0.5 * z ** 2 - 0.5 * LOG_2PI).sum(-1)
            log_qz = (-0.5 * eps ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)
            log_w = log_px + log_pz - log_qz
            bound = torch.logsumexp(log_w, 0) - math.log(particles) if kind == "iwae" else log_w
        loss = -(num_data / n) * bound.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss
    return step


def fit_step(step_loss, lvm, optimizer, num_data, device):
    """The body of the loop in ``pyro_lvm.training.train`` (no checkpoints, no progress bar)."""
    running = torch.zeros((), device=device, dtype=torch.float64)

    def step(x):
        nonlocal running
        loss, finite = take_step(step_loss, optimizer, x)
        if not finite:
            raise RuntimeError("non-finite loss")
        running -= loss * (len(x) / num_data)
        return loss
    return step


def measure(kind, particles, batches, steps, device, num_data=50000, warmup=20, cuda_graph=True):
    pyro.settings.set(module_local_params=True)
    torch.manual_seed(0)
    lvm = build_model(load_model_class("vae"), batches[0].shape[1:], {}, device)
    hand_vae, plain_vae = copy.deepcopy(lvm), copy.deepcopy(lvm)
    info = inspect_model(lvm, batches[0][:2])
    objective = get_objective(kind, particles=particles, model_info=info)
    # Set up the objective (Pyro guesses max_plate_nesting lazily) before the fast path is chosen.
    ours_scale = DataPlateScale(num_data)
    with torch.no_grad():
        objective.loss(ours_scale(lvm.model), ours_scale(lvm.guide), batches[0][:2])
    config = {"seed": 0, "cuda_graph": cuda_graph}
    step_loss = make_step_loss(objective, lvm, num_data, batches[0][:2], device, config, log=print)
    fast_path = getattr(step_loss, "kind", None)
    step_loss = with_cuda_graph(step_loss, lvm, config, device)
    plain_objective = get_objective(kind, particles=particles, model_info=info)
    scale = DataPlateScale(num_data)
    plain_model, plain_guide = scale(plain_vae.model), scale(plain_vae.guide)

    runs = {
        "hand": hand_written_step(hand_vae, torch.optim.Adam(hand_vae.parameters(), lr=1e-3), kind, particles, num_data),
        "ours": fit_step(step_loss, lvm, make_optimizer(lvm, 1e-3), num_data, device),
        "pyro": fit_step(lambda x: plain_objective.differentiable_loss(plain_model, plain_guide, x), plain_vae,
                         torch.optim.Adam(plain_vae.parameters(), lr=1e-3), num_data, device),
    }
    times = {name: [] for name in runs}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(warmup + steps):
        x = batches[i % len(batches)]
        for name, step in runs.items():
            sync()
            start = time.perf_counter()
            step(x)
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"ms": medians, "ratio": medians["ours"] / medians["hand"], "pyro_ratio": medians["pyro"] / medians["hand"],
            "fast_path": fast_path, "cuda_graph": getattr(step_loss, "captured", None) is not None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--no-cuda-graph", action="store_true", help="ours without CUDA graphs (cuda only)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches, source = mnist_batches(args.data_dir, 50, args.batch_size, device)
    results = {}
    for kind, particles in (("elbo", 1), ("meanfield", 1), ("iwae", 5)):
        label = kind if particles == 1 else f"{kind}_k{particles}"
        results[label] = measure(kind, particles, batches, args.steps, device, cuda_graph=not args.no_cuda_graph)
    if args.json:
        print(json.dumps({"ratios": {k: round(v["ratio"], 3) for k, v in results.items()},
                          "pyro_ratios": {k: round(v["pyro_ratio"], 3) for k, v in results.items()},
                          "cuda_graph": {k: v["cuda_graph"] for k, v in results.items()},
                          "median_ms": {k: {n: round(t, 3) for n, t in v["ms"].items()} for k, v in results.items()},
                          "steps": args.steps, "batch_size": args.batch_size, "data": source,
                          "device": str(device), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "pyro": pyro.__version__,
                          "machine": platform.processor() or platform.machine()}))
        return
    print(f"VAE 784-200-200-50 tanh, Bernoulli, batch {args.batch_size}, {args.steps} steps, {device}, "
          f"{torch.get_num_threads()} threads, data {source}; median ms per step; "
          f"CUDA graph: {', '.join(k for k, v in results.items() if v['cuda_graph']) or 'none'}")
    print(f"{'objective':<12}{'hand':>8}{'ours':>8}{'pyro':>8}{'ours/hand':>11}{'pyro/hand':>11}")
    for label, r in results.items():
        ms = r["ms"]
        print(f"{label:<12}{ms['hand']:8.3f}{ms['ours']:8.3f}{ms['pyro']:8.3f}{r['ratio']:11.3f}{r['pyro_ratio']:11.3f}")


if __name__ == "__main__":
    main()
