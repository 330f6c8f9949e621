"""Faults: a crash or a full disk while a checkpoint is written, two writers on one run, timed and
stepped mid-epoch checkpoints, torn JSON lines. Nothing that was saved may be lost, and a resumed
run must end bit-identical to one that was never interrupted."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import PROCESS_CWD, REPO, cli_process

import pyro_lvm.training.loop
from pyro_lvm import runs
from pyro_lvm.cli import main

FA = f"{REPO / 'examples' / 'factor_analysis.py'}:FactorAnalysis"
# faithful: 192 training points in batches of 32 = 6 steps an epoch; a checkpoint every 4 steps
# (never on an epoch's last step, whose checkpoint is the epoch end's) and at every epoch end.
FIT = ["fit", FA, "-p", "latent_dim=1", "--data", "faithful", "--epochs", "3", "--batch-size", "32", "--seed", "3",
       "--checkpoint-every", "4", "--quiet"]
SAVES = [(0, 4), (1, 0), (1, 2), (2, 0), (2, 4), (3, 0)]  # (epoch, step_in_epoch) of each checkpoint


def run_cli(*args):
    return main([str(a) for a in args])


def load_state(run_dir):
    return runs.load_checkpoint(Path(run_dir) / "checkpoint.pt")


def assert_same_model(run_a, run_b):
    a, b = load_state(run_a), load_state(run_b)
    assert a["model"].keys() == b["model"].keys()
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])


def bounds(run_dir):
    return [(m["epoch"], m["train_elbo"], m["valid_elbo"]) for m in runs.read_jsonl(Path(run_dir) / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every faulty one must end equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_cli(*FIT, "--out", out) == 0
    return out


class RecordSaves:
    """Wraps the training loop's ``save_checkpoint``: records each (epoch, step) and can fail one."""

    def __init__(self, monkeypatch, fail_at=None, error=None, copy_at=None):
        self.saves, self.fail_at, self.error, self.copy_at, self.copies = [], fail_at, error, copy_at, {}
        real = runs.save_checkpoint

        def save(path, state):
            if len(self.saves) + 1 == self.fail_at:
                self.saves.append("failed")
                raise self.error
            real(path, state)
            self.saves.append((state["epoch"], state["step_in_epoch"]))
            if self.copy_at is not None and not self.copies and self.copy_at(self.saves[-1]):
                # the run directory as a crash right after this checkpoint would leave it
                self.copies = {p.name: p.read_bytes() for p in Path(path).parent.iterdir() if p.is_file()}

        monkeypatch.setattr(pyro_lvm.training.loop, "save_checkpoint", save)


# ----------------------------------------------------------------------------------------------
# A crash or an error while the checkpoint is written
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("broken", ["replace", "fsync", "write"])
def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch, broken):
    path = tmp_path / "checkpoint.pt"
    runs.save_checkpoint(path, {"model": {"w": torch.arange(4.0)}, "epoch": 1})
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if broken == "write":
        real_fdopen = os.fdopen

        class HalfWriter:  # writes half of what it is given, then the disk is full
            def __init__(self, f):
                self.f = f

            def write(self, data):
                self.f.write(data[:len(data) // 2])
                self.f.flush()
                fail()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        monkeypatch.setattr(runs.os, "fdopen", lambda *a, **k: HalfWriter(real_fdopen(*a, **k)))
    else:
        monkeypatch.setattr(runs.os, broken, fail)
    with pytest.raises(OSError):
        runs.save_checkpoint(path, {"model": {"w": torch.zeros(4)}, "epoch": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_state(tmp_path)["epoch"] == 1 and torch.equal(load_state(tmp_path)["model"]["w"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"], "a temporary file was left behind"


def test_a_full_disk_mid_fit_exits_2_keeps_the_last_checkpoint_and_resumes_bit_identical(
        tmp_path, monkeypatch, capsys, reference):
    out = tmp_path / "run"
    saves = RecordSaves(monkeypatch, fail_at=4, error=OSError(errno.ENOSPC, "No space left on device",
                                                              str(out / "checkpoint.pt")))
    assert run_cli(*FIT, "--out", out) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    assert saves.saves == SAVES[:3] + ["failed"]
    state = load_state(out)
    assert (state["epoch"], state["step_in_epoch"]) == SAVES[2]
    monkeypatch.undo()
    assert run_cli("fit", "-", "--out", out, "--resume", "--quiet") == 0
    assert_same_model(out, reference)
    assert bounds(out) == bounds(reference)


# A child process that SIGKILLs itself inside the Nth checkpoint write: half-way through writing the
# temporary file, or with the whole file written but before the rename.
KILLER = r'''
import os, signal, sys
import torch
torch.set_num_threads(1)
import pyro_lvm.training.loop as training
from pyro_lvm import runs

mode, kill_at, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]
real_save, real_fdopen = runs.save_checkpoint, os.fdopen

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

class HalfWriter:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        die()
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

def save(path, state):
    calls[0] += 1
    if calls[0] == kill_at:
        if mode == "half-written":
            os.fdopen = lambda *a, **k: HalfWriter(real_fdopen(*a, **k))
        else:
            os.replace = die
    real_save(path, state)

training.save_checkpoint = save
from pyro_lvm.cli import main
sys.exit(main(args))
'''


def run_killer(tmp_path, mode, kill_at, *args):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    return subprocess.run([sys.executable, str(script), mode, str(kill_at), *map(str, args)], cwd=PROCESS_CWD,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["half-written", "before-rename"])
def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one_and_resumes_bit_identical(
        tmp_path, mode, reference):
    out = tmp_path / "run"
    killed = run_killer(tmp_path, mode, 4, *FIT, "--out", out)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1, leftovers  # the torn or unrenamed temporary file
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # the previous checkpoint, whole
    assert (state["epoch"], state["step_in_epoch"]) == SAVES[2]
    # The killed process had appended epoch 2's metrics line before its checkpoint.
    assert [m[0] for m in bounds(out)] == [1, 2]

    assert run_cli("fit", "-", "--out", out, "--resume", "--quiet") == 0
    assert_same_model(out, reference)
    assert bounds(out) == bounds(reference)


# ----------------------------------------------------------------------------------------------
# Mid-epoch checkpoints: by steps and by minutes
# ----------------------------------------------------------------------------------------------

def test_checkpoint_every_n_steps_checkpoints_mid_epoch(tmp_path, monkeypatch):
    saves = RecordSaves(monkeypatch)
    assert run_cli(*FIT, "--out", tmp_path / "run") == 0
    assert saves.saves == SAVES


def test_checkpoint_minutes_checkpoints_mid_epoch_and_resumes_from_there_bit_identical(
        tmp_path, monkeypatch, capsys, reference):
    # A clock that moves 25 s per reading: with --checkpoint-minutes 1 a checkpoint is due every
    # few steps, whatever the speed of the machine.
    clock = [0.0]

    def monotonic():
        clock[0] += 25.0
        return clock[0]

    monkeypatch.setattr(pyro_lvm.training.loop.time, "monotonic", monotonic)
    saves = RecordSaves(monkeypatch, copy_at=lambda save: save[0] == 1 and save[1] > 0)
    args = [a for a in FIT if a not in ("--checkpoint-every", "4")]
    assert run_cli(*args, "--checkpoint-minutes", "1", "--out", tmp_path / "timed") == 0
    mid_epoch = [s for s in saves.saves if s[1] != 0]
    assert len(mid_epoch) >= 3 and any(s[0] == 1 for s in mid_epoch), saves.saves
    assert [s for s in saves.saves if s[1] == 0] == [(1, 0), (2, 0), (3, 0)]
    monkeypatch.undo()

    # The run directory as a crash right after the (1, 3) checkpoint leaves it, plus a torn
    # metrics line (a crash mid-append): resuming from it ends where the uninterrupted run does.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for name, data in saves.copies.items():
        (crashed / name).write_bytes(data)
    with open(crashed / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 12, "train_elb')
    assert run_cli("fit", "-", "--out", crashed, "--resume", "--quiet") == 0, capsys.readouterr().err
    assert_same_model(crashed, reference)
    assert bounds(crashed) == bounds(reference)
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3], "the torn line was not dropped"


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "evaluations.jsonl"
    runs.append_jsonl(path, {"n": 1})
    with open(path, "a") as f:
        f.write('{"n": 2, "log_p')  # a crash mid-append
    runs.append_jsonl(path, {"n": 3})
    assert runs.read_jsonl(path) == [{"n": 1}, {"n": 3}]


def test_evaluate_on_a_run_with_torn_jsonl_files(tmp_path, reference, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for name in ("metrics.jsonl", "evaluations.jsonl"):
        with open(run / name, "a") as f:
            f.write('{"torn": ')
    assert run_cli("evaluate", run, "--estimator", "exact", "--json") == 0, capsys.readouterr().err
    assert run_cli("evaluate", run, "--estimator", "exact", "--json") == 0, capsys.readouterr().err
    assert len(runs.read_jsonl(run / "evaluations.jsonl")) == 2
    assert len(pyro_lvm.load_run(run).metrics) == 3


# ----------------------------------------------------------------------------------------------
# One writer per run directory
# ----------------------------------------------------------------------------------------------

HOLD_LOCK = ("import sys, time\nfrom pyro_lvm.runs import RunLock\nlock = RunLock(sys.argv[1]).acquire()\n"
             "print('locked', flush=True)\ntime.sleep(120)\n")


def snapshot(run_dir):
    return {p.name: p.read_bytes() for p in Path(run_dir).iterdir() if p.is_file() and p.name != ".lock"}


def test_a_second_fit_is_refused_at_once_while_another_process_holds_the_run(tmp_path, reference):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        second = cli_process("fit", "-", "--out", run, "--resume", "--epochs", "5", "--quiet")
        assert second.returncode == 2, second.stderr
        assert "another pyro-lvm fit is writing" in second.stderr and "Traceback" not in second.stderr
        assert time.monotonic() - started < 60, "the second fit waited instead of being refused"
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("fit", "-", "--out", run, "--resume", "--epochs", "4", "--quiet") == 0  # free again


def test_a_running_fit_holds_its_run_and_a_killed_one_lets_go(tmp_path, reference, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    first = subprocess.Popen([sys.executable, "-m", "pyro_lvm.cli", "fit", "-", "--out", str(run), "--resume",
                              "--epochs", "1000000", "--quiet"], cwd=PROCESS_CWD, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / ".lock").is_file() and (run / ".lock").read_text() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first fit never took the lock"
            time.sleep(0.05)
        assert run_cli("fit", "-", "--out", run, "--resume", "--quiet") == 2
        assert "another pyro-lvm fit is writing" in capsys.readouterr().err
        assert run_cli("fit", "ppca", "--data", "faithful", "--out", run, "--quiet") == 2
        assert "already exists" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    state = load_state(run)  # whatever the killed fit last saved is whole
    assert state["epoch"] >= 3
    assert run_cli("fit", "-", "--out", run, "--resume", "--epochs", str(state["epoch"] + 1), "--quiet") == 0
    assert load_state(run)["epoch"] == state["epoch"] + 1


def test_resume_of_a_run_stopped_before_its_first_checkpoint_says_what_to_do(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    RecordSaves(monkeypatch, fail_at=1, error=KeyboardInterrupt())  # Ctrl-C in the first checkpoint
    assert run_cli(*FIT, "--out", run) == 130
    monkeypatch.undo()
    assert not (run / "checkpoint.pt").exists() and (run / "config.json").is_file()
    assert run_cli("fit", "-", "--out", run, "--resume", "--quiet") == 2
    err = capsys.readouterr().err
    assert "no checkpoint yet" in err and "fit again" in err
