"""Where two trainings of the IWAE protocol part: pyro-lvm against the reference, beside perturbed references.

``iwae_mnist.py`` trains a row with pyro-lvm and with the hand-written reference from the same weights,
batches and draws. If the two computed the same steps to rounding, they would part as fast as two
references part when one starts from the weights times (1 + 1e-7 noise): where a training is chaotic
at the size of float32 rounding (IWAE k=5 is), that spread, and not the standard error paired over test
points, is the yardstick for pyro-lvm against the reference. This script follows all three step by
step (``--part toolkit``, ``reference``, ``perturbed`` with ``--noise-seed``): it snapshots the parameters at
``--at`` steps (Adam steps are counted by wrapping ``torch.optim.Adam.step``; training stops at the
last) and prints, at each, the relative distance ||a - b|| / ||b|| of pyro-lvm from the reference and of
the perturbed reference from the reference. A systematic difference in the toolkit's step shows as a
distance that grows faster than the perturbed one's, or jumps at one step. Each trainer runs in its own
process (the reference parts wait for the toolkit's, which writes the initial weights and RNG state at
its first step); ``--part compare`` prints the distances, ``--part evaluate`` estimates each final
model's test log p(x) (the reference's importance sampling and pyro-lvm's ``is``, common random numbers)
and ``--part summary`` prints the NLLs, their paired differences from the reference's and the spread of
the perturbed references. Every part takes the same ``--row`` and ``--passes``. Run from the repository root:

    python benchmarks/reproduce/trajectories.py --part toolkit --row 1:iwae:5 --passes 20 --out OUT
    python benchmarks/reproduce/trajectories.py --part reference --out OUT &
    python benchmarks/reproduce/trajectories.py --part perturbed --noise-seed 1 --out OUT   # 2, 3, ...
    python benchmarks/reproduce/trajectories.py --part compare --out OUT
    python benchmarks/reproduce/trajectories.py --part evaluate --names toolkit reference perturbed-1 --out OUT
    python benchmarks/reproduce/trajectories.py --part summary --out OUT
"""
import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("iwae_mnist", HERE / "iwae_mnist.py")
iwae_mnist = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(iwae_mnist)

DEFAULT_AT = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 3000, 6000, 12000, 30000, 60000]


class _Stop(BaseException):
    """Raised from the last snapshot's step: not an ``Exception``, so nothing on the way converts it."""


def _snapshotting(at, get_state, snapshots, before_first=None):
    """Wrap ``torch.optim.Adam.step`` so that after step s in ``at`` the parameters are kept."""
    original = torch.optim.Adam.step
    count = [0]

    def step(self, *args, **kwargs):
        if count[0] == 0 and before_first is not None:
            before_first()
        out = original(self, *args, **kwargs)
        count[0] += 1
        if count[0] in at:
            snapshots[count[0]] = {k: v.detach().clone() for k, v in get_state().items()}
            if count[0] == max(at):
                raise _Stop()
        return out

    torch.optim.Adam.step = step


def run_toolkit(args, out):
    data_file = iwae_mnist.protocol_data(args.data_dir, out)
    record, snapshots = {}, {}

    def save_start():  # at the first step, so that the references can start beside the toolkit
        torch.save({"state": record["state"], "rng": record["rng"]}, out / ".init.pt")
        (out / ".init.pt").replace(out / "init.pt")

    _snapshotting(set(args.at), lambda: record["lvm"].state_dict(), snapshots, save_start)
    try:
        with iwae_mnist.recording_initialization(record):
            iwae_mnist.fit_toolkit(data_file, out / "pyro-lvm", args.row, args.passes, args.seed, torch.device("cpu"),
                                   cuda_graph=False)
    except _Stop:
        pass
    torch.save(snapshots, out / "toolkit.pt")


def run_reference(args, out, perturbed):
    from pyro_lvm.data import load_dataset

    while not (out / "init.pt").exists():  # written by the toolkit's part at its first step
        time.sleep(2)
    init = torch.load(out / "init.pt")
    data = load_dataset(str(iwae_mnist.protocol_data(args.data_dir, out)), None, "dynamic")
    reference = iwae_mnist.ReferenceVAE(args.row[0])
    reference.load_state_dict(init["state"])
    if perturbed:
        noise = torch.Generator().manual_seed(args.noise_seed)
        with torch.no_grad():
            for p in reference.parameters():
                p.mul_(1 + args.perturbation * torch.randn(p.shape, generator=noise))
    snapshots = {}
    _snapshotting(set(args.at), reference.state_dict, snapshots)
    try:
        iwae_mnist.train_reference(reference, data, args.row, args.passes, args.seed, init["rng"], torch.device("cpu"))
    except _Stop:
        pass
    torch.save(snapshots, out / (f"perturbed-{args.noise_seed}.pt" if perturbed else "reference.pt"))


def _distance(a, b):
    diff = sum(((a[k] - b[k]).double() ** 2).sum() for k in b)
    norm = sum((b[k].double() ** 2).sum() for k in b)
    return (diff / norm).sqrt().item(), iwae_mnist.max_relative_difference(a, b)


def compare(out):
    reference = torch.load(out / "reference.pt")
    others = {path.stem: torch.load(path) for path in sorted(out.glob("*.pt"))
              if path.stem == "toolkit" or path.stem.startswith("perturbed")}
    rows = []
    print(f"{'step':>6s}" + "".join(f" {name + ' rel L2':>18s} {name + ' max rel':>18s}" for name in others))
    for step in sorted(reference):
        row = {"step": step}
        line = f"{step:6d}"
        for name, snaps in others.items():
            if step in snaps:
                l2, worst = _distance(snaps[step], reference[step])
                row[name] = {"relative_l2": l2, "max_relative": worst}
                line += f" {l2:18.3e} {worst:18.3e}"
        rows.append(row)
        print(line)
    (out / "trajectories.json").write_text(json.dumps(rows, indent=1) + "\n")


def evaluate(args, out):
    """Test log p(x) per point of each trainer's last snapshot: by the reference's importance sampling
    and by pyro-lvm's ``is``, each with the same random numbers for every model (common random
    numbers, so that a paired difference is the models' and not the draws')."""
    from pyro_lvm.data import load_dataset
    from pyro_lvm.estimators import estimate_log_marginal
    from pyro_lvm.protocol import build_model, load_model_class

    data = load_dataset(str(iwae_mnist.protocol_data(args.data_dir, out)), None, "dynamic")
    test = data.test[:args.eval_points]
    for name in args.names:
        snapshots = torch.load(out / f"{name}.pt")
        step = max(snapshots)
        state = snapshots[step]
        reference = iwae_mnist.ReferenceVAE(args.row[0])
        reference.load_state_dict(state)
        torch.manual_seed(args.seed + 1)
        by_reference = reference.log_px(test, args.eval_samples).double()
        lvm = build_model(load_model_class("vae"), (1, 28, 28), {"stochastic_layers": args.row[0]})
        lvm.load_state_dict(state)
        lvm.eval()
        by_toolkit = estimate_log_marginal(lvm, test, "is", num_samples=args.eval_samples, batch_size=100,
                                           seed=args.seed + 1).per_point.double()
        torch.save({"reference_is": by_reference, "toolkit_is": by_toolkit, "step": step}, out / f"eval-{name}.pt")
        iwae_mnist.log(f"{name}: test NLL {-by_reference.mean().item():.3f} (reference's is), "
                       f"{-by_toolkit.mean().item():.3f} (pyro-lvm's is)")


def summary(out):
    """Each model's test NLL and its paired difference from the reference's, by each estimator."""
    evals = {path.stem[len("eval-"):]: torch.load(path) for path in sorted(out.glob("eval-*.pt"))}
    base = evals["reference"]
    rows = {}
    for name, e in evals.items():
        row = {"step": e["step"]}
        for estimator in ("reference_is", "toolkit_is"):
            d = base[estimator] - e[estimator]  # NLL(name) - NLL(reference), per point
            row[estimator] = {"nll": -e[estimator].mean().item(), "nll_minus_reference": d.mean().item(),
                              "paired_stderr": d.std().item() / math.sqrt(len(d))}
        rows[name] = row
        print(f"{name:14s} step {e['step']:6d}  " + "  ".join(
            f"{est}: NLL {r['nll']:.3f}, minus reference {r['nll_minus_reference']:+.3f} +- {r['paired_stderr']:.3f}"
            for est, r in row.items() if est != "step"))
    spread = [r["reference_is"]["nll_minus_reference"] for n, r in rows.items() if n.startswith("perturbed")]
    if len(spread) > 1:
        mean = sum(spread) / len(spread)
        sd = math.sqrt(sum((s - mean) ** 2 for s in spread) / (len(spread) - 1))
        print(f"perturbed references minus the reference ({len(spread)}): mean {mean:+.3f}, sd {sd:.3f}")
        rows["perturbed_spread"] = {"n": len(spread), "mean": mean, "sd": sd}
    (out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", required=True,
                        choices=("toolkit", "reference", "perturbed", "compare", "evaluate", "summary"))
    parser.add_argument("--data-dir", default=str(HERE.parent.parent.parent / "shared" / "data"))
    parser.add_argument("--row", type=iwae_mnist.parse_row, default=(1, "iwae", 5), metavar="LAYERS:OBJECTIVE:K")
    parser.add_argument("--passes", type=int, default=20,
                        help="the schedule's length (training stops at the last --at step)")
    parser.add_argument("--at", type=int, nargs="+", default=DEFAULT_AT, help="steps at which to snapshot")
    parser.add_argument("--perturbation", type=float, default=1e-7)
    parser.add_argument("--noise-seed", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--names", nargs="+", default=["toolkit", "reference"],
                        help="--part evaluate: whose last snapshots")
    parser.add_argument("--eval-points", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=5000)
    parser.add_argument("--out", default=str(HERE / "out" / "trajectories"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "toolkit":
        run_toolkit(args, out)
    elif args.part == "compare":
        compare(out)
    elif args.part == "evaluate":
        evaluate(args, out)
    elif args.part == "summary":
        summary(out)
    else:
        run_reference(args, out, args.part == "perturbed")


if __name__ == "__main__":
    main()
