"""One training step's forward and backward pass, captured once as a CUDA graph and replayed.

On a GPU a VAE step of the IWAE paper's size is bound by the host, not the device: Python walks the
Pyro program, the distributions and autograd, launching a hundred or more small kernels, each of
which takes the GPU microseconds. A CUDA graph (``torch.cuda.CUDAGraph``) records those kernels
once, for a fixed batch shape, and replays them with one launch; the Python that produced them does
not run again. What the step computes is unchanged:

- the same kernels on the same tensors: the parameters and their ``.grad`` tensors are the static
  memory the graph reads and writes, and each batch is copied into a static input first;
- the same random numbers: PyTorch's CUDA generator is graph-safe, each replay draws from the
  Philox stream at the generator's current offset and advances it, as the eager kernels would;
- the optimizer step, the finiteness check of the loss and the running sums stay outside the
  graph, exactly as in the eager loop, so ``--on-nan`` and checkpoints behave as before.

The wrapped loss is the fast path's (:class:`pyro_lvm.training.fast.FastObjective`), whose Python does the
same thing on every call for a given batch shape; Pyro's own objectives call ``.item()`` inside
the step and cannot be captured. Batches of another shape (the short last batch of an epoch) run
eagerly, with their gradients written into the same ``.grad`` tensors. If the capture fails (a
model that synchronizes with the host, say) the step falls back to the eager fast path with a
warning.

Graphs are opt-in (``fit --cuda-graph``, ``pyro_lvm.fit(..., cuda_graph=True)``) because replay is
exact only for a program that does the same thing at every step: Python state the model or guide
changes between calls (a step counter, a temperature kept in an attribute) is frozen at its value
during the capture. Zoo models qualify. ``PYRO_LVM_CUDA_GRAPH=0`` turns graphs off for a run that
asked for them.

``tests/test_cuda.py`` checks that a graphed fit trains the same parameters as the eager fit.
"""

import numbers
import os
import warnings

import torch
from torch.overrides import TorchFunctionMode


class _ScalarsOnDevice(TorchFunctionMode):
    """``torch.tensor(3.0, device=cuda)`` as a fill kernel instead of a host-to-device copy.

    torch.distributions turns Python numbers into tensors that way (``Normal(loc, 1.0)``), and a
    copy from pageable host memory cannot be captured. ``torch.full`` writes the same value on the
    device; the value is a constant of the program, captured like the rest of it.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and len(args) == 1 and isinstance(args[0], numbers.Number) \
                and not isinstance(args[0], complex) and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]).type == "cuda" and not kwargs.get("requires_grad", False):
            value = args[0]
            dtype = kwargs.get("dtype") or (torch.bool if isinstance(value, bool) else torch.int64
                                            if isinstance(value, numbers.Integral) else torch.get_default_dtype())
            return torch.full((), value, dtype=dtype, device=kwargs["device"])
        return func(*args, **kwargs)


_STREAM_MISMATCH = ".*AccumulateGrad node's stream does not match.*"


class GraphedStepLoss:
    """``loss(batch)`` that also leaves the gradients in ``p.grad`` (``computes_gradients = True``).

    :param loss_fn: ``f(x) -> scalar loss``, free of host synchronization for a fixed batch shape.
    :param lvm: the module whose parameters the loss depends on.
    """

    computes_gradients = True

    def __init__(self, loss_fn, lvm, warmup=2):
        self.loss_fn, self.lvm, self.warmup = loss_fn, lvm, warmup
        self.params = [p for p in lvm.parameters() if p.requires_grad]
        self.captured = None  # (graph, static input, static loss), for the first batch's shape
        self.failed = None  # the reason, once capture has failed

    def _eager(self, x):
        loss = self.loss_fn(x)
        with warnings.catch_warnings():  # see _capture
            warnings.filterwarnings("ignore", message=_STREAM_MISMATCH)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        for p, g in zip(self.params, grads):
            if g is None:
                p.grad = None
            elif p.grad is None:
                p.grad = g
            else:  # keep the tensor the graphs write into
                p.grad.copy_(g)
        return loss.detach()

    def _capture(self, x):
        device = x.device
        rng = torch.cuda.get_rng_state(device)
        buffers = [b.clone() for b in self.lvm.buffers()]
        static_x = x.clone()
        # Warm-up on a side stream (cuBLAS workspaces, autograd's lazy set-up), as CUDA graphs
        # require; its draws and any buffer updates are undone, so training sees none of it.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        with warnings.catch_warnings():
            # PyTorch warns when a parameter's gradient accumulator was first made on another stream
            # (by an earlier eager pass); the capture then either works or raises, and we fall back.
            warnings.filterwarnings("ignore", message=_STREAM_MISMATCH)
            with torch.cuda.stream(side), _ScalarsOnDevice():
                for _ in range(self.warmup):
                    for p in self.params:
                        p.grad = None
                    self.loss_fn(static_x).backward()
            torch.cuda.current_stream(device).wait_stream(side)
            for p in self.params:
                p.grad = None
            with torch.cuda.graph(graph), _ScalarsOnDevice():
                static_loss = self.loss_fn(static_x)
                static_loss.backward()
        torch.cuda.set_rng_state(rng, device)
        with torch.no_grad():
            for b, saved in zip(self.lvm.buffers(), buffers):
                b.copy_(saved)
        return graph, static_x, static_loss

    def __call__(self, x):
        if self.captured is None and self.failed is None:
            try:
                self.captured = self._capture(x)
            except Exception as err:  # noqa: BLE001 -- any capture error: run eagerly instead
                self.failed = f"{type(err).__name__}: {err}"
                torch.cuda.synchronize(x.device)
                for p in self.params:
                    p.grad = None
                warnings.warn(f"pyro-lvm: CUDA graph capture failed ({self.failed}); training eagerly")
        if self.captured is None or self.captured[1].shape != x.shape:
            return self._eager(x)
        graph, static_x, static_loss = self.captured
        static_x.copy_(x)
        graph.replay()
        return static_loss.detach().clone()


def wants_cuda_graph(config, device):
    """True when this run asked for graphs (``fit --cuda-graph``) on a CUDA device, and
    ``PYRO_LVM_CUDA_GRAPH=0`` does not turn them off."""
    return (device.type == "cuda" and bool(config.get("cuda_graph", False))
            and os.environ.get("PYRO_LVM_CUDA_GRAPH", "1") != "0")
