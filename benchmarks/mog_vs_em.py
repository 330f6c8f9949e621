"""``pyro-lvm fit mog`` with its default options against scikit-learn's EM on the same training points.

For each data set and K: the training log-likelihood per point of ``pyro_lvm.fit("mog", ...)`` with
default options; of the same fit from the start the toolkit used before (one k-means++ start, the
clusters' moments, minibatches of 100, 20 epochs of Adam at 1e-3, constant rate: what issue 13
measured); and of scikit-learn's ``GaussianMixture(K, covariance_type="full", n_init=10)``, with its
default tolerance and run to convergence (``tol=1e-10``). Old Faithful as shipped; iris (4 features)
and wine (first 5 features) standardized, from scikit-learn's bundled copies.

    python benchmarks/mog_vs_em.py [--json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pyro_lvm

CASES = [("faithful", 2), ("faithful", 3), ("iris", 3), ("wine", 3)]
BEFORE = {"batch_size": 100, "epochs": 20, "lr": 1e-3, "schedule": "constant"}


def data_file(name, folder):
    if name == "faithful":
        return name
    from sklearn.datasets import load_iris, load_wine

    table = load_iris().data if name == "iris" else load_wine().data[:, :5]
    path = Path(folder) / f"{name}.npy"
    np.save(path, ((table - table.mean(0)) / table.std(0)).astype(np.float32))
    return str(path)


def train_log_likelihood(run):
    x = run.data.train.double()
    return run.model.double().log_marginal(x).mean().item(), x.numpy()


def main(argv=None):
    from sklearn.mixture import GaussianMixture

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, k in CASES:
            data = data_file(name, tmp)
            quiet = {"progress": False, "log": lambda message: None}
            started = time.perf_counter()
            run = pyro_lvm.fit("mog", data=data, out=Path(tmp) / f"{name}{k}", hyperparameters={"num_components": k},
                               **quiet)
            seconds = time.perf_counter() - started
            ours, x = train_log_likelihood(run)
            before = pyro_lvm.fit("mog", data=data, out=Path(tmp) / f"{name}{k}-before",
                                  hyperparameters={"num_components": k, "init_starts": 1, "init_em_iterations": 0},
                                  **BEFORE, **quiet)
            em = GaussianMixture(k, covariance_type="full", n_init=10, random_state=0).fit(x).score(x)
            converged = GaussianMixture(k, covariance_type="full", n_init=10, random_state=0, tol=1e-10,
                                        max_iter=100_000).fit(x).score(x)
            rows.append({"data": name, "k": k, "train_points": len(x), "fit_mog": ours,
                         "one_start_old_options": train_log_likelihood(before)[0], "sklearn_em": em,
                         "sklearn_em_converged": converged, "fit_seconds": round(seconds, 2)})
    if args.json:
        print(json.dumps(rows))
        return
    print("| data | K | train points | fit mog (defaults) | one start, old options | scikit-learn EM (n_init=10) | "
          "EM converged (tol 1e-10) | fit mog - EM | fit mog - EM converged | fit s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['data']} | {r['k']} | {r['train_points']} | {r['fit_mog']:.4f} | {r['one_start_old_options']:.4f} | "
              f"{r['sklearn_em']:.4f} | {r['sklearn_em_converged']:.4f} | {r['fit_mog'] - r['sklearn_em']:+.4f} | "
              f"{r['fit_mog'] - r['sklearn_em_converged']:+.4f} | {r['fit_seconds']} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
