"""The adapter between a user's Pyro program and the rest of pyro-lvm.

:class:`Program` is a ``torch.nn.Module`` around the user's object (or around the ``model`` and
``guide`` of a file) that gives every layer one calling convention and one parameter set:

- ``program.model(batch)`` and ``program.guide(batch)`` call the user's ``model`` and ``guide``
  with the data as they take it: positionally or by keyword, reshaped to the point shape the program
  reads (a scalar per point, a flattened image, as inspection found), and, for a data plate that
  subsamples itself, with the full data and the batch's indices conditioned on the plate's
  subsample site (:class:`SubsampleBatch`), so guide and model see the same points;
- parameters: the user module's own (``nn.Parameter``, ``PyroParam``, ``pyro.module``) and every
  ``pyro.param`` the traces create, kept in a parameter store of this program alone (Pyro's global
  store is swapped in for each call, as ``ParamStoreDict.scope`` does), registered as parameters
  of the program: optimized, in ``state_dict()`` and restored by ``load_state_dict``;
- ``program.sample(n)``: ancestral sampling through Pyro's handlers, ``poutine.uncondition`` on a
  placeholder batch for a model that sizes its plate from ``x`` (the global latents from the guide:
  the posterior predictive), and ``model(None, num_samples=n)`` for one that takes ``num_samples``.

What the program is (sites, plates, point shape) is learned once from traces and kept in
``program.info`` (:class:`~pyro_lvm.protocol.inspection.ModelInfo`).

The user's program runs under Pyro's default settings (the global parameter store, unless its file
turned on ``module_local_params``), as it would under plain Pyro.
"""

import contextlib
import inspect
import math

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from ..errors import UserError
from .plates import plate_frame

PYRO_PARAM_PREFIX = "pyro.param:"


class SubsampleBatch:
    """A batch for a program whose data plate subsamples itself: all the data and the batch's indices.

    ``indices`` has exactly the plate's ``subsample_size`` entries; the first ``valid`` are the points
    of the batch, the rest repeat them (evaluation pads the last batch so that Pyro's plate accepts it).
    """

    def __init__(self, data, indices, valid=None):
        self.data = data
        self.indices = indices
        self.valid = len(indices) if valid is None else int(valid)

    def __len__(self):
        return len(self.indices)

    @property
    def shape(self):
        return (len(self.indices),) + tuple(self.data.shape[1:])

    @property
    def device(self):
        return self.data.device

    @property
    def dtype(self):
        return self.data.dtype

    def rows(self):
        return self.data[self.indices]


class CallingConvention:
    """How a user's ``model`` or ``guide`` takes the data: positionally, by keyword, or not at all."""

    def __init__(self, fn, owner, role):
        self.fn, self.owner, self.role = fn, owner, role
        target = getattr(fn, "__func__", fn)
        if hasattr(fn, "model_function") or owner is not None and role + "_function" in vars(owner):
            target = getattr(owner, role + "_function")
        self.mode, self.keyword, self.takes_num_samples, self.missing = "positional", None, False, []
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return
        params = list(signature.parameters.values())
        if params and params[0].name == "self" and not inspect.ismethod(target):
            params = params[1:]
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        keyword_only = [p for p in params if p.kind == p.KEYWORD_ONLY]
        has_var_positional = any(p.kind == p.VAR_POSITIONAL for p in params)
        self.takes_num_samples = "num_samples" in signature.parameters
        if positional:
            self.mode = "positional"
            others = positional[1:] + keyword_only
            self.data_name = positional[0].name
        elif has_var_positional:
            self.mode, others, self.data_name = "positional", keyword_only, "*args"
        elif keyword_only:
            required = [p for p in keyword_only if p.default is p.empty]
            chosen = required[0] if len(required) == 1 else keyword_only[0] if len(keyword_only) == 1 else None
            if chosen is None:
                names = ", ".join(p.name for p in keyword_only)
                raise UserError(f"{self.describe()} takes only keyword arguments ({names}); pyro-lvm cannot tell "
                                f"which one is the data: make the data the first argument")
            self.mode, self.keyword, self.data_name = "keyword", chosen.name, chosen.name
            others = [p for p in keyword_only if p is not chosen]
        else:
            self.mode, others, self.data_name = "none", [], None
        self.missing = [p.name for p in others if p.default is p.empty]

    def describe(self):
        owner = type(self.owner).__name__ if self.owner is not None else "the program"
        return f"{owner}.{self.role}"

    def check(self):
        if self.missing:
            names = ", ".join(repr(n) for n in self.missing)
            raise UserError(f"{self.describe()} requires {names} besides the data; pyro-lvm calls "
                            f"{self.role}(x) with one batch of data: give {names} a default")

    def __call__(self, x):
        if self.mode == "keyword":
            return self.fn(**{self.keyword: x})
        if self.mode == "none":
            return self.fn()
        return self.fn(x)


class _SubsampleIndices(poutine.messenger.Messenger):
    """Set the indices that a self-subsampling plate draws (as ``poutine.replay`` sets a guide's into the
    model: the site stays a drawn one, so Pyro's model/guide checks see the same plate on both sides)."""

    def __init__(self, plate, indices):
        super().__init__()
        self.plate, self.indices = plate, indices

    def _pyro_sample(self, msg):
        if msg["name"] == self.plate and site_is_subsample(msg):
            msg["value"] = self.indices
            msg["done"] = True


class _PointMask(poutine.messenger.Messenger):
    """Mask the padded points of an evaluation batch out of every site of the data plate."""

    def __init__(self, plate, dim, mask):
        super().__init__()
        self.plate, self.dim, self.mask = plate, dim, mask

    def _process_message(self, msg):
        if msg["type"] != "sample" or plate_frame(msg, self.plate) is None:
            return
        mask = self.mask.reshape((-1,) + (1,) * (-1 - self.dim))
        msg["mask"] = mask if msg["mask"] is None else msg["mask"] & mask


class Program(torch.nn.Module):
    """A user's program (an object with ``model`` and ``guide``) as the toolkit calls it.

    :param program: the user's object (an ``nn.Module`` or any object with ``model`` and ``guide``).
    :param data_shape: one data point's shape, as the data set has it.
    :param module_local_params: run the program with Pyro's ``module_local_params`` setting on.
    :param factory: optional ``() -> object``, a fresh object like ``program`` (inspection traces it,
        so that probes leave the real one as it was built).
    """

    def __init__(self, program, data_shape=None, module_local_params=False, factory=None):
        super().__init__()
        self.user = program
        self.factory = factory  # () -> a fresh user object like ``program`` (for inspection)
        self.pyro_params = torch.nn.Module()
        self.data_shape = tuple(data_shape) if data_shape is not None else None
        self.module_local_params = bool(module_local_params)
        self.info = None
        self._store = {"params": {}, "constraints": {}}
        self._param_keys = {}  # pyro.param name -> attribute name in self.pyro_params
        self._collected = False
        self._active = 0
        self._points = None
        self._sealed_names = None
        self.model_call = CallingConvention(program.model, program, "model")
        self.guide_call = CallingConvention(program.guide, program, "guide")
        for call in (self.model_call, self.guide_call):
            call.check()

    # ----- forwarding to the user's object -----

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            pass
        if name.startswith("__") or name in ("user", "_modules", "_parameters", "_buffers"):
            raise AttributeError(name)
        modules = self.__dict__.get("_modules", {})
        user = modules["user"] if "user" in modules else self.__dict__.get("user")
        if user is None:
            raise AttributeError(name)
        if name in ("log_marginal", "initialize") and callable(getattr(user, name, None)):
            return self._data_method(getattr(user, name))
        return getattr(user, name)

    def _data_method(self, method):
        def call(x, *args, **kwargs):
            with self.running():
                return method(self.to_program(x), *args, **kwargs)

        call.__name__ = getattr(method, "__name__", "method")
        return call

    @property
    def program_name(self):
        return type(self.user).__name__

    @property
    def point_shape(self):
        if self.info is not None:
            return self.info.point_shape
        return self.data_shape

    @property
    def data_plate(self):
        return self.info.data_plate.name if self.info is not None else "data"

    # ----- the parameter store of this program -----

    @contextlib.contextmanager
    def running(self):
        """Pyro's parameter store and settings as this program's calls see them."""
        if self._active:
            yield
            return
        store = pyro.get_param_store()
        saved = (store._params, store._param_to_name, store._constraints)
        store._params, store._constraints = self._store["params"], self._store["constraints"]
        store._param_to_name = {value: name for name, value in store._params.items()}
        self._active += 1
        try:
            with pyro.settings.context(module_local_params=self.module_local_params):
                yield
        finally:
            self._active -= 1
            self._store = {"params": store._params, "constraints": store._constraints}
            store._params, store._param_to_name, store._constraints = saved
            if self._sealed_names is not None and set(self._store["params"]) - self._sealed_names:
                self._late_parameters()

    def _late_parameters(self):
        new = sorted(set(self._store["params"]) - self._sealed_names)
        self._sealed_names |= set(new)
        raise UserError(f"{self.program_name} created pyro.param {', '.join(map(repr, new))} after its first "
                        f"run; pyro-lvm collects the parameters from the first trace of model and guide, so "
                        f"create every pyro.param on every call")

    def collect_parameters(self, traces=()):
        """Register the ``pyro.param`` tensors that the program created and that no module of the user's
        object holds, so that they are optimized and saved (call after the first traces)."""
        owned = {id(p) for p in self.parameters()}
        tensors = dict(self._store["params"])
        for trace in traces:  # parameters of modules outside the user's object, in module-local mode
            for name, site in trace.nodes.items():
                if site["type"] == "param":
                    value = site["value"]
                    unconstrained = value.unconstrained() if hasattr(value, "unconstrained") else value
                    if isinstance(unconstrained, torch.nn.Parameter) and name not in tensors:
                        tensors[name] = unconstrained
        for name, tensor in tensors.items():
            if id(tensor) in owned or not torch.is_tensor(tensor):
                continue
            parameter = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor.detach())
            if name in self._store["params"]:
                self._store["params"][name] = parameter  # the store now hands out the registered tensor
            key = f"p{len(self._param_keys)}"
            self._param_keys[name] = key
            self.pyro_params.register_parameter(key, parameter)
            owned.add(id(parameter))
        self._collected = True
        self._sealed_names = set(self._store["params"])

    def pyro_param_names(self):
        return list(self._param_keys)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The user object's state dict (its own keys) and ``pyro.param:NAME`` for collected ``pyro.param`` s."""
        if args:
            destination = args[0]
        user = self.user.state_dict(prefix=prefix, keep_vars=keep_vars) if isinstance(self.user, torch.nn.Module) else {}
        if destination is None:
            destination = type(user)() if isinstance(user, dict) else {}
        destination.update(user)
        for name, key in self._param_keys.items():
            value = getattr(self.pyro_params, key)
            destination[prefix + PYRO_PARAM_PREFIX + name] = value if keep_vars else value.detach()
        return destination

    def load_state_dict(self, state_dict, strict=True, assign=False):
        user_state = {k: v for k, v in state_dict.items() if not k.startswith(PYRO_PARAM_PREFIX)}
        params = {k[len(PYRO_PARAM_PREFIX):]: v for k, v in state_dict.items() if k.startswith(PYRO_PARAM_PREFIX)}
        missing = [n for n in self._param_keys if n not in params]
        unexpected = [n for n in params if n not in self._param_keys]
        if strict and (missing or unexpected):
            raise RuntimeError(f"pyro.param entries do not match: missing {missing}, unexpected {unexpected}")
        result = None
        if isinstance(self.user, torch.nn.Module):
            result = self.user.load_state_dict(user_state, strict=strict)
        elif strict and user_state:
            raise RuntimeError(f"unexpected keys {sorted(user_state)[:5]}")
        with torch.no_grad():
            for name, value in params.items():
                if name in self._param_keys:
                    target = getattr(self.pyro_params, self._param_keys[name])
                    if target.shape != value.shape:
                        raise RuntimeError(f"size mismatch for pyro.param {name!r}: {tuple(value.shape)} in the "
                                           f"checkpoint, {tuple(target.shape)} in the model")
                    target.copy_(value)
        return result

    # ----- calling the program -----

    def to_program(self, x):
        """Data ``[n, *data_shape]`` reshaped to what the program reads per point."""
        shape = self.point_shape
        if shape is None or not torch.is_tensor(x) or x.dim() == 0 or tuple(x.shape[1:]) == tuple(shape):
            return x
        if math.prod(x.shape[1:]) != math.prod(shape):
            return x
        return x.reshape((x.shape[0],) + tuple(shape))

    def from_program(self, x):
        """Points the program produced, ``[n, *point_shape]``, reshaped to the data's shape."""
        if self.data_shape is None or not torch.is_tensor(x) or tuple(x.shape[1:]) == self.data_shape:
            return x
        return x.reshape((x.shape[0],) + self.data_shape)

    def _wrapped(self, call, batch, uncondition=False):
        """A thunk running ``call`` on ``batch`` under the handlers the batch needs."""
        if isinstance(batch, SubsampleBatch):
            data = self.to_program(batch.data)
            fn = (lambda: call(data))
            if uncondition:
                fn = poutine.uncondition(fn)
            fn = _SubsampleIndices(self.data_plate, batch.indices)(fn)
            if batch.valid < len(batch.indices):
                mask = torch.arange(len(batch.indices), device=batch.indices.device) < batch.valid
                fn = _PointMask(self.data_plate, self.info.data_plate.dim, mask)(fn)
            return fn, len(batch.indices)
        data = self.to_program(batch)
        fn = (lambda: call(data))
        if uncondition:
            fn = poutine.uncondition(fn)
        return fn, (len(batch) if torch.is_tensor(batch) and batch.dim() > 0 else None)

    def _run(self, call, args, kwargs, uncondition=False):
        with self.running():
            if len(args) == 1 and not kwargs and (torch.is_tensor(args[0]) or isinstance(args[0], SubsampleBatch)):
                fn, points = self._wrapped(call, args[0], uncondition)
                previous, self._points = self._points, points
                try:
                    return fn()
                finally:
                    self._points = previous
            return call.fn(*args, **kwargs)

    def model(self, *args, **kwargs):
        """The user's model on a batch (a tensor of points, or a :class:`SubsampleBatch`)."""
        return self._run(self.model_call, args, kwargs)

    def guide(self, *args, **kwargs):
        """The user's guide on a batch."""
        return self._run(self.guide_call, args, kwargs)

    def unconditioned_model(self, batch):
        """The model on ``batch`` with its observed sites sampled (``poutine.uncondition``)."""
        return self._run(self.model_call, (batch,), {}, uncondition=True)

    def current_points(self):
        return self._points

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # ----- batches -----

    def has_posterior_for(self, x):
        """Whether the guide can say anything about the points ``x``: always for an amortized guide; only
        for the training points for one that keeps a parameter per training point."""
        if self.info is None or not self.info.per_point_guide:
            return True
        return len(x) == getattr(self, "training_points", None)

    @property
    def subsampling(self):
        return self.info is not None and self.info.data_plate.kind == "subsampling"

    def batches(self, x, batch_size):
        """``(batch, valid)`` covering every row of ``x`` in order, for evaluation."""
        if self.info is not None and self.info.per_point_guide and not self.subsampling:
            batch_size = len(x)  # a guide with one parameter per point: all the points in one batch
        if not self.subsampling:
            for start in range(0, len(x), batch_size):
                part = x[start:start + batch_size]
                yield part, len(part)
            return
        size = self.info.data_plate.subsample_size
        for start in range(0, len(x), size):
            index = torch.arange(start, min(start + size, len(x)), device=x.device)
            valid = len(index)
            if valid < size:
                index = index.repeat(-(-size // valid))[:size]
            yield SubsampleBatch(x, index, valid), valid

    def probe(self, x, size=2):
        """A small batch of ``x`` that the program accepts (for set-up traces)."""
        return next(self.batches(x, size))[0] if not self.subsampling else next(self.batches(x, 1))[0]

    def training_batches(self, x, batch_size, seed=0, dynamic_binarize=False):
        """Minibatches of the training split for one epoch after another (see :mod:`pyro_lvm.data`)."""
        from ..data import DeviceBatches

        if not self.subsampling:
            # A guide with one parameter per data point indexes them by position: the points stay in order.
            return DeviceBatches(x, batch_size, seed=seed, dynamic_binarize=dynamic_binarize,
                                 shuffle=not self.info.per_point_guide)
        return SubsampleBatches(x, self.info.data_plate.subsample_size, seed=seed, dynamic_binarize=dynamic_binarize)

    # ----- sampling without data -----

    def placeholder(self, n, like=None):
        """``n`` points for a model to run on while its observed sites are sampled: rows of ``like`` (real
        data, cycled: a model may read them, as a multinomial reads its total count), else zeros."""
        if like is not None and len(like):
            index = torch.arange(n, device=like.device) % len(like)
            return like[index].to(self.device())
        shape = self.data_shape if self.data_shape is not None else ()
        return torch.zeros((n,) + tuple(shape), device=self.device())

    def device(self):
        for tensor in list(self.parameters()) + list(self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def simulate(self, n, like=None):
        """Draw ``n`` points by ancestral sampling: ``(x [n, *data_shape], traces)``.

        A model that takes ``num_samples`` is called as ``model(None, num_samples=n)``; any other runs on a
        placeholder batch of n points under ``poutine.uncondition``, with its global latents drawn from
        the guide. The observed sites' values are put back together into data points
        (:func:`~pyro_lvm.protocol.inspection.observed_values`).
        """
        from .inspection import observed_values

        if self.info is None:
            raise UserError("the program has not been inspected on data yet; cannot sample it")
        if self.info.sample_with_num_samples:
            with self.running(), torch.no_grad():
                trace = poutine.trace(self.user.model).get_trace(None, num_samples=n)
            return self.from_program(observed_values(self.info, trace)), [trace]
        traces, values = [], []
        for batch, valid in self.batches(self.placeholder(n, like), max(n, 1)):
            with torch.no_grad():
                model = self.unconditioned_model
                global_values = self._global_draws(batch)
                if global_values:
                    model = poutine.condition(model, data=global_values)
                trace = poutine.trace(model).get_trace(batch)
            traces.append(trace)
            values.append(observed_values(self.info, trace)[:valid])
        return self.from_program(torch.cat(values)), traces

    def _global_draws(self, batch):
        """Values of the global latents drawn from the guide: samples then follow the fitted posterior
        predictive rather than the prior."""
        names = [site.name for site in self.info.global_latents if site.in_guide]
        if not names:
            return {}
        guide_trace = poutine.trace(self.guide).get_trace(batch)
        return {name: guide_trace.nodes[name]["value"] for name in names if name in guide_trace.nodes}

    def sample(self, n, like=None):
        """``n`` data points ``[n, *data_shape]`` drawn from the fitted model (see :meth:`simulate`)."""
        return self.simulate(n, like)[0]


class SubsampleBatches:
    """Training batches for a self-subsampling data plate: the whole training split and B indices per
    step, drawn as the plate draws them (``randperm(N)[:B]``), from a generator seeded by (seed,
    epoch, step) so that a resumed run sees the same batches. An epoch is ceil(N / B) steps."""

    def __init__(self, x, subsample_size, seed=0, dynamic_binarize=False):
        self.x = x
        self.subsample_size = int(subsample_size)
        self.seed = int(seed)
        self.dynamic_binarize = dynamic_binarize
        self._buffer = None

    def __len__(self):
        return -(-len(self.x) // self.subsample_size)

    def _generator(self, *key):
        from ..data.loader import _mix

        return torch.Generator(device=self.x.device).manual_seed(_mix(self.seed, *key))

    def epoch(self, epoch, start_step=0):
        n = len(self.x)
        for step in range(start_step, len(self)):
            index = torch.randperm(n, generator=self._generator(epoch, step), device=self.x.device)[:self.subsample_size]
            data = self.x
            if self.dynamic_binarize:
                # Only the batch's rows are read by the program: they are drawn afresh, x ~ Bernoulli(intensity).
                if self._buffer is None:
                    self._buffer = torch.bernoulli(self.x, generator=self._generator("static"))
                rows = self.x[index]
                noise = torch.rand(rows.shape, generator=self._generator(epoch, step, 1), device=rows.device)
                self._buffer[index] = (noise < rows).to(rows.dtype)
                data = self._buffer
            yield step, SubsampleBatch(data, index)
