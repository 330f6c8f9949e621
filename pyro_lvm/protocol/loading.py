"""Finding a user's program: a zoo name, ``path/to/file.py[:Name]`` or ``package.module[:Name]``.

A program is either a class with ``model`` and ``guide`` (a ``PyroModule``, a plain ``nn.Module``
that calls ``pyro.module``, or any class), or a file / module whose top level defines ``model`` and
``guide`` (functions, or callables such as a ``PyroModule`` instance and an ``AutoNormal``). The
second kind is turned into a class here (:func:`functions_class`) so that the rest of the toolkit
sees one shape; each instance re-imports a file, so two fits in one process do not share the
file's module-level objects (an ``AutoDelta`` made at import holds parameters).

Errors in the user's file are the user's: importing it runs with stdout sent to stderr (so that
``evaluate --json`` keeps a clean stdout) and every exception, ``SystemExit`` from ``argparse``
included, becomes a :class:`~pyro_lvm.errors.UserError` naming the file and line. The files loaded
here are remembered (:func:`user_sources`), so that an exception raised later from inside them (at
the first trace, mid-training) is reported as the user's too (:func:`user_code_error`).
"""

import ast
import contextlib
import difflib
import importlib
import importlib.util
import inspect
import io
import sys
import traceback
from pathlib import Path

import pyro
import torch

from ..errors import UserError

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
# pyro-lvm's own modules that model files build on; an exception raised inside them on behalf of a
# model (a bad layer size in an MLP) is reported at the model's line, like one from torch.
_MODEL_BUILDING_BLOCKS = {_PACKAGE_DIR / "nn.py", _PACKAGE_DIR / "distributions.py"}
_USER_SOURCES = set()


def zoo_dir():
    """The folder holding the zoo's model files: installed copy first, then the source checkout."""
    for candidate in (_PACKAGE_DIR / "zoo", _PACKAGE_DIR.parent / "models"):
        if candidate.is_dir() and any(candidate.glob("*.py")):
            return candidate
    raise UserError("the model zoo was not found; reinstall pyro-lvm with `pip install .`")


def _zoo_files():
    return {p.stem.replace("_", "-"): p for p in sorted(zoo_dir().glob("*.py")) if not p.name.startswith("_")}


def zoo_models():
    """``{zoo name: one-line summary}`` read from each zoo file's docstring, without importing it."""
    summaries = {}
    for name, path in _zoo_files().items():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        summaries[name] = doc.strip().splitlines()[0] if doc.strip() else ""
    return summaries


# ----- whose code raised -------------------------------------------------------------------------

def register_user_source(path):
    if path:
        _USER_SOURCES.add(Path(path).resolve())


def user_sources():
    return set(_USER_SOURCES)


def _resolve(filename):
    try:
        return Path(filename).resolve()
    except (OSError, RuntimeError, ValueError):
        return None


# The frames through which pyro-lvm calls a user's program: an exception that reaches one of them
# from library code only (a Pyro AutoGuide the program built, torch) was raised by the program.
_PROGRAM_BOUNDARIES = {("program.py", "__call__"), ("program.py", "call"), ("loading.py", "model"),
                       ("loading.py", "guide")}


def user_frame(tb):
    """The frame of traceback ``tb`` to blame on a user's program, if the exception came from there:
    frames are read from the raise point outwards, library frames (torch, pyro, the standard library)
    are skipped, and the first frame that is either a user file's or pyro-lvm's own decides. A
    pyro-lvm frame that calls into the user's program (reached through library code only, as when an
    ``AutoGuide`` the program built raises) blames the program too, at the innermost frame. Returns a
    :class:`traceback.FrameSummary` or None."""
    frames = list(reversed(traceback.extract_tb(tb)))
    for frame in frames:
        path = _resolve(frame.filename)
        if path is None:
            continue
        if path in _USER_SOURCES:
            return frame
        if path in _MODEL_BUILDING_BLOCKS:
            continue
        if _PACKAGE_DIR in path.parents:
            if path.parent == _PACKAGE_DIR / "protocol" and (path.name, frame.name) in _PROGRAM_BOUNDARIES:
                return frames[0]
            return None
    return None


def _first_line(err):
    text = str(err).strip()
    return " ".join(text.splitlines()[0].split())[:300] if text else ""


def describe_exception(err, frame):
    where = f"{frame.filename}:{frame.lineno}" + (f" (in {frame.name})" if frame.name != "<module>" else "")
    message = _first_line(err)
    return f"{where}: {type(err).__name__}" + (f": {message}" if message else "")


def user_code_error(err, context=None):
    """A :class:`UserError` for an exception raised inside a user's model file, else None.

    ``context`` (e.g. "while tracing VAE.model on data of shape (1, 28, 28) per point") is added to
    the message, which names the file and line and says that the fix is in the model file.
    """
    if isinstance(err, UserError):
        return err
    frame = user_frame(err.__traceback__)
    if frame is None:
        return None
    detail = f" {context}" if context else ""
    return UserError(f"{describe_exception(err, frame)}{detail}; this error is raised by your model code: "
                     f"fix it there (PYRO_LVM_DEBUG=1 shows the traceback)")


# ----- importing files ---------------------------------------------------------------------------

def _exec_module(module, spec, path):
    """Run a model file's top level, its prints sent to stderr, every exception reported as bad input."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except SyntaxError as err:
        sys.stderr.write(captured.getvalue())
        raise UserError(f"model file {str(path)!r} has a syntax error at line {err.lineno}: {err.msg}; "
                        f"fix the file") from None
    except SystemExit as err:
        said = [line for line in captured.getvalue().splitlines() if line.strip()]
        frame = user_frame(err.__traceback__)
        line = f" at line {frame.lineno}" if frame is not None else ""
        told = f" ({said[-1].strip()[:200]})" if said else ""
        raise UserError(f"model file {str(path)!r} exits when imported (SystemExit({err.code!r}){line}{told}), "
                        f"for example by parsing the command line; put the script part under "
                        f"`if __name__ == \"__main__\":`") from None
    except BaseException as err:  # noqa: BLE001 -- whatever a user's file raises at import is bad input
        sys.stderr.write(captured.getvalue())
        frame = user_frame(err.__traceback__)
        where = describe_exception(err, frame) if frame is not None else f"{type(err).__name__}: {_first_line(err)}"
        raise UserError(f"model file {str(path)!r} failed to import: {where}; fix the file, or run "
                        f"`python {path}` to see the full error") from None
    sys.stderr.write(captured.getvalue())


def _module_from_file(path, qualname_hint):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {str(path)!r} does not exist; check the path in MODEL (path/to/file.py:ClassName)")
    module_name = f"pyro_lvm_user_models.{qualname_hint}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"model file {str(path)!r} is not a Python file; give path/to/file.py:ClassName")
    register_user_source(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    local_before = pyro.settings.get("module_local_params")
    try:
        _exec_module(module, spec, path)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        # A file that turns on module-local parameters at import wants them for its program; Pyro's
        # default (the global parameter store) is restored for everything else.
        local_after = pyro.settings.get("module_local_params")
        pyro.settings.set(module_local_params=local_before)
    module.__pyro_lvm_module_local_params__ = bool(local_after) if local_after != local_before else False
    module.__pyro_lvm_source__ = ("file", str(path), qualname_hint)
    return module


def _import_module(target):
    captured = io.StringIO()
    local_before = pyro.settings.get("module_local_params")
    try:
        with contextlib.redirect_stdout(captured):
            module = importlib.import_module(target)
    except ImportError as err:
        raise UserError(f"cannot import module {target!r} ({err}); give path/to/file.py:ClassName "
                        f"or make sure the package is on PYTHONPATH") from err
    except KeyboardInterrupt:
        raise
    except BaseException as err:  # noqa: BLE001
        raise UserError(f"module {target!r} failed to import: {type(err).__name__}: {_first_line(err)}; "
                        f"fix the module") from None
    finally:
        local_after = pyro.settings.get("module_local_params")
        pyro.settings.set(module_local_params=local_before)
        sys.stderr.write(captured.getvalue())
    register_user_source(getattr(module, "__file__", None))
    if not hasattr(module, "__pyro_lvm_module_local_params__"):
        module.__pyro_lvm_module_local_params__ = bool(local_after) if local_after != local_before else False
    module.__pyro_lvm_source__ = ("module", target, None)
    return module


# ----- programs ----------------------------------------------------------------------------------

def _model_classes(module):
    return [obj for obj in vars(module).values()
            if inspect.isclass(obj) and obj.__module__ == module.__name__
            and callable(getattr(obj, "model", None)) and callable(getattr(obj, "guide", None))]


def _has_functions(module):
    return callable(getattr(module, "model", None)) and callable(getattr(module, "guide", None))


class ProgramFunctions(torch.nn.Module):
    """The ``model`` and ``guide`` of a file or module, as one object.

    Callables that are modules (a ``PyroModule`` instance used as the model, an ``AutoNormal`` as
    the guide) are registered as submodules, so their parameters are the object's parameters.
    """

    _source = None
    _fresh = None

    def __init__(self):
        super().__init__()
        module = type(self)._fresh()
        self.model_function, self.guide_function = module.model, module.guide
        for role, fn in (("model_program", module.model), ("guide_program", module.guide)):
            if isinstance(fn, torch.nn.Module):
                self.add_module(role, fn)

    def model(self, *args, **kwargs):
        return self.model_function(*args, **kwargs)

    def guide(self, *args, **kwargs):
        return self.guide_function(*args, **kwargs)


def functions_class(module):
    """A :class:`ProgramFunctions` subclass for a module that defines ``model`` and ``guide``."""
    kind, target, hint = module.__pyro_lvm_source__
    first = [module]

    def fresh():
        if first:  # the module just imported serves the first instance
            return first.pop()
        if kind == "file":
            return _module_from_file(target, hint)
        return module

    name = Path(target).stem if kind == "file" else target.rpartition(".")[2]
    cls = type(name, (ProgramFunctions,), {"__doc__": module.__doc__, "_fresh": staticmethod(fresh),
                                          "_source": (kind, target), "__module__": module.__name__})
    cls.__pyro_lvm_module_local_params__ = module.__pyro_lvm_module_local_params__
    return cls


def _from_module(module, target, class_name):
    if not class_name:
        classes = _model_classes(module)
        if len(classes) == 1:
            return classes[0]
        if not classes and _has_functions(module):
            return functions_class(module)
        if not classes:
            raise UserError(f"{target!r} defines no class with model and guide methods and no top-level model "
                            f"and guide; write them (see the README's 'Your own model')")
        raise UserError(f"{target!r} defines {len(classes)} model classes ({', '.join(c.__name__ for c in classes)}); "
                        f"name one as {target}:ClassName")
    obj = getattr(module, class_name, None)
    if obj is None or not inspect.isclass(obj):
        names = [c.__name__ for c in _model_classes(module)]
        close = difflib.get_close_matches(class_name, names, n=3)
        functions = " or leave out :Name to use its model and guide functions" if _has_functions(module) else ""
        raise UserError(f"{target!r} has no class {class_name!r}; "
                        + (f"did you mean {', '.join(close)}?" if close else
                           f"model classes there: {', '.join(names) or 'none'}{functions}"))
    if not callable(getattr(obj, "model", None)):
        raise UserError(f"class {class_name!r} has no model method; a program needs model(x) and guide(x) "
                        f"(see the README)")
    return obj


def split_model_spec(spec):
    """``(file or module, class name or "")`` of ``path/file.py:Class``, ``pkg.mod:Class`` or a path;
    a colon inside a folder name (``runs/a:b/model.py``) is part of the path, not a separator."""
    spec = str(spec)
    target, sep, class_name = spec.rpartition(":")
    if not sep or "/" in class_name or "\\" in class_name or class_name.endswith(".py"):
        return spec, ""
    return target, class_name


def load_model_class(spec):
    """Resolve a model name (zoo name, ``file.py[:Class]`` or ``pkg.mod[:Class]``) to a class."""
    spec = str(spec)
    zoo = _zoo_files()
    if not split_model_spec(spec)[1] and not spec.endswith(".py") and "/" not in spec:
        key = spec.replace("_", "-").lower()
        if key in zoo:
            module = _module_from_file(zoo[key], "zoo_" + key.replace("-", "_"))
            classes = _model_classes(module)
            if len(classes) != 1:
                raise UserError(f"zoo file {zoo[key]} must define exactly one model class, found {len(classes)}")
            classes[0].__pyro_lvm_module_local_params__ = module.__pyro_lvm_module_local_params__
            return classes[0]
        if "." not in spec and "/" not in spec:
            close = difflib.get_close_matches(key, list(zoo), n=3, cutoff=0.4)
            hint = f"did you mean {', '.join(close)}?" if close else f"known models: {', '.join(zoo)}"
            raise UserError(f"unknown model {spec!r}; {hint} (or give path/to/file.py:ClassName)")

    target, class_name = split_model_spec(spec)
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _module_from_file(target, Path(target).stem)
    else:
        module = _import_module(target)
    cls = _from_module(module, target, class_name)
    if not hasattr(cls, "__pyro_lvm_module_local_params__"):
        cls.__pyro_lvm_module_local_params__ = getattr(module, "__pyro_lvm_module_local_params__", False)
    return cls
