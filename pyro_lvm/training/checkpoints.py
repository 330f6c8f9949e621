"""The best-validation checkpoint and early stopping, both decided by the validation bound.

After every epoch the training loop computes the objective's bound per point on the validation
split (with a fixed seed, so epochs are compared on the same random numbers). :class:`ValidationTracker`
keeps the best value seen so far: when an epoch beats it by more than ``min_delta`` nats per point, the
model's weights are written to ``RUN/best.pt`` (atomically, as :func:`pyro_lvm.runs.save_checkpoint`
writes every checkpoint), beside ``RUN/checkpoint.pt``, the last state, which ``--resume`` continues.
With ``patience = P > 0``, training stops after P epochs in a row without such an improvement
(early stopping, Prechelt 1998). The tracker's state is part of the last checkpoint, so a resumed run
makes the same decisions as one that was never interrupted.

Which checkpoint the commands read (``--checkpoint``, :func:`pyro_lvm.runs.choose_checkpoint`): ``best`` for a run fit
with early stopping (the stop was decided by the validation bound, and the best checkpoint is the model
it selected, as Keras's ``restore_best_weights`` and Lightning's ``ckpt_path="best"`` give), ``last``
otherwise (the model after the epochs that were asked for, the one ``metrics.jsonl`` ends with).
Neither choice looks at the test split.
"""

import math
from pathlib import Path

from ..runs import BEST_CHECKPOINT, save_checkpoint

BEST = BEST_CHECKPOINT


class ValidationTracker:
    """Best validation bound so far, the best checkpoint, and the early-stopping count."""

    def __init__(self, run_dir, patience=0, min_delta=0.0, write=True):
        self.path = Path(run_dir) / BEST
        self.patience, self.min_delta, self.write = int(patience or 0), float(min_delta or 0.0), write
        self.best, self.best_epoch, self.bad_epochs, self.stopped = -math.inf, 0, 0, False

    def state(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "stopped": self.stopped}

    def load_state(self, state):
        if state:
            self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
            self.bad_epochs, self.stopped = int(state["bad_epochs"]), bool(state["stopped"])

    def update(self, valid, epoch, global_step, model_state):
        """Record epoch ``epoch``'s validation bound; write the best checkpoint when it improved.

        Returns True when training should stop (patience exhausted). A NaN bound (no validation
        split) changes nothing.
        """
        if not math.isfinite(valid):
            return False
        if valid > self.best + self.min_delta or not math.isfinite(self.best):
            self.best, self.best_epoch, self.bad_epochs = float(valid), int(epoch), 0
            if self.write:
                save_checkpoint(self.path, {"model": model_state, "epoch": int(epoch), "global_step": int(global_step),
                                            "valid_elbo": float(valid)})
        else:
            self.bad_epochs += 1
        self.stopped = self.patience > 0 and self.bad_epochs >= self.patience
        return self.stopped
