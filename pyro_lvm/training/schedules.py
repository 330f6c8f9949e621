"""Learning-rate schedules, as :mod:`torch.optim.lr_scheduler` objects stepped once per training step.

With ``lr`` the base rate, ``s`` the global step, ``S`` the steps of one epoch and ``T = epochs * S``
the steps of the whole run:

| name | learning rate at step ``s`` | torch scheduler |
| --- | --- | --- |
| ``constant`` | ``lr`` | none |
| ``step`` | ``lr * decay ** floor(s / (every * S))``: times ``decay`` every ``every`` epochs | ``StepLR`` |
| ``exponential`` | ``lr * decay ** (s / S)``: times ``decay`` per epoch, smoothly | ``ExponentialLR`` |
| ``cosine`` | ``lr_min + (lr - lr_min) (1 + cos(pi s / T)) / 2`` (Loshchilov & Hutter 2017, no restarts) | ``CosineAnnealingLR`` |
| ``iwae`` | ``lr * 10 ** (-i / 7)`` in stage ``i = 0..7``, stage ``i`` lasting ``3^i / 3280`` of the run | ``LambdaLR`` |

``iwae`` is the schedule of Burda, Grosse & Salakhutdinov (2016), "Importance Weighted
Autoencoders", Section 5: 3^i passes over the data at learning rate 0.001 * 10^(-i/7), i = 0..7,
3280 passes in all. With ``--epochs 3280 --lr 0.001`` it is the paper's schedule exactly (the stages
end after epochs 1, 4, 13, 40, 121, 364, 1093); fewer epochs shorten every stage in proportion
(stage boundaries are then counted in steps, not whole epochs).

A scheduler is a function of the step count and of its own state, which the checkpoint holds, so
``--resume`` continues a schedule exactly. ``cosine`` and ``iwae`` are laid out over the run's
``T`` steps; a resume that changes ``--epochs`` would change the rates already used, and is refused.
"""

import math

import torch

from ..errors import UserError

SCHEDULES = ("constant", "step", "exponential", "cosine", "iwae")
# Schedules whose rate at a step depends on the length of the whole run.
DEPENDS_ON_LENGTH = ("cosine", "iwae")
DEFAULT_DECAY = {"step": 0.1, "exponential": 0.95}
DEFAULT_STEP_EPOCHS = 10

IWAE_STAGES = 8
IWAE_PASSES = sum(3 ** i for i in range(IWAE_STAGES))  # 3280


def iwae_stage_ends(total_steps):
    """The step at which each of the 8 stages of the ``iwae`` schedule ends (the last is ``total_steps``)."""
    ends, passes = [], 0
    for i in range(IWAE_STAGES):
        passes += 3 ** i
        # Integer arithmetic: with total_steps = 3280 * S the ends are whole epochs exactly.
        ends.append(total_steps * passes // IWAE_PASSES)
    return ends


class IWAEFactor:
    """``step -> 10 ** (-i / 7)`` for the stage ``i`` that ``step`` falls in (the ``LambdaLR`` factor)."""

    def __init__(self, total_steps):
        self.total_steps = int(total_steps)
        self.ends = iwae_stage_ends(self.total_steps)

    def stage(self, step):
        return next((i for i, end in enumerate(self.ends) if step < end), IWAE_STAGES - 1)

    def __call__(self, step):
        return 10.0 ** (-self.stage(step) / 7.0)


def resolve_schedule_options(config):
    """``config`` with the schedule's options checked and their defaults filled in (a new dict)."""
    config = dict(config)
    name = config.get("schedule", "constant")
    if name not in SCHEDULES:
        raise UserError(f"unknown --schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    decay = config.get("lr_decay")
    if name in DEFAULT_DECAY:
        decay = DEFAULT_DECAY[name] if decay is None else decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise UserError(f"--lr-decay must be a number in (0, 1], got {decay!r}")
        config["lr_decay"] = float(decay)
    elif decay is not None:
        raise UserError(f"--lr-decay applies to --schedule step or exponential, not {name!r}")
    every = config.get("lr_step")
    if name == "step":
        every = DEFAULT_STEP_EPOCHS if every is None else every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UserError(f"--lr-step must be a whole number of epochs >= 1, got {every!r}")
        config["lr_step"] = every
    elif every is not None:
        raise UserError(f"--lr-step applies to --schedule step, not {name!r}")
    lr_min = config.get("lr_min")
    if name == "cosine":
        lr_min = 0.0 if lr_min is None else lr_min
        if isinstance(lr_min, bool) or not isinstance(lr_min, (int, float)) or not math.isfinite(lr_min) \
                or not 0 <= lr_min <= config["lr"]:
            raise UserError(f"--lr-min must be a number between 0 and --lr ({config['lr']}), got {lr_min!r}")
        config["lr_min"] = float(lr_min)
    elif lr_min is not None:
        raise UserError(f"--lr-min applies to --schedule cosine, not {name!r}")
    return config


def make_scheduler(optimizer, config, steps_per_epoch):
    """The scheduler of ``config["schedule"]`` for ``optimizer`` (``None`` for ``constant``).

    Call its ``step()`` after every training step (skipped steps included), so that the rate is a
    function of the global step.
    """
    name = config.get("schedule", "constant")
    total_steps = int(config["epochs"]) * int(steps_per_epoch)
    scheduler = torch.optim.lr_scheduler
    if name == "constant":
        return None
    if name == "step":
        return scheduler.StepLR(optimizer, step_size=config["lr_step"] * steps_per_epoch, gamma=config["lr_decay"])
    if name == "exponential":
        return scheduler.ExponentialLR(optimizer, gamma=config["lr_decay"] ** (1.0 / steps_per_epoch))
    if name == "cosine":
        return scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=config["lr_min"])
    if name == "iwae":
        return scheduler.LambdaLR(optimizer, IWAEFactor(total_steps))
    raise UserError(f"unknown --schedule {name!r}; choose from {', '.join(SCHEDULES)}")
