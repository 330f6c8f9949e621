"""Reliability at scale: provoke faults (hard kills inside checkpoint writes and mid-epoch, a full
disk, torn metrics lines, a second writer), feed hundreds of hostile data files and command lines
to pyro-lvm, and run the eleven classes of hostile input of issue 12 (``tests/hostile_classes.py``:
planted links, racing fits, CSV rows, damaged run files, resume conflicts, memory limits, odd paths,
false messages, wrongly accepted input, non-JSON output, overwritten outputs); count what survived.

    .venv/bin/python benchmarks/reliability.py [--hostile 400] [--quick] [--round-two-only | --no-round-two]

Goals: every interrupted run resumes bit-identical to an uninterrupted one; no hostile input ends
in exit status 1 or a traceback, and none changes an existing run; every case of every class is
handled. Prints tables, then one JSON object on the last line.
"""
import argparse
import collections
import errno
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402

import pyro_lvm.training.loop  # noqa: E402
import test_faults as F  # noqa: E402
import test_hostile_input as H  # noqa: E402
from pyro_lvm import runs  # noqa: E402
from pyro_lvm.cli import main  # noqa: E402

torch.set_num_threads(1)
KILLED_MODEL = f"{REPO / 'tests' / 'fixtures' / 'killed_model.py'}:KilledFactorAnalysis"


def quiet_cli(*args):
    code, _, err = H.run_cli([str(a) for a in args])
    return code, err


def same_as_reference(run, reference):
    a, b = runs.load_checkpoint(Path(run) / "checkpoint.pt"), runs.load_checkpoint(Path(reference) / "checkpoint.pt")
    same_model = a["model"].keys() == b["model"].keys() and all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
    return same_model and a["global_step"] == b["global_step"] and F.bounds(run) == F.bounds(reference)


class Tally:
    def __init__(self):
        self.rows = []

    def add(self, scenario, provoked, resumed, identical, note=""):
        self.rows.append({"scenario": scenario, "provoked": provoked, "resumed": resumed, "identical": identical,
                          "note": note})

    def resume(self, scenario, provoked, code, err, out, reference):
        """Record a resume: killed before the first checkpoint there is nothing to resume, and
        pyro-lvm must say so (exit 2); otherwise it must finish bit-identical to ``reference``."""
        if code == 2 and "no checkpoint yet" in err:
            self.add(scenario, provoked, None, None, "before the first checkpoint: refused, says to refit")
        else:
            self.add(scenario, provoked, code == 0, code == 0 and same_as_reference(out, reference),
                     "" if code == 0 else err.strip()[-150:])


def fault_scenarios(work, tally, quick):
    reference = work / "reference"
    assert quiet_cli(*F.FIT, "--out", reference)[0] == 0
    saves = len(F.SAVES)

    # 1. SIGKILL inside the k-th checkpoint write: half-way through the temporary file, or whole but
    #    before the rename. The previous checkpoint must load; resuming must end bit-identical.
    for mode in ("half-written", "before-rename"):
        for k in ([2, 4] if quick else range(1, saves + 1)):
            out = work / f"kill-{mode}-{k}"
            killed = F.run_killer(work, mode, k, *F.FIT, "--out", out)
            provoked = killed.returncode == -signal.SIGKILL
            code, err = quiet_cli("fit", "-", "--out", out, "--resume", "--quiet")
            tally.resume(f"SIGKILL in checkpoint write ({mode}) #{k}", provoked, code, err, out, reference)

    # 2. SIGKILL mid-epoch, at a random guide call (no checkpoint being written).
    kill_fit = ["fit", KILLED_MODEL, *F.FIT[2:]]
    ref_killed_model = work / "reference-killed-model"
    assert quiet_cli(*kill_fit, "--out", ref_killed_model)[0] == 0
    for call in ([9, 16] if quick else [5, 7, 10, 13, 16, 19]):
        out = work / f"kill-mid-epoch-{call}"
        killed = subprocess.run([sys.executable, "-m", "pyro_lvm.cli", *kill_fit, "--out", str(out)], cwd=REPO,
                                env={**os.environ, "PYRO_LVM_TEST_KILL_AT": str(call), "OMP_NUM_THREADS": "1"},
                                capture_output=True, text=True, timeout=300)
        code, err = quiet_cli("fit", "-", "--out", out, "--resume", "--quiet")
        tally.resume(f"SIGKILL mid-epoch at guide call {call}", killed.returncode == -signal.SIGKILL, code, err,
                     out, ref_killed_model)

    # 3. A full disk (ENOSPC) at the k-th checkpoint: exit 2, then resume.
    real_save = runs.save_checkpoint
    for k in ([3] if quick else range(2, saves + 1)):
        out = work / f"enospc-{k}"
        count = [0]

        def save(path, state, k=k):
            count[0] += 1
            if count[0] == k:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            real_save(path, state)

        pyro_lvm.training.loop.save_checkpoint = save
        try:
            code, err = quiet_cli(*F.FIT, "--out", out)
        finally:
            pyro_lvm.training.loop.save_checkpoint = real_save
        resumed, _ = quiet_cli("fit", "-", "--out", out, "--resume", "--quiet")
        tally.add(f"disk full at checkpoint #{k}", code == 2 and "No space left" in err, resumed == 0,
                  resumed == 0 and same_as_reference(out, reference))

    # 4. A torn last metrics line (crash mid-append) on top of each checkpoint of a run.
    for k in ([3] if quick else range(1, saves)):
        out = work / f"torn-{k}"
        count, copies = [0], {}

        def save(path, state, k=k):
            real_save(path, state)
            count[0] += 1
            if count[0] == k:
                copies.update({p.name: p.read_bytes() for p in Path(path).parent.iterdir() if p.is_file()})

        pyro_lvm.training.loop.save_checkpoint = save
        try:
            assert quiet_cli(*F.FIT, "--out", work / f"torn-source-{k}")[0] == 0
        finally:
            pyro_lvm.training.loop.save_checkpoint = real_save
        out.mkdir()
        for name, data in copies.items():
            (out / name).write_bytes(data)
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"epoch": 9, "train_el')
        code, _ = quiet_cli("fit", "-", "--out", out, "--resume", "--quiet")
        tally.add(f"torn metrics line after checkpoint #{k}", True, code == 0,
                  code == 0 and same_as_reference(out, reference))

    # 5. A second writer while a real process holds the run: refused at once, run unchanged.
    run = work / "locked"
    shutil.copytree(reference, run)
    before = F.snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", F.HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        started = time.monotonic()
        code, err = quiet_cli("fit", "-", "--out", run, "--resume", "--epochs", "5", "--quiet")
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    tally.add("second fit while the run is locked", code == 2 and "another pyro-lvm fit" in err, None, None,
              f"refused in {waited:.2f} s, run {'unchanged' if F.snapshot(run) == before else 'CHANGED'}")


def hostile_inputs(work, count):
    protected = H.fit_protected_run(work / "protected")
    results = []

    def record(kind, args, code, err, problems):
        results.append({"kind": kind, "args": [str(a) for a in args], "code": code,
                        "traceback": "Traceback" in err,
                        "warning": next((line.strip()[:200] for line in err.splitlines() if "Warning:" in line), None),
                        "changed_run": any(p.startswith("existing run") for p in problems),
                        "code_ran": any("ran code" in p for p in problems), "problems": problems,
                        "stderr": err.strip().splitlines()[-1][:300] if err.strip() else ""})

    @settings(max_examples=count // 2, **H.HOSTILE_SETTINGS)
    @given(case=H.hostile_file_cases())
    def files(case):
        for args, code, err, problems in H.run_file_case(case, protected):
            record("data file" if args[0] == "fit" else f"{args[0]} after a fit on a hostile file",
                   args, code, err, problems)

    @settings(max_examples=count - count // 2, **H.HOSTILE_SETTINGS)
    @given(case=H.hostile_command_lines())
    def command_lines(case):
        args, code, err, problems = H.run_command_line_case(case, protected)
        record(f"{args[0]} command line", args, code, err, problems)

    files()
    command_lines()
    return results


def round_two(work, quick):
    """Every case of every class of ``tests/hostile_classes.py``: ``{class: [(case, code, problems)]}``."""
    import hostile_classes as R

    corpus = R.Corpus(work / "round-two")
    results = {}
    for name in R.CLASSES:
        results[name] = [(case, code, problems) for case, code, _, problems in R.run_class(corpus, name, quick)]
    return results


def print_round_two(results):
    print(f"\n{'hostile input, round two (issue 12)':44s} {'tried':>6s} {'handled':>8s} {'not':>5s} {'not run':>8s}")
    counts = {}
    for name, cases in results.items():
        not_run = sum(1 for _, _, p in cases if p and all(x.startswith("not run") for x in p))
        bad = sum(1 for _, _, p in cases if p) - not_run
        counts[name] = {"tried": len(cases) - not_run, "handled": len(cases) - not_run - bad, "not_run": not_run}
        print(f"{name:44s} {len(cases) - not_run:6d} {len(cases) - not_run - bad:8d} {bad:5d} {not_run:8d}")
    total = {k: sum(c[k] for c in counts.values()) for k in ("tried", "handled", "not_run")}
    print(f"{'all classes':44s} {total['tried']:6d} {total['handled']:8d} {total['tried'] - total['handled']:5d} "
          f"{total['not_run']:8d}")
    for name, cases in results.items():
        for case, code, problems in [c for c in cases if c[2] and not c[2][0].startswith("not run")][:3]:
            print(f"  NOT HANDLED [{name.split()[0]}] {case}: exit {code}: {'; '.join(problems)[:220]}")
    return counts, total


def main_():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hostile", type=int, default=400, help="hostile inputs to generate (default 400)")
    parser.add_argument("--quick", action="store_true", help="fewer fault scenarios and round-two cases")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--round-two-only", action="store_true", help="only the classes of issue 12")
    which.add_argument("--no-round-two", action="store_true", help="without the classes of issue 12")
    options = parser.parse_args()

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="pyro-lvm-reliability-"))
    tally, results, second = Tally(), [], {}
    fault_seconds = hostile_seconds = second_seconds = 0.0
    try:
        if not options.round_two_only:
            t0 = time.monotonic()
            fault_scenarios(work, tally, options.quick)
            fault_seconds = time.monotonic() - t0
            t0 = time.monotonic()
            results = hostile_inputs(work, options.hostile)
            hostile_seconds = time.monotonic() - t0
        if not options.no_round_two:
            t0 = time.monotonic()
            second = round_two(work, options.quick)
            second_seconds = time.monotonic() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'fault scenario':48s} {'provoked':>8s} {'resumed':>8s} {'bit-identical':>13s}  note")
    for row in tally.rows:
        show = {True: "yes", False: "NO", None: "-"}
        print(f"{row['scenario']:48s} {show[row['provoked']]:>8s} {show[row['resumed']]:>8s} "
              f"{show[row['identical']]:>13s}  {row['note']}")
    by_kind = collections.defaultdict(collections.Counter)
    for r in results:
        by_kind[r["kind"]][r["code"]] += 1
    print(f"\n{'hostile input':40s} {'tried':>6s} {'exit 0':>7s} {'exit 2':>7s} {'other':>6s}")
    for kind, codes in sorted(by_kind.items()):
        other = sum(v for c, v in codes.items() if c not in (0, 2))
        print(f"{kind:40s} {sum(codes.values()):6d} {codes[0]:7d} {codes[2]:7d} {other:6d}")
    bad = [r for r in results if r["problems"]]
    for r in bad[:20]:
        print(f"  FAILED: pyro-lvm {' '.join(r['args'])[:200]} -> {r['problems']}: {r['stderr'][:200]}")
    for r in [r for r in results if r["warning"]][:5]:
        print(f"  python warning on stderr: pyro-lvm {' '.join(r['args'])[:200]}: {r['warning']}")

    counts, total = print_round_two(second) if second else ({}, {"tried": 0, "handled": 0, "not_run": 0})
    resumable = [r for r in tally.rows if r["resumed"] is not None]
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "faults_provoked": sum(1 for r in tally.rows if r["provoked"]),
        "fault_scenarios": len(tally.rows),
        "runs_resumed": sum(1 for r in resumable if r["resumed"]),
        "resumes_attempted": len(resumable),
        "bit_identical_resumes": sum(1 for r in resumable if r["identical"]),
        "hostile_inputs_tried": len(results),
        "hostile_exit_0": sum(1 for r in results if r["code"] == 0),
        "hostile_exit_2": sum(1 for r in results if r["code"] == 2),
        "hostile_exit_1_or_other": sum(1 for r in results if r["code"] not in (0, 2)),
        "hostile_tracebacks": sum(1 for r in results if r["traceback"]),
        "hostile_changed_existing_run": sum(1 for r in results if r["changed_run"]),
        "hostile_ran_code": sum(1 for r in results if r["code_ran"]),
        "hostile_python_warnings_on_stderr": sum(1 for r in results if r["warning"]),
        "round_two_tried": total["tried"],
        "round_two_handled": total["handled"],
        "round_two_not_run": total["not_run"],
        "round_two_by_class": counts,
        "fault_seconds": round(fault_seconds, 1),
        "hostile_seconds": round(hostile_seconds, 1),
        "round_two_seconds": round(second_seconds, 1),
        "seconds": round(time.monotonic() - started, 1),
    }
    print()
    print(json.dumps(summary))
    ok = (summary["hostile_exit_1_or_other"] == summary["hostile_tracebacks"] == summary["hostile_changed_existing_run"]
          == summary["hostile_ran_code"] == 0 and summary["bit_identical_resumes"] == summary["resumes_attempted"]
          and total["handled"] == total["tried"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main_())
