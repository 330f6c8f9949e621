"""The model protocol: how pyro-lvm finds, builds, reads and calls a user's Pyro program.

A program is a Pyro model/guide pair as Pyro users write it: a class with ``model`` and ``guide``
(``PyroModule``, a plain ``nn.Module`` with ``pyro.module``, any class) or a file with ``model`` and
``guide`` functions. Everything else is read from Pyro traces. See ``docs/ARCHITECTURE.md``.

| module | what |
| --- | --- |
| :mod:`.loading` | zoo names, ``file.py[:Name]``, ``pkg.mod[:Name]``; errors in the user's file |
| :mod:`.building` | hyperparameters (constructor defaults), ``data_shape``, :func:`build_model` |
| :mod:`.program` | :class:`Program`: one calling convention, one parameter set, batches, sampling |
| :mod:`.inspection` | :class:`ModelInfo` from traces: observed sites, data plate, latents |
| :mod:`.plates` | reading plates; :class:`DataPlateScale`, the minibatch scale |
"""

from .building import build_model, construct, hyperparameters, resolve_hyperparameters, takes_data_shape
from .inspection import (DataPlate, ModelInfo, ObservedSite, SiteInfo, as_program, check_support, inspect_model,
                         materialize, observed_values)
from .loading import (ProgramFunctions, load_model_class, register_user_source, split_model_spec, user_code_error,
                      user_frame, zoo_dir, zoo_models)
from .plates import PARTICLE_PLATES, DataPlateScale, EvaluationScale, plate_frame, program_frames
from .program import Program, SubsampleBatch, SubsampleBatches

__all__ = ["DataPlate", "DataPlateScale", "EvaluationScale", "ModelInfo", "ObservedSite", "PARTICLE_PLATES",
           "Program", "ProgramFunctions", "SiteInfo", "SubsampleBatch", "SubsampleBatches", "as_program",
           "build_model", "check_support", "construct", "hyperparameters", "inspect_model", "load_model_class",
           "materialize", "observed_values", "plate_frame", "program_frames", "register_user_source",
           "resolve_hyperparameters", "split_model_spec", "takes_data_shape", "user_code_error", "user_frame", "zoo_dir", "zoo_models"]
