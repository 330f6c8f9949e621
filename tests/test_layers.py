"""The library's modules import each other without a circle: a lower layer never imports a higher one.

Every import counts, including those inside functions (a lazy import is still a dependency). Modules
of one subpackage are folded into the subpackage (``pyro_lvm.estimators.ais`` is ``estimators``),
except ``training``, whose modules are checked one by one, and the graph of these units must be acyclic.
"""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pyro_lvm"
SPLIT = {"training"}  # subpackages whose modules are units of their own


def _unit(parts):
    """The layer unit of module ``pyro_lvm.<parts>``."""
    if not parts:
        return "pyro_lvm"
    if parts[0] in SPLIT and len(parts) > 1 and parts[1] != "__init__":
        return ".".join(parts[:2])
    return parts[0]


def _imports(path):
    package = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
                for alias in node.names:
                    # "from . import figures" names a module; "from .x import f" names x
                    name = target + [alias.name]
                    candidate = PACKAGE.joinpath(*name)
                    yield name if (candidate.with_suffix(".py").is_file() or candidate.is_dir()) else target
            elif node.module and node.module.startswith("pyro_lvm"):
                yield node.module.split(".")[1:]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pyro_lvm."):
                    yield alias.name.split(".")[1:]


def _graph():
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("").parts
        if rel[0] == "zoo":
            continue
        source = _unit(list(rel) if rel[-1] != "__init__" else list(rel[:-1]))
        for target in _imports(path):
            unit = _unit(target)
            if unit not in (source, "pyro_lvm") and not source.startswith(unit + "."):
                edges.setdefault(source, set()).add(unit)
    return edges


def _cycle(edges):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_run_directory_does_not_import_training():
    edges = _graph()
    assert not any(t.startswith("training") for t in edges.get("runs", ())), edges.get("runs")


def test_the_checker_sees_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None
