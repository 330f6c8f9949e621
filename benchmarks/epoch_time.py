"""MNIST epoch time of ``pyro_lvm.fit`` against a hand-written PyTorch loop; peak memory of ``evaluate --estimator is``.

Epoch time. The IWAE-paper architecture (the zoo ``vae`` defaults: 784-200-200-50 tanh, Bernoulli
decoder), MNIST's 50,000 training images dynamically binarized, batch 100, Adam 1e-3, then the bound
on the 10,000 validation images. ``ours`` is one epoch of ``pyro_lvm.fit`` (the ``seconds`` it
records: training steps, validation, checkpoint); ``hand`` is the loop a PyTorch user writes, on the
same device-resident batches (:class:`~pyro_lvm.data.DeviceBatches`) with the same validation pass.
They alternate, ``--rounds`` times each, and the medians are reported, also scaled to 60,000 images
(600 steps; the scaling is stated, not measured). ``--steps S`` times only the first S steps of each
epoch (for a slow machine) and extrapolates, saying so.

Memory. With the fitted run, ``evaluate --estimator is`` on ``--memory-points`` test images with
``--memory-samples`` particles is run in a fresh process per chunk budget (``--max-memory-mb``); the
increase of the process's peak resident memory over the same process after loading the run is
compared with the budget (CPU; on CUDA the allocator's peak would be the figure).

    python benchmarks/epoch_time.py --data-dir ../shared/data [--objective elbo] [--rounds 2] [--json]
"""

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import pyro_lvm
from pyro_lvm.data import DeviceBatches, iterate_in_order, load_dataset

LOG_2PI = math.log(2 * math.pi)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_written_epoch(vae, optimizer, data, batch_size, particles, seed, epoch, max_steps=None):
    """One epoch of the hand-written loop (IWAE bound with K particles; K=1 is the ELBO), then validation."""
    device = data.train.device
    batches = DeviceBatches(data.train, batch_size, seed=seed, dynamic_binarize=True)
    num_data = len(data.train)

    def bound(x):
        n = x.shape[0]
        loc, raw = vae.encoder(x.reshape(n, -1)).chunk(2, dim=-1)
        scale = F.softplus(raw) + 1e-5
        eps = torch.randn((particles,) + loc.shape, device=x.device)
        z = loc + scale * eps
        logits = vae.decoder(z).reshape(z.shape[:-1] + x.shape[1:]) + vae.output_bias
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(-3).sum(-1)
        log_w = log_px + (-0.5 * z ** 2).sum(-1) - (-0.5 * eps ** 2 - scale.log()).sum(-1)
        return torch.logsumexp(log_w, 0) - math.log(particles)

    started = time.perf_counter()
    steps = 0
    for step, x in batches.epoch(epoch):
        if max_steps is not None and step >= max_steps:
            break
        loss = -(num_data / len(x)) * bound(x).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    _sync(device)
    train_seconds = time.perf_counter() - started
    with torch.no_grad():
        valid = sum(float(bound(x).sum()) for x in iterate_in_order(data.valid, batch_size)) / len(data.valid)
    return train_seconds, time.perf_counter() - started, steps, valid


def our_epoch(data_dir, out, objective, particles, batch_size, max_steps=None, device="cpu", cuda_graph=False):
    """One epoch of ``pyro_lvm.fit``; with ``max_steps``, the training loop's time over its first steps."""
    from pyro_lvm import training

    marks = []
    original = training.DeviceBatches.epoch

    def mark():
        _sync(torch.device(device))
        marks.append(time.perf_counter())

    def timed_epoch(self, epoch, start_step=0):  # time stamps at each step, to stop after max_steps
        mark()
        for step, batch in original(self, epoch, start_step):
            if max_steps is not None and step >= max_steps:
                mark()
                return
            yield step, batch
        mark()

    training.DeviceBatches.epoch = timed_epoch
    try:
        run = pyro_lvm.fit("vae", data="mnist", data_dir=data_dir, out=out, epochs=1, batch_size=batch_size,
                           objective=objective, particles=particles, device=device, cuda_graph=cuda_graph, progress=False, log=lambda m: None)
    finally:
        training.DeviceBatches.epoch = original
    return marks[-1] - marks[0], run.metrics[-1]["seconds"], run


# The child samples its own resident set size every millisecond while ``evaluate`` runs (the process's
# lifetime peak would be the data set's loading, not the evaluation). Tensors this size are allocated
# with mmap and returned on free, so the resident size follows the live tensors.
MEMORY_CHILD = """
import json, os, sys, threading, time
import pyro_lvm
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
import torch
run = pyro_lvm.load_run(sys.argv[1], device=sys.argv[5])
cuda = run.device.type == "cuda"
pyro_lvm.evaluate(run, estimator="is", samples=2, limit=2, record=False)   # warm: imports, first traces
def evaluate():
    return pyro_lvm.evaluate(run, estimator="is", samples=int(sys.argv[2]), limit=int(sys.argv[3]),
                             max_memory_mb=float(sys.argv[4]), record=False)
if cuda:  # the caching allocator's own peak counter: exact, no sampling needed
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = evaluate()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
else:
    base, highest, done = rss(), [0], threading.Event()
    def watch():
        while not done.is_set():
            highest[0] = max(highest[0], rss())
            time.sleep(0.001)
    watcher = threading.Thread(target=watch)
    watcher.start()
    r = evaluate()
    done.set()
    watcher.join()
    peak = max(highest[0], rss())
print(json.dumps({"peak_increase_mb": round((peak - base) / 2 ** 20, 1), "log_px": r["log_px"],
                  "seconds": r["seconds"], "max_chunk_particles": r.get("max_chunk_particles")}))
"""


def memory_of_evaluate(run_dir, budgets, samples, points, device="cpu"):
    rows = []
    for budget in budgets:
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(run_dir), str(samples), str(points), str(budget),
                              str(device)],
                             capture_output=True, text=True, check=True)
        rows.append({"max_memory_mb": budget, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--objective", default="elbo", choices=["elbo", "iwae"])
    parser.add_argument("--particles", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="time only the first S steps of an epoch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=["epoch", "memory"], default=None, help="one of the two parts")
    parser.add_argument("--max-memory-mb", type=float, nargs="*", default=[16, 64, 256])
    parser.add_argument("--memory-samples", type=int, default=1000)
    parser.add_argument("--memory-points", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on cuda, memory is the allocator's peak)")
    parser.add_argument("--cuda-graph", action="store_true", help="ours with fit --cuda-graph")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("mnist", args.data_dir, "none").to(device)
    steps_per_epoch = -(-len(data.train) // args.batch_size)
    timed_steps = min(args.steps or steps_per_epoch, steps_per_epoch)
    times = {"hand_train": [], "hand_epoch": [], "ours_train": [], "ours_epoch": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only == "memory":  # a short fit (20 steps) gives a run to evaluate
            run = our_epoch(args.data_dir, Path(tmp) / "short", args.objective, args.particles, args.batch_size, 20,
                            device=args.device)[2]
            rows = memory_of_evaluate(run.path, args.max_memory_mb, args.memory_samples, args.memory_points,
                                      args.device)
            print(json.dumps({"memory": rows, "samples": args.memory_samples, "points": args.memory_points}))
            return
        run = None
        for r in range(args.rounds):
            torch.manual_seed(r)
            from pyro_lvm.protocol import build_model, load_model_class

            vae = build_model(load_model_class("vae"), data.data_shape, {}, device)
            vae.initialize(data.train)
            optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
            train_s, epoch_s, _, _ = hand_written_epoch(vae, optimizer, data, args.batch_size, args.particles,
                                                        seed=r, epoch=0, max_steps=args.steps)
            times["hand_train"].append(train_s)
            times["hand_epoch"].append(epoch_s)
            train_s, epoch_s, run = our_epoch(args.data_dir, Path(tmp) / f"ours{r}", args.objective,
                                              args.particles, args.batch_size, max_steps=args.steps,
                                              device=args.device, cuda_graph=args.cuda_graph)
            times["ours_train"].append(train_s)
            times["ours_epoch"].append(epoch_s)
        medians = {k: statistics.median(v) for k, v in times.items()}
        per_step = {who: medians[f"{who}_train"] / timed_steps for who in ("hand", "ours")}
        result = {
            "objective": args.objective, "particles": args.particles, "batch_size": args.batch_size,
            "train_points": len(data.train), "timed_steps": timed_steps, "steps_per_epoch": steps_per_epoch,
            "extrapolated": timed_steps < steps_per_epoch, "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda_graph": args.cuda_graph,
            "median_seconds": {k: round(v, 3) for k, v in medians.items()},
            "train_pass_seconds_50k": {w: round(s * steps_per_epoch, 2) for w, s in per_step.items()},
            "train_pass_seconds_60k": {w: round(s * 600, 2) for w, s in per_step.items()},
            "ratio_train_pass": round(per_step["ours"] / per_step["hand"], 3),
        }
        if args.only != "epoch":
            result["memory"] = memory_of_evaluate(run.path, args.max_memory_mb, args.memory_samples,
                                                  args.memory_points, args.device)
    if args.json:
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
