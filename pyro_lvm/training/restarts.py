"""``fit --restarts N``: N initialisations of one run, the best by validation bound kept.

The objectives of latent variable models have many local optima (a mixture's components can settle
on different clusters; a VAE's units can switch off in one run and not in another), and where a run
ends depends on its initialisation. Restart ``r`` (``r = 0 .. N-1``) is the whole fit with seed
``seed + r`` -- a new random initialisation, the model's ``initialize`` and a new stream of latent
draws -- in its own run directory ``RUN/restarts/r`` (a complete run: ``pyro-lvm evaluate
RUN/restarts/r`` works, and restart 0 is exactly ``fit --seed SEED``). When all have finished, the
restart whose checkpoint has the highest validation bound per point is kept: its ``checkpoint.pt``,
``best.pt`` and ``metrics.jsonl`` are copied (atomically) into ``RUN``, and ``RUN/restarts.json`` lists
every restart's seed, bounds and which one was kept. The checkpoint scored is the one the commands
read (:func:`pyro_lvm.runs.choose_checkpoint`: the best one with early stopping, else the last), so
the selection never looks at the test split. Without a validation split the final training bound
decides, and ``restarts.json`` says so.

``--resume`` continues the restart that was interrupted and starts those not yet begun.
"""

import math
from pathlib import Path

from ..runs import (BEST_CHECKPOINT, LAST_CHECKPOINT, atomic_write_bytes, atomic_write_json, choose_checkpoint,
                    load_checkpoint, read_jsonl)


def restart_dir(run_dir, restart):
    return Path(run_dir) / "restarts" / str(restart)


def restart_config(config, restart):
    """The configuration of restart ``restart``: the run's, with seed ``seed + restart`` and no restarts."""
    return {**config, "seed": int(config["seed"]) + restart, "restarts": 1}


def _score(sub, config):
    """``(score, selected_by, record)`` of a finished restart: its chosen checkpoint's validation bound."""
    which, path = choose_checkpoint(sub, config)
    metrics = read_jsonl(sub / "metrics.jsonl")
    epoch = int(load_checkpoint(path).get("epoch", 0))
    record = next((m for m in metrics if m.get("epoch") == epoch), metrics[-1] if metrics else {})
    valid = record.get("valid_elbo", math.nan)
    if isinstance(valid, (int, float)) and math.isfinite(valid):
        return float(valid), "valid_elbo", record, which
    train = record.get("train_elbo", -math.inf)
    return float(train) if math.isfinite(train) else -math.inf, "train_elbo", record, which


def select_restart(run_dir, config):
    """Copy the best restart's checkpoints and metrics into ``run_dir``; returns its summary record."""
    run_dir = Path(run_dir)
    rows = []
    for r in range(int(config["restarts"])):
        sub = restart_dir(run_dir, r)
        score, selected_by, record, which = _score(sub, restart_config(config, r))
        rows.append({"restart": r, "seed": int(config["seed"]) + r, "score": score, "selected_by": selected_by,
                     "checkpoint": which, "epoch": record.get("epoch"), "train_elbo": record.get("train_elbo"),
                     "valid_elbo": record.get("valid_elbo")})
    # Bounds from validation splits are comparable only with each other: rank by validation when any has one.
    by_valid = [row for row in rows if row["selected_by"] == "valid_elbo"]
    chosen = max(by_valid or rows, key=lambda row: row["score"])
    for row in rows:
        row["chosen"] = row is chosen
    source = restart_dir(run_dir, chosen["restart"])
    for name in (BEST_CHECKPOINT, "metrics.jsonl", LAST_CHECKPOINT):  # the last checkpoint last: it marks the end
        if (source / name).is_file():
            atomic_write_bytes(run_dir / name, (source / name).read_bytes())
        elif (run_dir / name).is_file():
            (run_dir / name).unlink()
    atomic_write_json(run_dir / "restarts.json", {"chosen": chosen["restart"], "selected_by": chosen["selected_by"],
                                                  "restarts": rows})
    return chosen
