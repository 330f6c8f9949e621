"""Hostile input, round two: the eleven classes of issue 12, each as a generator of cases.

Each class is a function ``(corpus, quick) -> iterator of (case name, thunk)``; a thunk runs one
case and returns ``(exit status, stderr, problems)``, where ``problems`` lists every way the outcome
breaks the README's promises (empty: handled). ``tests/test_hostile_classes.py`` runs the quick
subset of every class; ``benchmarks/reliability.py --round-two`` runs all of them and counts, per
class, how many were handled. The cases are built from the classes' descriptions, not from one
example each, and run against the library in whatever state it is (the benchmark's "before" column
ran them on the code before the fixes).

Every case runs pyro-lvm in this process (``pyro_lvm.cli.main``), except the races, which need
real processes, and under an alarm, so that a case that would hang (a FIFO read) fails instead.
"""
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from helpers import FIXTURES, PROCESS_CWD, REPO
from test_hostile_input import MODELS, outcome_problems, run_cli, snapshot as run_snapshot

FA = [f"{REPO / 'examples' / 'factor_analysis.py'}:FactorAnalysis", "-p", "latent_dim=1"]
BROKEN = f"{FIXTURES / 'broken_marginal.py'}:BrokenMarginal"
CASE_SECONDS = 120


# ----------------------------------------------------------------------------------------------
# Running one case
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def alarm(seconds):
    """Raise ``TimeoutError`` in this (main) thread after ``seconds``: a hanging case fails."""
    def fire(*_):
        raise TimeoutError(f"the case ran over {seconds} s (blocked?)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield Path(path)
    finally:
        os.chdir(old)


def cli(*args, where=None):
    """``pyro-lvm ARGS`` in this process (in folder ``where``): ``(code, stdout, stderr)``."""
    with cwd(where or os.getcwd()):
        return run_cli([str(a) for a in args])


def tree(path):
    """``{relative path: (kind, bytes or target)}`` of everything under ``path`` (links not followed)."""
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        return {".": ("link", os.readlink(path))}
    if path.is_file():
        return {".": ("file", path.read_bytes())}
    found = {}
    for root, dirs, names in os.walk(path):
        for name in dirs + names:
            p = Path(root) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                found[rel] = ("link", os.readlink(p))
            elif p.is_file():
                found[rel] = ("file", p.read_bytes())
            elif p.is_dir():
                found[rel] = ("dir", None)
            else:
                found[rel] = ("other", None)
    return found


def strict_json(text):
    """``json.loads`` that refuses ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def says(stderr, *words):
    return all(w.lower() in stderr.lower() for w in words)


def last_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Corpus:
    """The runs and files the cases start from, made once and copied for each case."""

    def __init__(self, work):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self._runs = {}
        self.count = 0

    def scratch(self, name):
        self.count += 1
        path = self.work / f"{self.count:04d}-{name}"
        path.mkdir(parents=True)
        return path

    def run(self, kind="fa"):
        """A finished run to copy: ``fa`` (factor analysis on faithful, 1 epoch), ``fa-file`` (on a
        .npy file), ``vae`` (digits, tiny), ``broken-*`` (an exact log p(x) that is not finite)."""
        if kind not in self._runs:
            (self.work / "runs").mkdir(exist_ok=True)
            out = self.work / "runs" / kind
            data = self.work / "runs" / "data.npy"
            if kind == "fa":
                args = ["fit", *FA, "--data", "faithful", "--epochs", "1"]
            elif kind == "fa-file":
                np.save(data, np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32))
                args = ["fit", *FA, "--data", data, "--epochs", "1", "--batch-size", "16"]
            elif kind == "vae":
                args = ["fit", *MODELS["vae"], "--data", "digits", "--epochs", "1", "--batch-size", "200"]
            else:
                args = ["fit", BROKEN, "-p", f"broken={kind[len('broken-'):]}", "--data", "faithful", "--epochs", "1"]
            code, _, err = cli(*args, "--quiet", "--out", out)
            assert code == 0, err
            self._runs[kind] = out
        return self._runs[kind]

    def copy(self, kind="fa", name="run"):
        where = self.scratch(name)
        shutil.copytree(self.run(kind), where / "run")
        return where, where / "run"


def _guard(thunk):
    def run():
        try:
            with alarm(CASE_SECONDS):
                return thunk()
        except Exception as err:  # noqa: BLE001 -- an unexpected failure of the case is a finding
            return None, "", [f"the case failed: {type(err).__name__}: {str(err)[:200]}"]
    return run


def basic(code, err):
    return outcome_problems(code, err)


# ----------------------------------------------------------------------------------------------
# 1. Links planted in a run directory
# ----------------------------------------------------------------------------------------------

COMMANDS = {
    "resume-finished": lambda run: ["fit", "-", "--out", run, "--resume", "--quiet"],
    "resume-more": lambda run: ["fit", "-", "--out", run, "--resume", "--epochs", "2", "--quiet"],
    "evaluate": lambda run: ["evaluate", run, "--estimator", "exact"],
    "sample": lambda run: ["sample", run, "-n", "4"],
    "diagnose": lambda run: ["diagnose", run, "--is-samples", "0"],
    "report": lambda run: ["report", run],
}
# Which commands open each name (and so must refuse a link there).
USES = {
    ".lock": ["resume-finished", "resume-more"],
    "evaluations.jsonl": ["evaluate"],
    "metrics.jsonl": ["evaluate", "sample", "diagnose", "resume-more"],
    "config.json": ["evaluate", "sample", "resume-more"],
    "checkpoint.pt": ["evaluate", "sample", "resume-more"],
    "samples.csv": ["sample"],
    "report": ["report"],
    "report/index.html": ["report"],
    "report/samples.png": ["report"],
    "report/diagnostics.json": ["report"],
}


def links(corpus, quick):
    names = list(USES)
    targets = ["file", "dangling", "dir"]
    if quick:
        names, targets = [".lock", "evaluations.jsonl", "samples.csv", "report/index.html", "config.json"], ["file"]
    for name in names:
        for target in targets:
            controls = [] if quick else ["evaluate"]
            for command in dict.fromkeys(USES[name] + [c for c in controls if c not in USES[name]]):
                if quick and command not in USES[name][:1]:
                    continue
                yield f"{name} -> {target}, {command}", _guard(lambda n=name, t=target, c=command: _link_case(
                    corpus, n, t, c, uses=c in USES[n]))
    for name, command in ([(".lock", "resume-finished"), ("evaluations.jsonl", "evaluate")] if quick else
                          [(".lock", "resume-finished"), (".lock", "resume-more"), ("evaluations.jsonl", "evaluate"),
                           ("metrics.jsonl", "resume-more")]):
        yield f"{name} hard link, {command}", _guard(lambda n=name, c=command: _link_case(corpus, n, "hardlink", c,
                                                                                            uses=True))


def _link_case(corpus, name, target, command, uses):
    where, run = corpus.copy("fa", "links")
    outside = where / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_bytes(b"the user's own file\n")
    (outside / "dir").mkdir()
    (outside / "dir" / "keep.txt").write_bytes(b"keep\n")
    link = run / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(link):
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    if target == "hardlink":
        os.link(victim, link)
    else:
        os.symlink({"file": victim, "dangling": outside / "nowhere", "dir": outside / "dir"}[target], link)
    before = tree(outside)
    code, _, err = cli(*COMMANDS[command](run), where=where)
    problems = basic(code, err)
    if tree(outside) != before:
        problems.append(f"wrote outside the run directory through the planted {target} link {name}")
    if uses and target != "hardlink" and code != 2:
        problems.append(f"{command} used a planted link {name} instead of refusing it (exit {code})")
    return code, err, problems


# ----------------------------------------------------------------------------------------------
# 2. Two fits on one --out at the same moment
# ----------------------------------------------------------------------------------------------

def races(corpus, quick):
    variants = [("new --out", 0.0, 2), ("an empty --out", 0.0, 2), ("--out with missing parents", 0.0, 2),
                ("the default runs/MODEL-DATA", 0.0, 2), ("a folder with a stale .lock", 0.0, 2),
                ("new --out, three fits", 0.0, 3), ("new --out, 0.5 s apart", 0.5, 2),
                ("new --out, 1.5 s apart", 1.5, 2), ("an empty --out, 1 s apart", 1.0, 2)]
    for name, delay, count in (variants[:1] if quick else variants):
        yield name, _guard(lambda n=name, d=delay, c=count: _race_case(corpus, n, d, c))


def _race_case(corpus, variant, delay, count):
    where = corpus.scratch("race")
    out = where / ("a/b/run" if "missing parents" in variant else "run")
    if "empty" in variant or "stale" in variant:
        out.mkdir()
    if "stale" in variant:
        (out / ".lock").write_text("12345")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    for i in range(count):
        args = [sys.executable, "-m", "pyro_lvm.cli", "fit", *FA, "--data", "faithful", "--epochs", "3",
                "--seed", str(i + 1), "--quiet"]
        if "default" not in variant:
            args += ["--out", str(out)]
        procs.append(subprocess.Popen(args, cwd=where, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
        if delay:
            time.sleep(delay)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    if "default" in variant:
        out = where / "runs" / "FactorAnalysis-faithful"
    codes = [c for c, _ in results]
    problems = []
    winners = [i for i, c in enumerate(codes) if c == 0]
    if len(winners) != 1:
        problems.append(f"{len(winners)} of {count} fits on one --out exited 0 (exit statuses {codes})")
    for i, (c, err) in enumerate(results):
        if c not in (0, 2) or "Traceback" in err:
            problems.append(f"fit {i} ended with exit {c}: {last_line(err)[:150]}")
        elif c == 2 and not any(w in err for w in ("already exists", "another pyro-lvm fit")):
            problems.append(f"fit {i} was refused for another reason: {last_line(err)[:150]}")
    if len(winners) == 1:
        try:
            config = json.loads((out / "config.json").read_text())
            metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            state = torch.load(out / "checkpoint.pt", weights_only=True)
            if config["seed"] != winners[0] + 1:
                problems.append(f"the run holds the config of fit {config['seed'] - 1}, not of the one that won")
            if [m["epoch"] for m in metrics] != [1, 2, 3] or state["epoch"] != 3:
                problems.append(f"the winning run is damaged: metrics epochs {[m['epoch'] for m in metrics]}")
        except Exception as err:  # noqa: BLE001
            problems.append(f"the winning run cannot be read: {type(err).__name__}: {err}")
    return (codes[0] if codes else None), "\n".join(e for _, e in results), problems


# ----------------------------------------------------------------------------------------------
# 3. CSV files: a byte-order mark, headers, line endings
# ----------------------------------------------------------------------------------------------

BOM = "\ufeff"


def _csv_variants():
    rng = np.random.default_rng(1)
    rows = [",".join(f"{v:.4f}" for v in rng.normal(size=2)) for _ in range(30)]
    one = [f"{v:.4f}" for v in rng.normal(size=30)]
    return [
        ("BOM, no header", BOM + "\n".join(rows) + "\n", 30, "utf-8"),
        ("BOM, header", BOM + "a,b\n" + "\n".join(rows) + "\n", 30, "utf-8"),
        ("no BOM, no header", "\n".join(rows) + "\n", 30, "utf-8"),
        ("BOM, CRLF, no header", BOM + "\r\n".join(rows) + "\r\n", 30, "utf-8"),
        ("BOM, a blank first line, no header", BOM + "\n" + "\n".join(rows) + "\n", 30, "utf-8"),
        ("BOM, one column, no header", BOM + "\n".join(one) + "\n", 30, "utf-8"),
        ("BOM, header, CRLF", BOM + "a,b\r\n" + "\r\n".join(rows) + "\r\n", 30, "utf-8"),
        ("BOM, scientific notation first", BOM + "1e-3,2E+1\n" + "\n".join(rows) + "\n", 31, "utf-8"),
        ("BOM, signs first", BOM + "+1.5,-2\n" + "\n".join(rows) + "\n", 31, "utf-8"),
        ("BOM, spaces around cells", BOM + "\n".join(" " + r.replace(",", " , ") for r in rows) + "\n", 30, "utf-8"),
        ("BOM, quoted header", BOM + '"a","b"\n' + "\n".join(rows) + "\n", 30, "utf-8"),
        ("BOM, no final newline", BOM + "\n".join(rows), 30, "utf-8"),
        ("UTF-16 with BOM", "\n".join(rows) + "\n", 30, "utf-16"),
        ("BOM, integers only", BOM + "\n".join(f"{i},{i % 7}" for i in range(30)) + "\n", 30, "utf-8"),
    ]


def csv_rows(corpus, quick):
    variants = _csv_variants()
    for name, text, n, encoding in (variants[:3] if quick else variants):
        yield name, _guard(lambda t=text, n=n, e=encoding: _csv_case(corpus, t, n, e))


def _csv_case(corpus, text, rows, encoding):
    where = corpus.scratch("csv")
    path = where / "data.csv"
    path.write_bytes(text.encode(encoding))
    code, _, err = cli("fit", *FA, "--data", path, "--epochs", "1", "--quiet", "--out", where / "run", where=where)
    problems = basic(code, err)
    if code == 0:
        sizes = json.loads((where / "run" / "config.json").read_text())["data"]["sizes"]
        if sum(sizes.values()) != rows:
            problems.append(f"the CSV has {rows} data rows but the fit read {sum(sizes.values())}")
    return code, err, problems


# ----------------------------------------------------------------------------------------------
# 4. Hand-edited or damaged run files
# ----------------------------------------------------------------------------------------------

def _deep(depth):
    return "[" * depth + "]" * depth


CONFIG_EDITS = [
    ("data as a string", lambda c: c.update(data="faithful")),
    ("data as {}", lambda c: c.update(data={})),
    ("data as 5", lambda c: c.update(data=5)),
    ("data as a list", lambda c: c.update(data=["faithful"])),
    ("data name as a number", lambda c: c["data"].update(name=5)),
    ("data binarize unknown", lambda c: c["data"].update(binarize="sometimes")),
    ("data sizes as a string", lambda c: c["data"].update(sizes="many")),
    ("hyperparameters as a string", lambda c: c.update(hyperparameters="latent_dim=1")),
    ("hyperparameters as a list", lambda c: c.update(hyperparameters=[1, 2])),
    ("hyperparameter of the wrong type", lambda c: c["hyperparameters"].update(latent_dim="one")),
    ("an unknown hyperparameter", lambda c: c["hyperparameters"].update(nope=1)),
    ("epochs as 'ten'", lambda c: c.update(epochs="ten")),
    ("epochs as 0", lambda c: c.update(epochs=0)),
    ("epochs as 1.5", lambda c: c.update(epochs=1.5)),
    ("batch size 0", lambda c: c.update(batch_size=0)),
    ("batch size as null", lambda c: c.update(batch_size=None)),
    ("lr -1", lambda c: c.update(lr=-1)),
    ("lr as a string", lambda c: c.update(lr="fast")),
    ("seed -1", lambda c: c.update(seed=-1)),
    ("objective unknown", lambda c: c.update(objective="elbow")),
    ("objective as a number", lambda c: c.update(objective=3)),
    ("particles 0", lambda c: c.update(particles=0)),
    ("model as a number", lambda c: c.update(model=5)),
    ("model empty", lambda c: c.update(model="")),
    ("no model", lambda c: c.pop("model")),
    ("no hyperparameters", lambda c: c.pop("hyperparameters")),
    ("on_nan unknown", lambda c: c.update(on_nan="ignore")),
]
CONFIG_FILES = [
    ("100,000-deep nesting", lambda: _deep(100000).encode()),
    ("not UTF-8", lambda: b'{"model": "\xff\xfe"}'),
    ("a JSON list", lambda: b"[1, 2, 3]"),
    ("a JSON string", lambda: b'"config"'),
    ("empty", lambda: b""),
    ("truncated", lambda: b'{"model": "ppca", "da'),
]
METRICS_LINES = [
    ("a non-UTF-8 line", b"\xff\xfe\xfd\n"),
    ("a list line", b"[1, 2]\n"),
    ("a number line", b"5\n"),
    ("a string line", b'"epoch"\n'),
    ("epoch -3", b'{"epoch": -3, "train_elbo": 1.0}\n'),
    ("epoch as a string", b'{"epoch": "two"}\n'),
    ("train_elbo as a string", b'{"epoch": 1, "train_elbo": "high"}\n'),
    ("100,000-deep line", _deep(100000).encode() + b"\n"),
]


def _bad_checkpoints():
    """``(name, edit of the loaded state)``: checkpoints that load with weights_only but are wrong."""
    return [
        ("no rng", lambda s: s.pop("rng")),
        ("no optimizer", lambda s: s.pop("optimizer")),
        ("no epoch", lambda s: s.pop("epoch")),
        ("no model", lambda s: s.pop("model")),
        ("epoch -1", lambda s: s.update(epoch=-1)),
        ("epoch -100", lambda s: s.update(epoch=-100)),
        ("epoch as a string", lambda s: s.update(epoch="1")),
        ("epoch as a tensor", lambda s: s.update(epoch=torch.tensor([1, 2]))),
        ("rng as a string", lambda s: s.update(rng="seed")),
        ("rng state cut short", lambda s: s["rng"].update(torch=s["rng"]["torch"][:10])),
        ("optimizer as a list", lambda s: s.update(optimizer=[1, 2])),
        ("optimizer state of other shapes", lambda s: [v.update(exp_avg=torch.zeros(7, 7))
                                                     for v in s["optimizer"]["state"].values()]),
        ("optimizer lr as a string", lambda s: s["optimizer"]["param_groups"][0].update(lr="fast")),
        ("optimizer step as a string", lambda s: [v.update(step="3") for v in s["optimizer"]["state"].values()]),
        ("optimizer betas out of range", lambda s: s["optimizer"]["param_groups"][0].update(betas=[2.0, 0.9])),
        ("model as a list", lambda s: s.update(model=[1, 2])),
        ("a NaN weight", lambda s: next(iter(s["model"].values())).fill_(float("nan"))),
        ("model weights of other shapes", lambda s: s["model"].update({k: torch.zeros(9, 9) for k in s["model"]})),
        ("running sum as a string", lambda s: s.update(running_elbo_sum="0")),
        ("step in epoch past the end", lambda s: s.update(step_in_epoch=10 ** 6)),
        ("global step -5", lambda s: s.update(global_step=-5)),
        ("seconds NaN", lambda s: s.update(seconds=float("nan"))),
        ("epoch 0 with metrics", lambda s: s.update(epoch=0, step_in_epoch=0)),
    ]


def damaged_files(corpus, quick):
    commands = ["evaluate", "resume-more"]
    edits = CONFIG_EDITS[::6] if quick else CONFIG_EDITS
    for name, edit in edits:
        for command in (commands[:1] if quick else commands):
            yield f"config.json {name}, {command}", _guard(lambda e=edit, c=command: _config_case(corpus, e, c))
    for name, content in (CONFIG_FILES[:2] if quick else CONFIG_FILES):
        for command in (commands[:1] if quick else commands):
            yield f"config.json {name}, {command}", _guard(lambda f=content, c=command: _config_case(corpus, None, c, f))
    for name, line in (METRICS_LINES[:2] if quick else METRICS_LINES):
        for command in (["evaluate"] if quick else ["evaluate", "resume-more"]):
            yield f"metrics.jsonl {name}, {command}", _guard(lambda l=line, c=command: _metrics_case(corpus, l, c))
    kinds = ["dir", "fifo"]
    for name in ([".lock", "evaluations.jsonl"] if quick else ["metrics.jsonl", "evaluations.jsonl", "config.json",
                                                                 "checkpoint.pt", ".lock"]):
        for kind in (kinds[:1] if quick else kinds):
            for command in (["resume-more"] if name == ".lock" else ["evaluate"] if quick else commands):
                yield f"{name} as a {kind}, {command}", _guard(lambda n=name, k=kind, c=command: _kind_case(
                    corpus, n, k, c))
    checkpoints = _bad_checkpoints()
    for name, edit in (checkpoints[::5] if quick else checkpoints):
        for command in (["resume-more"] if quick else commands):
            yield f"checkpoint {name}, {command}", _guard(lambda e=edit, c=command: _checkpoint_case(corpus, e, c))


def _run_damaged(run, where, command, must_name):
    before = tree(run / "metrics.jsonl")
    code, _, err = cli(*COMMANDS[command](run), where=where)
    problems = basic(code, err)
    if code == 2 and must_name and must_name not in last_line(err):
        problems.append(f"refused without naming {must_name}: {last_line(err)[:160]}")
    if command.startswith("resume") and code != 0 and tree(run / "metrics.jsonl") != before:
        problems.append("a refused resume changed metrics.jsonl")
    return code, err, problems


def _config_case(corpus, edit, command, content=None):
    where, run = corpus.copy("fa", "config")
    if content is not None:
        (run / "config.json").write_bytes(content())
    else:
        config = json.loads((run / "config.json").read_text())
        edit(config)
        (run / "config.json").write_text(json.dumps(config))
    code, err, problems = _run_damaged(run, where, command, "config.json")
    if code == 0:
        problems.append(f"{command} accepted a damaged config.json")
    return code, err, problems


def _metrics_case(corpus, line, command):
    where, run = corpus.copy("fa", "metrics")
    good = (run / "metrics.jsonl").read_bytes()
    (run / "metrics.jsonl").write_bytes(line + good)
    return _run_damaged(run, where, command, "metrics.jsonl")


def _kind_case(corpus, name, kind, command):
    where, run = corpus.copy("fa", "kind")
    path = run / name
    if os.path.lexists(path):
        path.unlink()
    if kind == "dir":
        path.mkdir()
    else:
        os.mkfifo(path)
    code, err, problems = _run_damaged(run, where, command, name)
    uses = {".lock": ["resume-more"], "evaluations.jsonl": ["evaluate"]}.get(name, COMMANDS)
    if command in uses and code == 0:
        problems.append(f"{command} went on with {name} as a {kind}")
    return code, err, problems


def _checkpoint_case(corpus, edit, command):
    where, run = corpus.copy("fa", "checkpoint")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    edit(state)
    torch.save(state, run / "checkpoint.pt")
    code, err, problems = _run_damaged(run, where, command, "checkpoint.pt")
    return code, err, problems


# ----------------------------------------------------------------------------------------------
# 5. --resume with other options, or on changed data
# ----------------------------------------------------------------------------------------------

CONFLICTS = [
    ("another model (ppca)", ["ppca"], None),
    ("another model (a file)", [f"{FIXTURES / 'killed_model.py'}:KilledFactorAnalysis"], None),
    ("--data faithful", None, ["--data", "faithful"]),
    ("--lr 0.01", None, ["--lr", "0.01"]),
    ("--batch-size 7", None, ["--batch-size", "7"]),
    ("--seed 5", None, ["--seed", "5"]),
    ("--objective iwae", None, ["--objective", "iwae"]),
    ("--particles 2", None, ["--particles", "2"]),
    ("-p latent_dim=2", None, ["-p", "latent_dim=2"]),
    ("--binarize static", None, ["--binarize", "static"]),
    ("--on-nan skip", None, ["--on-nan", "skip"]),
    ("--kl-warmup 5", None, ["--kl-warmup", "5"]),
    ("--free-bits 0.5", None, ["--free-bits", "0.5"]),
    ("--config of another run", None, ["--config", "{other}"]),
]
SAME = [
    ("--epochs only", None, []),
    ("the same options again", FA[:1], ["-p", "latent_dim=1", "--lr", "0.001", "--seed", "0", "--batch-size", "16"]),
    ("the model as '-'", ["-"], []),
]
DATA_CHANGES = [
    ("more rows", lambda x: np.concatenate([x, x[:10]])),
    ("fewer rows", lambda x: x[:50]),
    ("same shape, other values", lambda x: x + 0.5),
    ("one value changed", lambda x: np.where(np.arange(x.size).reshape(x.shape) == 7, 9.0, x).astype(x.dtype)),
]


def resume_options(corpus, quick):
    for name, model, flags in (CONFLICTS[::4] if quick else CONFLICTS):
        yield f"resume with {name}", _guard(lambda m=model, f=flags: _resume_case(corpus, m, f, refuse=True))
    for name, model, flags in (SAME[:1] if quick else SAME):
        yield f"resume with {name} (control)", _guard(lambda m=model, f=flags: _resume_case(corpus, m, f, refuse=False))
    for name, change in (DATA_CHANGES[2:3] if quick else DATA_CHANGES):
        for command in (["resume-more"] if quick else ["resume-more", "evaluate"]):
            yield f"data file {name}, {command}", _guard(lambda c=change, cmd=command: _data_change_case(corpus, c, cmd))


def _resume_case(corpus, model, flags, refuse):
    where, run = corpus.copy("fa-file", "resume")
    flags = [f.replace("{other}", str(corpus.run("fa") / "config.json")) for f in (flags or [])]
    before = run_snapshot(run)
    code, _, err = cli("fit", *(model or FA[:1]), "--out", run, "--resume", "--epochs", "2", "--quiet", *flags,
                       where=where)
    problems = basic(code, err)
    if refuse:
        if code != 2:
            problems.append(f"--resume went on (exit {code}) with an option that differs from the run's")
        if run_snapshot(run) != before:
            problems.append("the refused resume changed the run")
    elif code != 0:
        problems.append(f"a resume with the run's own options was refused: {last_line(err)[:160]}")
    return code, err, problems


def _data_change_case(corpus, change, command):
    where, run = corpus.copy("fa-file", "datachange")
    data = Path(json.loads((run / "config.json").read_text())["data"]["name"])
    copy = where / "data.npy"
    np.save(copy, change(np.load(data)))
    config = json.loads((run / "config.json").read_text())
    config["data"]["name"] = str(copy)
    (run / "config.json").write_text(json.dumps(config, indent=2))
    before = run_snapshot(run)
    code, _, err = cli(*COMMANDS[command](run), where=where)
    problems = basic(code, err)
    if code != 2:
        problems.append(f"{command} went on (exit {code}) on a data file that changed since the fit")
    after = run_snapshot(run)
    if command.startswith("resume") and after != before:
        problems.append("the refused resume changed the run")
    return code, err, problems


# ----------------------------------------------------------------------------------------------
# 6. Memory under a container's limit
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def memory_limit(where, limit, version=2):
    """A fake cgroup tree with ``limit`` bytes, in place of the real one, for pyro_lvm.resources."""
    try:
        import pyro_lvm.resources as resources
    except ImportError:  # a pyro-lvm without the module reads no limit: nothing to patch
        yield
        return
    root = where / "cgroup"
    if version == 2:
        (root / "job").mkdir(parents=True)
        (root / "job" / "memory.max").write_text(f"{limit}\n")
        (root / "job" / "memory.current").write_text("0\n")
        (root / "job" / "memory.stat").write_text("anon 0\ninactive_file 0\n")
        own = "0::/job\n"
    else:
        (root / "memory" / "job").mkdir(parents=True)
        (root / "memory" / "job" / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (root / "memory" / "job" / "memory.usage_in_bytes").write_text("0\n")
        (root / "memory").joinpath("memory.limit_in_bytes").write_text("9223372036854771712\n")
        own = "4:memory:/job\n1:cpu:/\n"
    (where / "proc-cgroup").write_text(own)
    saved = resources.CGROUP_ROOT, resources.PROC_SELF_CGROUP
    resources.CGROUP_ROOT, resources.PROC_SELF_CGROUP = root, where / "proc-cgroup"
    try:
        yield
    finally:
        resources.CGROUP_ROOT, resources.PROC_SELF_CGROUP = saved


LIMIT = 16 * 2 ** 20


def _zeros(shape, dtype=np.float64):
    return np.zeros(shape, dtype=dtype)


INFLATING = {  # label: writes the file into a folder, returns its path
    "an .npz that inflates to 48 MB": lambda w: (np.savez_compressed(w / "f.npz", x=_zeros((3_000_000, 2))), w / "f.npz"),
    "an .npz of float32 splits, 16 MB": lambda w: (np.savez_compressed(
        w / "f.npz", train=_zeros((2_000_000, 2), np.float32), valid=_zeros((10, 2), np.float32),
        test=_zeros((10, 2), np.float32)), w / "f.npz"),
    "a 48 MB .npy": lambda w: (np.save(w / "f.npy", _zeros((3_000_000, 2))), w / "f.npy"),
    "a 24 MB .pt": lambda w: (torch.save(torch.zeros(3_000_000, 2), w / "f.pt"), w / "f.pt"),
    "a 6 MB CSV": lambda w: ((w / "f.csv").write_text("0,0\n" * 1_500_000), w / "f.csv"),
}


def memory(corpus, quick):
    yield "iwae --particles 20000 under 16 MiB", _guard(lambda: _memory_case(
        corpus, lambda w: ["fit", *FA, "--data", "faithful", "--epochs", "1", "--objective", "iwae",
                           "--particles", "20000", "--quiet", "--out", w / "run"]))
    yield "vae -p hidden=2000,2000 under 16 MiB", _guard(lambda: _memory_case(
        corpus, lambda w: ["fit", "vae", "-p", "hidden=2000,2000", "--data", "digits", "--epochs", "1",
                           "--batch-size", "400", "--quiet", "--out", w / "run"]))
    if not quick:
        yield "sample -n 1000000 under 16 MiB", _guard(lambda: _memory_case(
            corpus, lambda w: ["sample", corpus.run("fa"), "-n", "1000000", "--out", w / "s.csv"]))
        yield "vae -p hidden=2000,2000 under 16 MiB, cgroup v1", _guard(lambda: _memory_case(
            corpus, lambda w: ["fit", "vae", "-p", "hidden=2000,2000", "--data", "digits", "--epochs", "1",
                               "--batch-size", "400", "--quiet", "--out", w / "run"], version=1))
        yield "iwae --particles 20000 under 16 MiB, cgroup v1", _guard(lambda: _memory_case(
            corpus, lambda w: ["fit", *FA, "--data", "faithful", "--epochs", "1", "--objective", "iwae",
                               "--particles", "20000", "--quiet", "--out", w / "run"], version=1))
    for label in (list(INFLATING)[:1] if quick else INFLATING):
        yield f"{label} under 16 MiB", _guard(lambda lb=label: _memory_case(
            corpus, lambda w: ["fit", *FA, "--data", INFLATING[lb](w)[1], "--epochs", "1", "--batch-size",
                               "1000000", "--quiet", "--out", w / "run"]))


def _memory_case(corpus, make_args, version=2):
    where = corpus.scratch("memory")
    args = make_args(where)
    with memory_limit(where, LIMIT, version):
        code, _, err = cli(*args, where=where)
    problems = basic(code, err)
    if code != 2:
        problems.append(f"not refused under a 16 MiB memory limit (exit {code})")
    elif "memory" not in err.lower():
        problems.append(f"refused, but not for memory: {last_line(err)[:160]}")
    return code, err, problems


# ----------------------------------------------------------------------------------------------
# 7. Other crashes: huge values, odd --out paths
# ----------------------------------------------------------------------------------------------

def crashes(corpus, quick):
    scales = [1e19, 1e20, 1e22, 1e25, 1e30, 1e37]
    models = {"ppca": ["ppca"], "mog": ["mog"], "fa": FA}
    for scale in (scales[1:2] if quick else scales):
        for model in (["ppca", "mog"] if quick else models):
            yield f"data x {scale:g}, {model}", _guard(lambda s=scale, m=models[model]: _huge_case(corpus, s, m))
    paths = ["a dangling symbolic link", "a link to a missing folder", "under a regular file", "a name of 300 bytes",
             "a name of 256 bytes"]
    for kind in (paths[:3] if quick else paths):
        for command in (["fit"] if quick else ["fit", "sample", "report"]):
            yield f"--out {kind}, {command}", _guard(lambda k=kind, c=command: _out_case(corpus, k, c))
    if not quick:
        yield "evaluate RUN as a dangling link", _guard(lambda: _run_link_case(corpus))


def _huge_case(corpus, scale, model):
    where = corpus.scratch("huge")
    base = np.random.default_rng(0).normal(size=(60, 2))
    np.save(where / "huge.npy", (base * scale).astype(np.float32))
    code, _, err = cli("fit", *model, "--data", where / "huge.npy", "--epochs", "2", "--quiet", "--out", where / "run",
                       where=where)
    return code, err, basic(code, err)


def _out_path(where, kind, suffix):
    if kind == "a dangling symbolic link":
        os.symlink(where / "nowhere", where / "link")
        return where / "link", where / "nowhere"
    if kind == "a link to a missing folder":
        os.symlink(where / "missing" / "deeper", where / "link")
        return where / "link", where / "missing"
    if kind == "under a regular file":
        (where / "file").write_text("a file")
        return where / "file" / ("x" + suffix), None
    length = 300 if "300" in kind else 256
    return where / (("n" * (length - len(suffix))) + suffix), None


def _out_case(corpus, kind, command):
    where = corpus.scratch("out")
    suffix = {"fit": "", "sample": ".csv", "report": ""}[command]
    out, must_not_exist = _out_path(where, kind, suffix)
    if command == "fit":
        args = ["fit", *FA, "--data", "faithful", "--epochs", "1", "--quiet", "--out", out]
    elif command == "sample":
        args = ["sample", corpus.run("fa"), "-n", "3", "--out", out]
    else:
        args = ["report", corpus.run("fa"), "--out", out]
    code, _, err = cli(*args, where=where)
    problems = basic(code, err)
    if must_not_exist is not None and os.path.lexists(must_not_exist):
        problems.append(f"created {must_not_exist} through the link")
    return code, err, problems


def _run_link_case(corpus):
    where = corpus.scratch("runlink")
    os.symlink(where / "gone", where / "run")
    code, _, err = cli("evaluate", where / "run", where=where)
    problems = basic(code, err)
    if code != 2:
        problems.append(f"exit {code}")
    return code, err, problems


# ----------------------------------------------------------------------------------------------
# 8. Messages that must be true
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def patched(module, name, replacement):
    old = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, old)


def _fail_at_step(error, at):
    import pyro_lvm.training.loop as loop

    real = loop.take_step
    calls = [0]

    def take_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise error
        return real(*args, **kwargs)

    return patched(loop, "take_step", take_step)


def _fail_at_checkpoint(error, at):
    import pyro_lvm.training.loop as loop

    real = loop.save_checkpoint
    calls = [0]

    def save(path, state):
        calls[0] += 1
        if calls[0] == at:
            raise error
        return real(path, state)

    return patched(loop, "save_checkpoint", save)


FIT_LONG = ["fit", *FA, "--data", "faithful", "--epochs", "3", "--batch-size", "32", "--quiet"]


def messages(corpus, quick):
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 1000000000 bytes")
    fit_faults = [
        ("Ctrl-C at the first step", lambda: _fail_at_step(KeyboardInterrupt(), 1)),
        ("Ctrl-C before the first checkpoint", lambda: _fail_at_step(KeyboardInterrupt(), 4)),
        ("a full disk at the first checkpoint",
         lambda: _fail_at_checkpoint(OSError(errno.ENOSPC, "No space left on device"), 1)),
        ("out of memory at the first step", lambda: _fail_at_step(oom, 1)),
        ("out of memory in the second epoch", lambda: _fail_at_step(oom, 8)),
        ("Ctrl-C in the second epoch", lambda: _fail_at_step(KeyboardInterrupt(), 9)),
        ("Ctrl-C in the first checkpoint", lambda: _fail_at_checkpoint(KeyboardInterrupt(), 1)),
    ]
    for name, fault in (fit_faults[:2] if quick else fit_faults):
        yield f"fit: {name}", _guard(lambda f=fault: _fit_fault_case(corpus, f))
    yield "evaluate: Ctrl-C", _guard(lambda: _interrupted_command_case(corpus, "evaluate"))
    if not quick:
        yield "sample: Ctrl-C", _guard(lambda: _interrupted_command_case(corpus, "sample"))
        yield "evaluate: out of memory", _guard(lambda: _interrupted_command_case(corpus, "evaluate", oom))
    kinds = ["a directory", "a FIFO", "/dev/zero", "a socket", "a dangling link"]
    for kind in (kinds[:2] if quick else kinds):
        yield f"--data {kind}", _guard(lambda k=kind: _data_kind_case(corpus, k))
    for kind in (["a regular file"] if quick else ["a regular file", "a FIFO", "an empty folder"]):
        yield f"evaluate RUN as {kind}", _guard(lambda k=kind: _run_kind_case(corpus, k))
    for name in (["with a class"] if quick else ["with a class", "without a class"]):
        yield f"a model file in a folder named a:b, {name}", _guard(lambda n=name: _colon_case(corpus, n))


def _fit_fault_case(corpus, fault):
    where = corpus.scratch("fault")
    out = where / "run"
    with fault():
        code, _, err = cli(*FIT_LONG, "--out", out, where=where)
    problems = basic(code, err) if code != 130 else []
    has_checkpoint = (out / "checkpoint.pt").is_file()
    claims = "intact" in err or ("--resume" in err and "nothing to resume" not in err)
    if claims and not has_checkpoint:
        problems.append(f"says the checkpoint is intact or to --resume, but there is no checkpoint: {last_line(err)[:200]}")
    if has_checkpoint and "--resume" not in err:
        problems.append("does not say that the run can be resumed, though it can")
    if has_checkpoint:  # and the resume it points to must work
        resumed, _, rerr = cli("fit", "-", "--out", out, "--resume", "--quiet", where=where)
        if resumed != 0:
            problems.append(f"the resume it points to fails: {last_line(rerr)[:160]}")
    return code, err, problems


def _interrupted_command_case(corpus, command, error=None):
    where, run = corpus.copy("fa", "interrupted")
    error = error or KeyboardInterrupt()
    import pyro_lvm.estimators as estimators

    def boom(*args, **kwargs):
        raise error

    if command == "evaluate":
        context = patched(estimators, "estimate_log_marginal", boom)
        args = ["evaluate", run, "--estimator", "exact"]
    else:
        context = patched(torch.random, "fork_rng", boom)
        args = ["sample", run, "-n", "3"]
    before = run_snapshot(run)
    with context:
        code, _, err = cli(*args, where=where)
    problems = basic(code, err) if code != 130 else []
    if "checkpoint" in err or "--resume" in err:
        problems.append(f"{command} speaks of a checkpoint and --resume: {last_line(err)[:200]}")
    if run_snapshot(run) != before:
        problems.append("the run changed")
    return code, err, problems


def _data_kind_case(corpus, kind):
    where = corpus.scratch("datakind")
    if kind == "a directory":
        path = where / "folder.csv"
        path.mkdir()
    elif kind == "a FIFO":
        path = where / "pipe.csv"
        os.mkfifo(path)
    elif kind == "/dev/zero":
        path = Path("/dev/zero")
    elif kind == "a socket":
        path = where / "s.npy"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    else:
        path = where / "gone.npy"
        os.symlink(where / "nowhere.npy", path)
    try:
        code, _, err = cli("fit", "ppca", "--data", path, "--epochs", "1", "--quiet", "--out", where / "run", where=where)
    finally:
        if kind == "a socket":
            server.close()
    problems = basic(code, err)
    if code != 2:
        problems.append(f"exit {code}")
    if kind != "a dangling link" and "does not exist" in err:
        problems.append(f"says 'does not exist' for {kind}: {last_line(err)[:160]}")
    return code, err, problems


def _run_kind_case(corpus, kind):
    where = corpus.scratch("runkind")
    path = where / "run"
    if kind == "a regular file":
        path.write_text("not a run")
    elif kind == "a FIFO":
        os.mkfifo(path)
    else:
        path.mkdir()
    code, _, err = cli("evaluate", path, where=where)
    problems = basic(code, err)
    if code != 2:
        problems.append(f"exit {code}")
    if kind != "an empty folder" and "does not exist" in err:
        problems.append(f"says 'does not exist' for {kind}: {last_line(err)[:160]}")
    return code, err, problems


def _colon_case(corpus, variant):
    where = corpus.scratch("colon")
    folder = where / "a:b"
    folder.mkdir()
    shutil.copy(REPO / "examples" / "factor_analysis.py", folder / "model.py")
    spec = str(folder / "model.py") + (":FactorAnalysis" if variant == "with a class" else "")
    code, _, err = cli("fit", spec, "-p", "latent_dim=1", "--data", "faithful", "--epochs", "1", "--quiet",
                       "--out", where / "run", where=where)
    problems = basic(code, err)
    if code != 0:
        problems.append(f"a model file that exists was not loaded: {last_line(err)[:160]}")
    return code, err, problems


# ----------------------------------------------------------------------------------------------
# 9. Accepted when it should be refused
# ----------------------------------------------------------------------------------------------

def refusals(corpus, quick):
    fits = [
        ("vae -p latent_dim=0", ["vae", "-p", "latent_dim=0", "-p", "hidden=8"], "digits"),
        ("vae -p hidden=0", ["vae", "-p", "latent_dim=2", "-p", "hidden=0"], "digits"),
        ("vae -p hidden=8,0", ["vae", "-p", "latent_dim=2", "-p", "hidden=8,0"], "digits"),
        ("ppca -p latent_dim=0", ["ppca", "-p", "latent_dim=0"], "faithful"),
        ("factor analysis -p latent_dim=0", [FA[0], "-p", "latent_dim=0"], "faithful"),
        ("mog -p num_components=0", ["mog", "-p", "num_components=0"], "faithful"),
    ]
    for name, model, data in (fits[:2] if quick else fits):
        yield name, _guard(lambda m=model, d=data: _refuse_case(corpus, lambda w: ["fit", *m, "--data", d, "--epochs",
                                                                                 "1", "--quiet", "--out", w / "run"]))
    evaluations = [("--ais-steps 0", ["--ais-steps", "0"]), ("--ais-steps -1", ["--ais-steps", "-1"]),
                   ("--bdmc-points -3", ["--bdmc-points", "-3"]), ("--bdmc-points -1", ["--bdmc-points", "-1"])]
    for name, flags in (evaluations[:2] if quick else evaluations):
        yield f"evaluate {name}", _guard(lambda f=flags: _refuse_case(corpus, lambda w: [
            "evaluate", corpus.run("fa"), "--estimator", "ais", "--samples", "2", "--limit", "2", *f]))
    configs = [("data 5", {"data": 5}), ("data true", {"data": True}), ("data []", {"data": []}),
               ("data {}", {"data": {}}), ("data {name: 5}", {"data": {"name": 5}}),
               ("hyperparameters 'x'", {"hyperparameters": "x"}), ("hyperparameters [1]", {"hyperparameters": [1]}),
               ("epochs 'ten'", {"epochs": "ten"}), ("batch_size 0", {"batch_size": 0}), ("lr -1", {"lr": -1}),
               ("model 5", {"model": 5}), ("seed 1.5", {"seed": 1.5})]
    for name, config in (configs[:3] if quick else configs):
        yield f"fit --config with {name}", _guard(lambda c=config: _config_file_case(corpus, c))


def _refuse_case(corpus, make_args):
    where = corpus.scratch("refuse")
    args = make_args(where)
    code, _, err = cli(*args, where=where)
    problems = basic(code, err)
    if code != 2:
        problems.append(f"accepted (exit {code})")
    warnings = [line for line in err.splitlines() if "Warning" in line]
    if warnings:
        problems.append(f"{len(warnings)} Python warning line(s) on stderr: {warnings[0][:120]}")
    return code, err, problems


def _config_file_case(corpus, values):
    where = corpus.scratch("configfile")
    config = {"model": "ppca", "data": "faithful", "epochs": 1, **values}
    (where / "options.json").write_text(json.dumps(config))
    return _refuse_case(corpus, lambda w: ["fit", "-" if "model" not in values else "ppca", "--config",
                                           where / "options.json", "--quiet", "--out", where / "run"])


# ----------------------------------------------------------------------------------------------
# 10. evaluate --json and diagnose --json are JSON
# ----------------------------------------------------------------------------------------------

def json_output(corpus, quick):
    kinds = ["neg-inf", "nan", "pos-inf"]
    splits = ["test", "valid", "train"]
    for kind in (kinds[:2] if quick else kinds):
        for split in (splits[:1] if quick else splits):
            yield f"log p(x) {kind}, {split}", _guard(lambda k=kind, s=split: _json_case(corpus, k, s))
    if not quick:
        yield "diagnose --json, log p(x) -inf", _guard(lambda: _diagnose_json_case(corpus))


def _json_case(corpus, kind, split):
    where, run = corpus.copy(f"broken-{kind}", "json")
    code, out, err = cli("evaluate", run, "--estimator", "exact", "--split", split, "--json", where=where)
    problems = basic(code, err)
    if code == 0:
        try:
            record = strict_json(out)
            if record.get("log_px") is not None or not record.get("null_reason"):
                problems.append("a non-finite log_px is not null with a reason")
        except ValueError as e:
            problems.append(f"evaluate --json printed something that is not JSON ({e})")
        lines = [line for line in (run / "evaluations.jsonl").read_text().splitlines() if line.strip()]
        try:
            strict_json(lines[-1])
        except (ValueError, IndexError) as e:
            problems.append(f"evaluations.jsonl got a line that is not JSON ({e})")
    return code, err, problems


def _diagnose_json_case(corpus):
    where, run = corpus.copy("broken-neg-inf", "diagnose-json")
    code, out, err = cli("diagnose", run, "--json", "--is-samples", "5", where=where)
    problems = basic(code, err)
    if code == 0:
        try:
            strict_json(out)
        except ValueError as e:
            problems.append(f"diagnose --json printed something that is not JSON ({e})")
    return code, err, problems


# ----------------------------------------------------------------------------------------------
# 11. Outputs: never over the user's files, never half written
# ----------------------------------------------------------------------------------------------

def _png(path, color=(255, 0, 0)):
    from PIL import Image

    Image.new("RGB", (4, 4), color).save(path)


def outputs(corpus, quick):
    user_files = [("index.html", lambda p: p.write_text("<html>my own page</html>")),
                  ("samples.png", _png), ("diagnostics.json", lambda p: p.write_text('{"mine": 1}')),
                  ("curves.png", _png), ("khat.png", _png)]
    for name, make in (user_files[:1] if quick else user_files):
        yield f"report --out . over the user's {name}", _guard(lambda n=name, m=make: _report_over_case(corpus, n, m))
    if not quick:
        yield "report --out DIR twice (control)", _guard(lambda: _report_twice_case(corpus))
    user_samples = [("grid.csv", lambda p: p.write_text("my,own\n1,2\n"), "fa"), ("grid.png", _png, "vae"),
                    ("samples.csv beside the run", lambda p: p.write_text("mine\n"), "fa")]
    for name, make, kind in (user_samples[:1] if quick else user_samples):
        yield f"sample --out over the user's {name}", _guard(lambda n=name, m=make, k=kind: _sample_over_case(
            corpus, n, m, k))
    if not quick:
        yield "sample --out over its own earlier CSV (control)", _guard(lambda: _sample_twice_case(corpus))
        for command, kind in (("sample", "fa"), ("sample", "vae"), ("report", "fa")):
            for free in (2048, 65536):
                yield f"a full disk during {command} ({kind}, {free} bytes free)", _guard(
                    lambda c=command, k=kind, f=free: _full_disk_case(corpus, c, k, f))


def _report_over_case(corpus, name, make):
    where = corpus.scratch("report-over")
    make(where / name)
    before = tree(where)
    code, _, err = cli("report", corpus.run("fa"), "--out", ".", where=where)
    problems = basic(code, err)
    after = tree(where)
    if after.get(name) != before.get(name):
        problems.append(f"report --out . overwrote the user's {name}")
    return code, err, problems


def _report_twice_case(corpus):
    where = corpus.scratch("report-twice")
    (where / "notes.txt").write_text("mine")
    problems = []
    for _ in range(2):
        code, _, err = cli("report", corpus.run("fa"), "--out", where / "rep", where=where)
        problems += basic(code, err)
        if code != 0:
            problems.append(f"a second report into its own folder was refused: {last_line(err)[:160]}")
    if (where / "notes.txt").read_text() != "mine":
        problems.append("a file beside the report changed")
    return code, err, problems


def _sample_over_case(corpus, name, make, kind):
    where, run = corpus.copy(kind, "sample-over")
    target = (where / name) if "beside" not in name else (where / "samples.csv")
    make(target)
    before = target.read_bytes()
    code, _, err = cli("sample", run, "-n", "4", "--out", target, where=where)
    problems = basic(code, err)
    if target.read_bytes() != before:
        problems.append(f"sample overwrote the user's {target.name}")
    return code, err, problems


def _sample_twice_case(corpus):
    where = corpus.scratch("sample-twice")
    problems = []
    for n in ("3", "5"):
        code, _, err = cli("sample", corpus.run("fa"), "-n", n, "--out", where / "s.csv", where=where)
        problems += basic(code, err)
        if code != 0:
            problems.append(f"a second sample over its own file was refused: {last_line(err)[:160]}")
    return code, err, problems


def _full_disk_case(corpus, command, kind, free):
    """On a real, small tmpfs (root only): the disk fills while the output is written."""
    where = corpus.scratch("disk")
    mount = where / "disk"
    mount.mkdir()
    size = 1 << 20
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        return None, "", ["not run: mounting a small tmpfs needs root"]
    try:
        run = mount / "run"
        shutil.copytree(corpus.run(kind), run, ignore=shutil.ignore_patterns("report", "samples.*"))
        if command == "sample":  # an earlier output, to be kept if the new one does not fit
            cli("sample", run, "-n", "2", where=where)
        stat = os.statvfs(mount)
        filler = mount / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - free))
        before = tree(run)
        args = ["sample", run, "-n", "400"] if command == "sample" else ["report", run]
        code, _, err = cli(*args, where=where)
        problems = basic(code, err)
        if code == 0:
            return code, err, problems  # it fitted after all: nothing to check
        after = tree(run)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        if changed:
            problems.append(f"a failed {command} left partial output: {sorted(changed)[:4]}")
        return code, err, problems
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


CLASSES = {
    "1 symlinks in a run directory": links,
    "2 two fits on one --out at once": races,
    "3 CSV rows (byte-order mark, header)": csv_rows,
    "4 damaged or hand-edited run files": damaged_files,
    "5 --resume with other options or data": resume_options,
    "6 memory under a container limit": memory,
    "7 other crashes (huge values, odd paths)": crashes,
    "8 messages that must be true": messages,
    "9 refused instead of accepted": refusals,
    "10 evaluate/diagnose --json is JSON": json_output,
    "11 outputs: atomic, never over user files": outputs,
}


def run_class(corpus, name, quick=False):
    """``[(case, code, stderr, problems)]`` of one class."""
    return [(case, *thunk()) for case, thunk in CLASSES[name](corpus, quick)]


def new_corpus(prefix="pyro-lvm-hostile2-"):
    return Corpus(tempfile.mkdtemp(prefix=prefix))


__all__ = ["CLASSES", "Corpus", "new_corpus", "run_class", "PROCESS_CWD"]
