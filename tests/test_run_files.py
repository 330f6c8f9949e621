"""The run directory's safety pieces on their own: the lock and new-run creation, the schema of
config.json and checkpoints, the data fingerprint, memory limits from cgroups, safe file opening,
standard JSON out, report folders and sample files that never replace the user's files."""
import json
import os

import numpy as np
import pytest
import torch

from pyro_lvm import api, files, outputs, resources, runs, schema
from pyro_lvm.data import load_dataset
from pyro_lvm.errors import UserError


# ----------------------------------------------------------------------------------------------
# Creating a run directory and its lock
# ----------------------------------------------------------------------------------------------

def test_a_new_run_directory_is_created_and_locked_in_one_step(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    new = runs.create_run_directory(out)
    assert out.is_dir() and (out / ".lock").read_text() == str(os.getpid())
    with pytest.raises(UserError, match="another pyro-lvm fit is writing"):
        runs.create_run_directory(out)
    new.abandon()  # refused before it began: everything this process made is gone
    assert not (tmp_path / "a").exists()


def test_abandon_keeps_what_was_there_before(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    runs.create_run_directory(out).abandon()
    assert out.is_dir() and list(out.iterdir()) == []
    with runs.create_run_directory(out) as new:
        new.begin()  # the run began: kept whatever happens next
    assert (out / ".lock").is_file()
    with pytest.raises(UserError, match="already exists"):
        (out / "config.json").write_text("{}")
        runs.create_run_directory(out)


def test_a_stale_lock_left_by_a_killed_fit_does_not_block_a_new_one(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("99999")
    new = runs.create_run_directory(out)
    assert new.lock.held and not new.lock.created
    new.abandon()
    assert (out / ".lock").is_file(), "a lock file this process did not create is not removed"


def test_a_lock_whose_file_was_unlinked_after_open_is_not_held(tmp_path, monkeypatch):
    """A refused fit unlinks its lock file; one that opened it just before must not think it holds the run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("")
    real_flock, calls = runs.fcntl.flock, []

    def flock(fd, op):
        real_flock(fd, op)
        if not calls:  # between this process's open and flock, another replaced the file
            calls.append(1)
            os.unlink(out / ".lock")
            (out / ".lock").write_text("")

    monkeypatch.setattr(runs.fcntl, "flock", flock)
    lock = runs.RunLock(out).acquire()
    assert os.fstat(lock._fd).st_ino == os.lstat(out / ".lock").st_ino
    lock.release()


@pytest.mark.parametrize("make, words", [
    (lambda p: os.symlink(p.parent / "nowhere", p), "symbolic link"),
    (lambda p: p.write_text("x"), "regular file"),
])
def test_refused_run_paths(tmp_path, make, words):
    out = tmp_path / "run"
    make(out)
    with pytest.raises(UserError, match=words):
        runs.create_run_directory(out)
    assert not (tmp_path / "nowhere").exists()


# ----------------------------------------------------------------------------------------------
# Files: no links, regular files only
# ----------------------------------------------------------------------------------------------

def test_open_regular_refuses_links_fifos_and_directories(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "file", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    assert files.read_bytes(tmp_path / "file", 10) == b"x"
    assert files.read_bytes(tmp_path / "link", 10, follow=True) == b"x"
    for name, words in (("link", "symbolic link"), ("fifo", "FIFO"), ("dir", "directory")):
        with pytest.raises(UserError, match=words):
            files.read_bytes(tmp_path / name, 10)
    os.link(tmp_path / "file", tmp_path / "hard")
    with pytest.raises(UserError, match="hard links"):
        files.append_line(tmp_path / "hard", b"{}\n")
    assert (tmp_path / "file").read_text() == "x"


def test_atomic_writes_replace_nothing_but_regular_files_and_keep_permissions(tmp_path):
    os.symlink(tmp_path / "victim", tmp_path / "out")
    with pytest.raises(UserError, match="symbolic link"):
        files.atomic_write_bytes(tmp_path / "out", b"data")
    assert not (tmp_path / "victim").exists()
    files.atomic_write_bytes(tmp_path / "new", b"data")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o666 & ~mask


def test_read_jsonl_skips_torn_lines_and_refuses_other_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"epoch": 1}\n{"epoch": 2, "tra\n\xff\xfe\n{"epoch": 3}\n')
    assert [r["epoch"] for r in runs.read_jsonl(path, validate=schema.validate_record)] == [1, 3]
    path.write_bytes(b'{"epoch": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match="line 2"):
        runs.read_jsonl(path, validate=schema.validate_record)


# ----------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------

def test_every_fit_option_has_a_config_rule():
    """A new fit option needs its rule in pyro_lvm.schema.OPTION_RULES (config.json is checked on read)."""
    from pyro_lvm.training import ON_NAN

    options = set(api.FIT_DEFAULTS) - {"data", "data_dir", "binarize", "hyperparameters"}
    assert options <= set(schema.OPTION_RULES), options - set(schema.OPTION_RULES)
    assert schema.ON_NAN_CHOICES == ON_NAN and schema.MAX_COUNT == api.MAX_COUNT


def test_every_default_passes_its_rule():
    for key, (check, must) in schema.OPTION_RULES.items():
        assert check(api.FIT_DEFAULTS[key]), (key, must)


@pytest.mark.parametrize("key, value", [("epochs", "ten"), ("epochs", True), ("batch_size", 0), ("lr", -1.0),
                                        ("lr", float("nan")), ("seed", 2 ** 40), ("objective", "elbow"),
                                        ("cuda_graph", 1), ("kl_warmup_start", 2.0), ("data", "faithful"),
                                        ("hyperparameters", [1]), ("model", ""), ("versions", 3)])
def test_the_config_schema_names_file_key_and_fix(key, value):
    config = {"model": "ppca", "data": {"name": "faithful", "binarize": "none"}, "hyperparameters": {},
              "epochs": 1, key: value}
    with pytest.raises(UserError) as err:
        schema.validate_config(config, "RUN/config.json")
    assert str(err.value).startswith("RUN/config.json") and key in str(err.value) and "refit" in str(err.value)


def test_a_file_of_fit_options_may_name_its_data():
    assert schema.validate_config({"data": "faithful", "binarize": "auto"}, "f.json", partial=True)
    with pytest.raises(UserError, match="data"):
        schema.validate_config({"data": 5}, "f.json", partial=True)


def test_checkpoint_validation(tmp_path):
    state = {"model": {"w": torch.zeros(2)}, "optimizer": {"state": {}, "param_groups": [{"params": [0]}]},
             "rng": {"torch": torch.get_rng_state()}, "epoch": 1, "step_in_epoch": 0, "global_step": 6,
             "seconds": 1.0, "running_elbo_sum": torch.zeros(()), "running_points": 0}
    assert schema.validate_checkpoint(dict(state), "c.pt", for_resume=True)
    for key, value in (("epoch", -1), ("rng", {"torch": torch.zeros(3, dtype=torch.uint8)}), ("seconds", "1"),
                       ("optimizer", []), ("running_elbo_sum", torch.tensor([1.0, 2.0]))):
        with pytest.raises(UserError, match=key):
            schema.validate_checkpoint({**state, key: value}, "c.pt", for_resume=True)
    with pytest.raises(UserError, match="NaN"):
        schema.validate_checkpoint({**state, "model": {"w": torch.tensor([float("nan")])}}, "c.pt")
    assert schema.validate_checkpoint({"model": {"w": torch.zeros(2)}}, "c.pt")  # enough to evaluate
    with pytest.raises(UserError, match="shape"):
        schema.check_optimizer_state({"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"params": [0]}]},
                                     [torch.zeros(2)], "c.pt")


def test_json_compatible_replaces_non_finite_numbers_with_null_and_a_reason():
    record = schema.json_compatible({"log_px": -float("inf"), "stderr": float("nan"), "k": [1.0, float("inf")], "n": 3})
    assert record["log_px"] is None and record["stderr"] is None and record["k"] == [1.0, None] and record["n"] == 3
    assert set(record["null_reason"]) == {"log_px", "stderr", "k[1]"} and "zero density" in record["null_reason"]["log_px"]
    json.dumps(record, allow_nan=False)
    assert "null_reason" not in schema.json_compatible({"a": 1.0})


# ----------------------------------------------------------------------------------------------
# Data: fingerprints, CSV headers, sizes before reading
# ----------------------------------------------------------------------------------------------

def test_the_fingerprint_changes_with_any_value_and_not_with_binarization(tmp_path):
    x = np.random.default_rng(0).uniform(size=(40, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    x[5, 1] += 1e-6
    np.save(tmp_path / "b.npy", x)
    a, b = load_dataset(str(tmp_path / "a.npy")), load_dataset(str(tmp_path / "b.npy"))
    assert a.fingerprint["sha256"] != b.fingerprint["sha256"] and a.fingerprint["sizes"] == b.fingerprint["sizes"]
    assert load_dataset(str(tmp_path / "a.npy"), binarize="static").fingerprint == a.fingerprint
    assert load_dataset("digits").fingerprint == load_dataset("digits").fingerprint


@pytest.mark.parametrize("text, rows", [("\ufeff1,2\n3,4\n5,6\n", 3), ("\ufeffa,b\n1,2\n3,4\n5,6\n", 3),
                                        ("\n\n1,2\r\n3,4\r\n5,6\r\n", 3), ("nan,1\n2,3\n4,5\n", 3)])
def test_a_csv_header_is_a_first_row_that_is_not_numbers(tmp_path, text, rows):
    path = tmp_path / "d.csv"
    path.write_bytes(text.encode())
    with files.open_file(path) as f:
        from pyro_lvm.data.registry import _read_csv

        assert len(_read_csv(f, path)) == rows


def test_an_npz_is_measured_from_its_headers_before_it_is_read(tmp_path, monkeypatch):
    np.savez_compressed(tmp_path / "z.npz", x=np.zeros((1_000_000, 2)))
    monkeypatch.setattr(resources, "available_memory_bytes", lambda device="cpu": 8 * 2 ** 20)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("the array was read before its size was checked"))
    with pytest.raises(UserError, match=r"shape \(1000000, 2\)"):
        load_dataset(str(tmp_path / "z.npz"))


# ----------------------------------------------------------------------------------------------
# Memory limits
# ----------------------------------------------------------------------------------------------

def _fake(tmp_path, monkeypatch, cgroup_lines, files_):
    for rel, text in files_.items():
        path = tmp_path / "cg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "self-cgroup").write_text(cgroup_lines)
    monkeypatch.setattr(resources, "CGROUP_ROOT", tmp_path / "cg")
    monkeypatch.setattr(resources, "PROC_SELF_CGROUP", tmp_path / "self-cgroup")


def test_cgroup_v2_limit_less_usage_plus_reclaimable_cache(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, "0::/a/b\n", {
        "a/memory.max": f"{1 << 30}\n", "a/memory.current": f"{100 << 20}\n",
        "a/b/memory.max": f"{512 << 20}\n", "a/b/memory.current": f"{300 << 20}\n",
        "a/b/memory.stat": f"anon 1\ninactive_file {50 << 20}\n", "memory.max": "max\n"})
    assert resources.cgroup_available_bytes() == (512 - 300 + 50) << 20
    assert resources.available_memory_bytes("cpu") <= (512 - 300 + 50) << 20


def test_cgroup_v1_and_a_container_that_sees_its_own_cgroup_at_the_root(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, "4:memory:/docker/abc\n1:cpu:/\n", {
        "memory/memory.limit_in_bytes": f"{256 << 20}\n", "memory/memory.usage_in_bytes": f"{56 << 20}\n",
        "memory/memory.stat": "total_inactive_file 0\n"})
    assert resources.cgroup_available_bytes() == 200 << 20


def test_no_limit_reads_as_none(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, "0::/\n", {"memory.max": "max\n", "memory.current": "5\n"})
    assert resources.cgroup_available_bytes() is None
    _fake(tmp_path, monkeypatch, "4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert resources.cgroup_available_bytes() is None


def test_a_chunk_budget_never_exceeds_half_the_memory(monkeypatch):
    monkeypatch.setattr(resources, "available_memory_bytes", lambda device="cpu": 100 * 2 ** 20)
    assert resources.memory_budget_mb(1e308) == 50 and resources.memory_budget_mb(10) == 10


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------

def test_sample_files_carry_a_mark_and_others_are_not_replaced(tmp_path):
    images = torch.rand(4, 1, 3, 3)
    for name, image in (("s.png", True), ("s.jpg", True), ("s.csv", False)):
        outputs.write_samples(tmp_path / name, images if image else images.reshape(4, -1), image, nrow=2)
        assert outputs.written_by_pyro_lvm(tmp_path / name), name
        outputs.check_sample_target(tmp_path / name)
    (tmp_path / "mine.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not written by pyro-lvm"):
        outputs.check_sample_target(tmp_path / "mine.csv")
    outputs.check_sample_target(tmp_path / "samples.csv", inside_run=True)


def test_a_report_folder_replaces_only_its_own_unchanged_files(tmp_path):
    folder = tmp_path / "rep"
    with outputs.ReportFolder(folder) as report:
        (report.staging / "index.html").write_text("one")
        (report.staging / "old.png").write_text("stale")
        report.commit()
    with outputs.ReportFolder(folder) as report:  # the old figure is not drawn again: removed
        (report.staging / "index.html").write_text("two")
        report.commit()
    assert (folder / "index.html").read_text() == "two" and not (folder / "old.png").exists()
    (folder / "index.html").write_text("edited by hand")
    with pytest.raises(UserError, match="was not written by pyro-lvm report"):
        with outputs.ReportFolder(folder) as report:
            report.check(["index.html"])
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_report_leaves_no_folder(tmp_path):
    with pytest.raises(RuntimeError):
        with outputs.ReportFolder(tmp_path / "rep") as report:
            (report.staging / "index.html").write_text("half")
            raise RuntimeError("disk full")
    assert not (tmp_path / "rep").exists()


def test_a_model_path_whose_folder_holds_a_colon():
    from pyro_lvm.protocol import split_model_spec

    assert split_model_spec("/x/a:b/m.py") == ("/x/a:b/m.py", "")
    assert split_model_spec("/x/a:b/m.py:Model") == ("/x/a:b/m.py", "Model")
    assert split_model_spec("pkg.mod:Model") == ("pkg.mod", "Model")
    assert split_model_spec("vae") == ("vae", "")


@pytest.mark.parametrize("epoch", [torch.tensor([1, 2]), -1, "3", 1.5])
def test_a_checkpoints_epoch_is_checked_on_every_read(tmp_path, epoch):
    """Every command reports the epoch of the checkpoint it read, so a damaged epoch is refused on every
    read (not only on --resume) with the file, the key and the fix."""
    path = tmp_path / "checkpoint.pt"
    state = {"format": runs.CHECKPOINT_FORMAT, "model": {"w": torch.zeros(2)}, "epoch": epoch}
    torch.save(state, path)
    with pytest.raises(UserError, match=r"checkpoint.pt: 'epoch' .* must be an integer >= 0; restore it"):
        runs.load_checkpoint(path)
    state["epoch"] = 3
    torch.save(state, path)
    assert runs.load_checkpoint(path)["epoch"] == 3
