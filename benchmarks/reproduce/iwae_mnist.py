"""The MNIST protocol of the IWAE paper, run with pyro-lvm and with a hand-written PyTorch reference.

Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders", ICLR, Section 5 and the
appendix: MNIST with its 60,000 training and 10,000 test images, binarized dynamically (each training
minibatch redrawn as x ~ Bernoulli(intensity)); batch 20; Adam with beta1 = 0.9, beta2 = 0.999,
epsilon = 1e-4; 3^i passes over the data at learning rate 0.001 * 10^(-i/7), i = 0..7 (3280 passes);
the 784-200-200-50 tanh architecture with one stochastic layer, or two (100 then 50 units); objectives
the VAE bound (the ELBO, averaged over k samples) and the IWAE bound with k samples; test log p(x) by
importance sampling with 5000 samples. The paper's test NLLs (nats)::

    1 layer:  VAE k=1 86.76   IWAE k=5 85.54   IWAE k=50 84.78
    2 layers: VAE k=1 85.33   IWAE k=50 82.90

Each row is trained twice, from the same initial weights, on the same minibatches (read from
:class:`pyro_lvm.data.DeviceBatches`, so the data order is not what is compared) and with the same
random numbers for the latents:

- **pyro-lvm**: ``pyro_lvm.fit("vae", ...)`` with ``schedule="iwae"``, ``batch_size=20`` and the rest of the
  protocol as options, then ``estimate_log_marginal(..., "is", 5000)`` on the test images.
- **reference**: plain ``nn.Module`` networks with the same shapes (the weights are copied from the
  toolkit's model after its ``initialize``), the bound written out by hand, ``torch.optim.Adam`` on the
  *minibatch sum* of the bound with epsilon 1e-4 (as the paper's own code does), the schedule and the
  importance-sampling estimate written by hand.

The toolkit's loss is scaled to all N training points (Pyro's convention), the reference's is the sum
over a minibatch of B points: the same Adam steps when the toolkit's epsilon is 1e-4 * N / B = 0.3
(Adam is unchanged when its loss and epsilon are scaled together). Both parameterize the standard
deviations as softplus(.) + 1e-5 (the zoo model's choice; the paper's code used exp). The difference
of the two test NLLs is reported with its standard error, paired over the test points.

``--passes P`` shortens the schedule in proportion (every stage keeps its share 3^i / 3280 of the steps);
a shortened run is not the paper's protocol and sits above the paper's NLL by its shorter training.
``--eval-points M`` evaluates the first M test images only (K = 5000 on all 10,000 is about 5e7
decoder passes per model). Each row writes ``OUT/ROW/result.json``; ``--table OUT`` prints them.

    python benchmarks/reproduce/iwae_mnist.py --data-dir ../shared/data --row 1:vae:1 --passes 20 --eval-points 1000
    python benchmarks/reproduce/iwae_mnist.py --table benchmarks/reproduce/out
    python benchmarks/reproduce/iwae_mnist.py --data-dir DATA --device cuda --cuda-graph --row 2:iwae:50 --passes 3280
"""

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import pyro_lvm
import pyro_lvm.api
from pyro_lvm.data import DeviceBatches, load_dataset
from pyro_lvm.estimators import estimate_log_marginal

HERE = Path(__file__).resolve().parent
PAPER = {(1, "vae", 1): 86.76, (1, "iwae", 5): 85.54, (1, "iwae", 50): 84.78, (2, "vae", 1): 85.33,
         (2, "iwae", 50): 82.90}
PAPER_PASSES = 3280
BATCH_SIZE = 20
ADAM_EPS = 1e-4  # the paper's, for the gradient of a minibatch sum
LOG_2PI = math.log(2 * math.pi)


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_row(text):
    layers, objective, k = text.split(":")
    if layers not in ("1", "2") or objective not in ("vae", "iwae") or int(k) < 1:
        raise argparse.ArgumentTypeError(f"a row is LAYERS:OBJECTIVE:K, LAYERS 1 or 2, OBJECTIVE vae or iwae; got {text!r}")
    return int(layers), objective, int(k)


def row_name(row):
    return f"{row[0]}layer-{row[1]}-k{row[2]}"


# --------------------------------------------------------------------------------------------------
# Data: MNIST's 60,000 training and 10,000 test images as one .npz that pyro-lvm reads as a data file


def protocol_data(data_dir, out):
    """``OUT/mnist-60k-10k.npz``: train = all 60,000 MNIST training images, no validation split, test = the 10,000."""
    path = Path(out) / "mnist-60k-10k.npz"
    if not path.is_file():
        import torchvision

        train = torchvision.datasets.MNIST(data_dir, train=True, download=False).data.numpy()
        test = torchvision.datasets.MNIST(data_dir, train=False, download=False).data.numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")  # rows started together each write their own
        np.savez(tmp, train=train, valid=np.zeros((0, 28, 28), np.uint8), test=test)
        os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# The hand-written reference


def mlp(widths, out_features, bias=True):
    """Linear-tanh layers as an ``nn.Sequential`` (the same indices, hence state-dict keys, as the zoo's MLP)."""
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    layers.append(nn.Linear(widths[-1], out_features, bias=bias))
    return nn.Sequential(*layers)


def gaussian_log_density(v, loc, scale):
    return (-0.5 * ((v - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)


class ReferenceVAE(nn.Module):
    """The IWAE paper's networks (1 or 2 stochastic layers) and their log importance weights, by hand."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers
        x_side = 50 if layers == 1 else 100
        self.encoder = mlp([784, 200, 200], 2 * x_side)
        self.decoder = mlp([x_side, 200, 200], 784, bias=False)
        self.output_bias = nn.Parameter(torch.zeros(1, 28, 28))
        if layers == 2:
            self.encoder_top = mlp([100, 100, 100], 2 * 50)
            self.decoder_top = mlp([50, 100, 100], 2 * 100)

    @staticmethod
    def split(out):
        loc, raw = out.chunk(2, dim=-1)
        return loc, F.softplus(raw) + 1e-5

    def log_weights(self, x, k):
        """log p(x, z) - log q(z | x) for k draws per point: [k, n] (the draws are [n, ...] when k = 1,
        the shape pyro-lvm's objectives draw, so that both consume the same random numbers)."""
        shape = (k,) if k > 1 else ()
        flat = x.reshape(x.shape[0], 784)
        loc, scale = self.split(self.encoder(flat))
        first = loc + scale * torch.randn(shape + loc.shape, device=x.device)
        log_q = gaussian_log_density(first, loc, scale)
        if self.layers == 1:
            top, log_p = first, 0.0
        else:
            loc2, scale2 = self.split(self.encoder_top(first))
            top = loc2 + scale2 * torch.randn(loc2.shape, device=x.device)  # loc2 has the k draws already
            log_q = log_q + gaussian_log_density(top, loc2, scale2)
            log_p = gaussian_log_density(first, *self.split(self.decoder_top(top)))
        log_p = log_p + (-0.5 * top ** 2 - 0.5 * LOG_2PI).sum(-1)
        logits = self.decoder(first) + self.output_bias.reshape(784)
        log_p = log_p - F.binary_cross_entropy_with_logits(logits, flat.expand_as(logits), reduction="none").sum(-1)
        log_w = log_p - log_q
        return log_w if k > 1 else log_w.unsqueeze(0)

    def bound(self, x, objective, k):
        """Per point: the VAE bound (mean of k ELBO samples) or the IWAE bound with k samples."""
        log_w = self.log_weights(x, k)
        if objective == "vae":
            return log_w.mean(0)
        return torch.logsumexp(log_w, 0) - math.log(k)

    @torch.no_grad()
    def log_px(self, x, samples, chunk=500):
        """Importance-sampling estimate of log p(x) per point with ``samples`` draws, in chunks of draws."""
        out = []
        for start in range(0, len(x), 100):
            batch = x[start:start + 100]
            log_w = torch.cat([self.log_weights(batch, min(chunk, samples - s)) for s in range(0, samples, chunk)])
            out.append(torch.logsumexp(log_w, 0) - math.log(samples))
        return torch.cat(out)


def stage_ends(total_steps):
    """Where each stage of 3^i / 3280 of the run ends, in steps (written out again, not imported)."""
    ends, passes = [], 0
    for i in range(8):
        passes += 3 ** i
        ends.append(total_steps * passes // PAPER_PASSES)
    return ends


def train_reference(reference, data, row, passes, seed, rng_state, device, progress_every=600.0):
    layers, objective, k = row
    batches = DeviceBatches(data.train, BATCH_SIZE, seed=seed, dynamic_binarize=True)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=ADAM_EPS)
    ends = stage_ends(passes * len(batches))
    torch.set_rng_state(rng_state["torch"])
    if device.type == "cuda" and "cuda" in rng_state:
        torch.cuda.set_rng_state(rng_state["cuda"], device)
    step, started, last = 0, time.monotonic(), time.monotonic()
    for epoch in range(passes):
        total = torch.zeros((), device=device, dtype=torch.float64)
        for _, x in batches.epoch(epoch):
            stage = next(i for i, end in enumerate(ends) if step < end)
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * 10.0 ** (-stage / 7.0)
            loss = -reference.bound(x, objective, k).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total -= loss.detach()
            step += 1
        if time.monotonic() - last > progress_every or epoch + 1 == passes:
            last = time.monotonic()
            log(f"reference {row_name(row)}: pass {epoch + 1}/{passes}, train bound {total.item() / len(data.train):.3f} "
                f"({time.monotonic() - started:.0f} s)")
    return time.monotonic() - started


# --------------------------------------------------------------------------------------------------
# The toolkit


@contextlib.contextmanager
def recording_initialization(record):
    """While fit runs: keep the model (``record["lvm"]``) and, after its ``initialize``, its weights and
    the RNG state there.

    Nothing between that point and the first training step draws from the global generator, so
    the reference, started from the same weights and state, draws the same latents at every step.
    """
    build_model = pyro_lvm.api.build_model

    def build_and_record(*args, **kwargs):
        lvm = build_model(*args, **kwargs)
        record["lvm"] = lvm
        initialize = lvm.initialize

        def recorded(x):
            initialize(x)
            record["state"] = {k: v.detach().clone() for k, v in lvm.state_dict().items()}
            device = next(lvm.parameters()).device
            record["rng"] = {"torch": torch.get_rng_state()}
            if device.type == "cuda":
                record["rng"]["cuda"] = torch.cuda.get_rng_state(device)

        lvm.initialize = recorded
        return lvm

    pyro_lvm.api.build_model = build_and_record
    try:
        yield record
    finally:
        pyro_lvm.api.build_model = build_model


def fit_toolkit(data_file, out, row, passes, seed, device, cuda_graph):
    layers, objective, k = row
    num_train = 60000
    record = {}
    started = time.monotonic()
    with recording_initialization(record):
        run = pyro_lvm.fit(
            "vae", data=str(data_file), binarize="dynamic", out=out, hyperparameters={"stochastic_layers": layers},
            objective="elbo" if objective == "vae" else "iwae", particles=k, epochs=passes, batch_size=BATCH_SIZE,
            lr=1e-3, schedule="iwae", adam_betas=[0.9, 0.999], adam_eps=ADAM_EPS * num_train / BATCH_SIZE, seed=seed,
            device=str(device), cuda_graph=cuda_graph, progress=False,
            log=lambda m: log(f"pyro-lvm {row_name(row)}: {m}") if "epoch" not in m or _every(m, passes) else None)
    return run, record, time.monotonic() - started


def _every(message, passes):
    """Log about 20 of the epoch lines."""
    try:
        epoch = int(message.split()[1].split("/")[0])
    except (IndexError, ValueError):
        return True
    return epoch == passes or epoch % max(1, passes // 20) == 0


# --------------------------------------------------------------------------------------------------


def run_row(args, row):
    device = torch.device(args.device)
    out = Path(args.out) / row_name(row)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists; remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    data_file = protocol_data(args.data_dir, args.out)
    log(f"{row_name(row)}: {args.passes} passes of {60000 // BATCH_SIZE} steps, device {device}")

    run, record, toolkit_seconds = fit_toolkit(data_file, out / "pyro-lvm", row, args.passes, args.seed, device,
                                               args.cuda_graph)
    data = load_dataset(str(data_file), None, "dynamic").to(device)
    test = data.test[:args.eval_points]
    started = time.monotonic()
    toolkit = estimate_log_marginal(run.model, test, "is", num_samples=args.eval_samples, batch_size=100,
                                    seed=args.seed + 1).per_point.double()
    toolkit_eval = time.monotonic() - started
    result = {"row": row_name(row), "layers": row[0], "objective": row[1], "k": row[2], "passes": args.passes,
              "paper_passes": PAPER_PASSES, "paper_nll": PAPER.get(row), "eval_points": len(test),
              "eval_samples": args.eval_samples, "seed": args.seed, "device": _device_name(device),
              "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "commit": args.commit, "toolkit_nll": -toolkit.mean().item(),
              "toolkit_stderr": toolkit.std().item() / math.sqrt(len(test)),
              "toolkit_train_bound": run.metrics[-1]["train_elbo"], "toolkit_train_seconds": toolkit_seconds,
              "toolkit_eval_seconds": toolkit_eval, "cuda_graph": bool(args.cuda_graph)}
    log(f"pyro-lvm {row_name(row)}: test NLL {result['toolkit_nll']:.3f} +- {result['toolkit_stderr']:.3f}")

    if not args.no_reference:
        reference = ReferenceVAE(row[0]).to(device)
        reference.load_state_dict(record["state"])
        reference_seconds = train_reference(reference, data, row, args.passes, args.seed, record["rng"], device)
        started = time.monotonic()
        torch.manual_seed(args.seed + 1)
        ref = reference.log_px(test, args.eval_samples).double()
        difference = toolkit - ref
        # How far apart the two trainings ended, parameter by parameter (0 if they computed the same steps).
        final = run.model.state_dict()
        result["max_relative_parameter_difference"] = max_relative_difference(final, reference.state_dict())
        result.update({"reference_nll": -ref.mean().item(), "reference_stderr": ref.std().item() / math.sqrt(len(test)),
                       "reference_train_seconds": reference_seconds, "reference_eval_seconds": time.monotonic() - started,
                       # NLL(pyro-lvm) - NLL(reference), paired over the test points
                       "nll_difference": -difference.mean().item(),
                       "nll_difference_stderr": difference.std().item() / math.sqrt(len(test))})
        result["within_2_stderr"] = abs(result["nll_difference"]) <= 2 * result["nll_difference_stderr"]
        log(f"reference {row_name(row)}: test NLL {result['reference_nll']:.3f}; difference "
            f"{result['nll_difference']:+.3f} +- {result['nll_difference_stderr']:.3f}")
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def max_relative_difference(state, reference_state):
    """The largest over tensors of max |state - reference| / max |reference|: 0 for the same parameters."""
    return max(((state[name] - value).abs().max() / value.abs().max().clamp_min(1e-12)).item()
               for name, value in reference_state.items())


def _commit():
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def table(out):
    results = sorted((json.loads(p.read_text()) for p in Path(out).glob("*/result.json")),
                     key=lambda r: (r["layers"], r["objective"] != "vae", r["k"]))
    lines = ["| layers | objective | k | passes | test points | pyro-lvm NLL | reference NLL | difference (paired) | "
             "paper NLL (3280 passes) | pyro-lvm - paper |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ref = f"{r['reference_nll']:.2f} +- {r['reference_stderr']:.2f}" if "reference_nll" in r else "-"
        diff = (f"{r['nll_difference']:+.3f} +- {r['nll_difference_stderr']:.3f}" if "nll_difference" in r else "-")
        paper = r.get("paper_nll")
        above = f"{r['toolkit_nll'] - paper:+.2f}" if paper else "-"
        lines.append(f"| {r['layers']} | {r['objective'].upper()} | {r['k']} | {r['passes']} | {r['eval_points']} | "
                     f"{r['toolkit_nll']:.2f} +- {r['toolkit_stderr']:.2f} | {ref} | {diff} | "
                     f"{paper if paper else '-'} | {above} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent.parent / "shared" / "data"),
                        help="folder holding MNIST/raw (torchvision's layout)")
    parser.add_argument("--row", type=parse_row, action="append", metavar="LAYERS:OBJECTIVE:K",
                        help="a row of the table, like 1:vae:1 or 2:iwae:50 (repeatable; default: the paper's five)")
    parser.add_argument("--passes", type=int, default=PAPER_PASSES, help="passes over the data (default 3280, the paper's)")
    parser.add_argument("--eval-points", type=int, default=10000, help="the first M test images (default all 10,000)")
    parser.add_argument("--eval-samples", type=int, default=5000, help="importance samples per test image (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cuda-graph", action="store_true", help="pyro-lvm's steps as a replayed CUDA graph (GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-reference", action="store_true", help="train pyro-lvm only")
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--table", metavar="OUT", help="print the table of the results under OUT and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    torch.set_num_threads(args.threads)
    args.commit = _commit()  # the code this run imported, before anyone changes the checkout
    for row in args.row or list(PAPER):
        print(json.dumps(run_row(args, row)))


if __name__ == "__main__":
    main()
