"""Training: fitting a model with stochastic variational inference.

| module | what |
| --- | --- |
| :mod:`.loop` | the SVI training loop (:func:`train`), one readable loop |
| :mod:`.schedules` | learning-rate schedules, ``torch.optim.lr_scheduler`` objects stepped per step |
| :mod:`.checkpoints` | the best-validation checkpoint and early stopping |
| :mod:`.restarts` | ``fit --restarts N``: N initialisations, the best by validation bound kept |
| :mod:`.fast` | the exact fast path of the objectives for fully reparameterized models |
| :mod:`.cuda_graph` | ``fit --cuda-graph``: one step captured as a CUDA graph and replayed |
| :mod:`.distributed` | data-parallel ``fit`` and sharded ``evaluate`` over ``torchrun``'s ranks |
| :mod:`.rng` | random-number state: checkpointed, restored, forked |

Layering: this package uses the protocol, data, objectives, estimators and the run directory
(:mod:`pyro_lvm.runs`); none of those imports it. Device resolution is :mod:`pyro_lvm.device`.
"""

from .loop import ON_NAN, TrainingDiverged, make_optimizer, make_step_loss, take_step, train, with_cuda_graph

__all__ = ["ON_NAN", "TrainingDiverged", "make_optimizer", "make_step_loss", "take_step", "train", "with_cuda_graph"]
