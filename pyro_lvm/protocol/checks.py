"""What ``fit`` checks about a program before it creates the run directory, and the clean-up when a
fit fails before its first checkpoint.

A refused fit leaves nothing behind: every check here runs before ``RUN/`` exists, and a fit that
the program itself stops before any checkpoint (an error in the model's code at the first step)
removes the directory it created.
"""

import shutil
from pathlib import Path

import torch

from ..errors import UserError
from .loading import user_code_error
from .plates import DataPlateScale


def check_fit(program, cfg, train, distributed=False):
    """Refuse a fit that this program cannot do, with the fix (``cfg``: the fit options)."""
    info = program.info
    if info.coverage_problem:
        raise UserError(info.coverage_problem)
    for site in info.latent_sites:
        if not site.in_guide and site.enumerated_in != "model":
            fix = "mark it for enumeration with infer={'enumerate': 'parallel'}" if site.discrete else "sample it in the guide"
            raise UserError(f"latent site {site.name!r} is in {program.program_name}.model but the guide does not "
                            f"sample it (Pyro would draw it from the prior, and the objective would not be an "
                            f"ELBO); {fix}")
    if not any(p.requires_grad for p in program.parameters()):
        raise UserError(f"{program.program_name} has no parameters to fit (no nn.Parameter, PyroParam or "
                        f"pyro.param in model or guide); add some, or evaluate the model without fitting")
    if info.per_point_guide and not program.subsampling and len(train) > cfg["batch_size"]:
        raise UserError(f"the guide of {program.program_name} keeps one parameter per data point "
                        f"({', '.join(info.per_point_parameters[:3])}), which minibatches of x cannot index; "
                        f"fit on all the data at once (--batch-size {len(train)}), or let the model pick its "
                        f"points, pyro.plate('{info.data_plate.name}', len(x), subsample_size=B) with x[indices], "
                        f"or use an amortized guide")
    if distributed and program.subsampling:
        raise UserError(f"the data plate of {program.program_name} subsamples itself, which --distributed does "
                        f"not shard; fit it in one process")


def preflight(objective, program, probe, num_train, device):
    """One evaluation of the objective on ``probe`` (forked RNG, no gradient): what the program or
    the objective refuses at the first step is refused now, before anything is written."""
    scale = DataPlateScale(num_train, program.info.data_plate.name, program.current_points)
    devices = [device] if torch.device(device).type == "cuda" else []
    was_training = program.training
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        program.eval()  # a probe, like inspection's: not a training step of the program
        try:
            objective.loss(scale(program.model), scale(program.guide), probe)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001
            blamed = user_code_error(err, f"while computing the {type(objective).__name__} of "
                                          f"{program.program_name}")
            if blamed is None:
                raise
            raise blamed from err
        finally:
            program.train(was_training)


def remove_failed_run(out, err, keep=(".lock",)):
    """Take back the files of a run that the user's input stopped (a :class:`UserError` or an error in
    the model's code) before its first checkpoint: nothing there to resume. Returns whether it did
    (the caller then removes the directory itself, as for a fit refused before it began)."""
    out = Path(out)
    if (out / "checkpoint.pt").exists() or not (isinstance(err, UserError) or user_code_error(err) is not None):
        return False
    for entry in out.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return True
