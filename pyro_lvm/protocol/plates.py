"""Reading plates from Pyro messages, and the handler that scales a minibatch to the data set.

The *data plate* is the plate that holds the observed sites (its name and dim are read from a trace,
:mod:`pyro_lvm.protocol.inspection`). It may have a fixed size (``pyro.plate("data", len(x))``), no
size (``pyro.plate("data")``, sized by broadcasting), or subsample itself
(``pyro.plate("data", N, subsample_size=B)``), in which case Pyro already scales its sites by N/B.

:class:`DataPlateScale` makes a minibatch of B of the N training points estimate the full-data
objective: the sites of the data plate get the scale N/B in total, whatever the plate did itself
(so a self-subsampling plate of the N training points is not scaled a second time, and a size-less
plate is sized by the points it sees), and global sites keep theirs. :class:`EvaluationScale`
gives the per-batch share of the same objective that evaluation sums: local sites unscaled, global
sites (their prior and guide terms, the KL of the global latents) charged ``b / N`` for a batch of
b points, so that the sum over any split charges the global KL once per N training points.
"""

import pyro.poutine as poutine

# Plates that objectives and estimators add around a program (vectorized particles, AIS chains):
# never the data plate, never a plate of the program.
PARTICLE_PLATES = frozenset({"particles", "num_particles_vectorized", "chains", "_diagnostic_particles"})


def plate_frame(site, name):
    """The frame of plate ``name`` in a message or trace site, or None."""
    for frame in site["cond_indep_stack"]:
        if frame.name == name:
            return frame
    return None


def program_frames(site):
    """The vectorized plates of the program itself (particle plates left out), outermost first."""
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name not in PARTICLE_PLATES]


def subsampled_by_plate(frame):
    """N/B for a plate that subsamples B of N points itself; 1 for a fixed or size-less plate."""
    full = getattr(frame, "full_size", None)
    if full is None or frame.size is None or frame.size <= 0 or full <= 0 or full == frame.size:
        return 1.0
    return full / frame.size


def batch_points(frame, msg, fallback=None):
    """How many points of the data plate a site holds: the plate's size, or for a size-less plate
    the size of the site's batch shape at the plate's dim (what broadcasting made it)."""
    if frame.size is not None and frame.size > 0:
        return frame.size
    fn = msg.get("fn")
    shape = getattr(fn, "batch_shape", None)
    if shape is not None and frame.dim is not None and len(shape) >= -frame.dim and shape[frame.dim] > 1:
        return shape[frame.dim]
    value = msg.get("value")
    if value is not None and hasattr(fn, "event_shape"):
        batch = value.shape[:value.dim() - len(fn.event_shape)]
        if len(batch) >= -frame.dim:
            return batch[frame.dim]
    return fallback() if callable(fallback) else fallback


class DataPlateScale(poutine.messenger.Messenger):
    """Scale the data plate's sites so that a minibatch estimates the objective on ``num_data`` points.

    :param num_data: N, the size of the training set.
    :param data_plate: the data plate's name (read from a trace: ``ModelInfo.data_plate.name``).
    :param points: optional ``() -> int``, the points of the current batch, for a size-less plate
        whose sites do not show it in their shape.
    """

    def __init__(self, num_data, data_plate="data", points=None):
        super().__init__()
        self.num_data = num_data
        self.data_plate = data_plate
        self.points = points

    def _local_factor(self, frame, msg):
        points = batch_points(frame, msg, self.points)
        if not points:
            return 1.0
        return (self.num_data / points) / subsampled_by_plate(frame)

    def _global_factor(self, msg):
        return 1.0

    def _process_message(self, msg):
        if msg["type"] != "sample":
            return
        frame = plate_frame(msg, self.data_plate)
        factor = self._global_factor(msg) if frame is None else self._local_factor(frame, msg)
        if factor != 1.0:
            msg["scale"] = msg["scale"] * factor


class EvaluationScale(DataPlateScale):
    """One batch's share of the training objective: local sites unscaled (a self-subsampling plate's
    N/B undone), global sites scaled by ``points / num_data`` (see the module docstring)."""

    def __init__(self, num_data, points, data_plate="data"):
        super().__init__(num_data, data_plate)
        self.batch_size = points

    def _local_factor(self, frame, msg):
        return 1.0 / subsampled_by_plate(frame)

    def _global_factor(self, msg):
        return self.batch_size / self.num_data
