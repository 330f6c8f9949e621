"""Training options: schedules, Adam's settings, clipping, early stopping, the best checkpoint, restarts,
and a model's own ``fit_defaults`` -- each against its closed form, and all of them resume-safe."""
import json
import math

import pytest
import torch
from helpers import FIXTURES, REPO, cli, cli_process

import pyro_lvm
from pyro_lvm.errors import UserError
from pyro_lvm.runs import load_checkpoint, read_jsonl
from pyro_lvm.training import take_step
from pyro_lvm.training.schedules import IWAE_PASSES, IWAEFactor, iwae_stage_ends, make_scheduler, resolve_schedule_options

FA = str(REPO / "examples" / "factor_analysis.py")
KILLED = f"{FIXTURES / 'killed_model.py'}:KilledFactorAnalysis"
QUIET = {"progress": False, "log": lambda message: None}


def _rates(config, steps_per_epoch):
    """The learning rate of every step of a run with ``config``'s schedule (what the loop applies)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=config["lr"])
    scheduler = make_scheduler(optimizer, resolve_schedule_options(config), steps_per_epoch)
    rates = []
    for _ in range(config["epochs"] * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return rates


@pytest.mark.parametrize("schedule, options, closed_form", [
    ("constant", {}, lambda s, S, T: 0.01),
    ("step", {"lr_decay": 0.5, "lr_step": 2}, lambda s, S, T: 0.01 * 0.5 ** (s // (2 * S))),
    ("exponential", {"lr_decay": 0.8}, lambda s, S, T: 0.01 * 0.8 ** (s / S)),
    ("cosine", {"lr_min": 0.001}, lambda s, S, T: 0.001 + 0.009 * (1 + math.cos(math.pi * s / T)) / 2),
])
def test_each_schedule_follows_its_closed_form(schedule, options, closed_form):
    S, epochs = 7, 6
    rates = _rates({"schedule": schedule, "lr": 0.01, "epochs": epochs, **options}, S)
    expected = [closed_form(s, S, S * epochs) for s in range(S * epochs)]
    assert rates == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_the_iwae_schedule_is_the_papers_and_shortens_in_proportion():
    # 3280 passes of S steps: stage i (lr 1e-3 * 10^(-i/7)) lasts 3^i passes, ending after whole epochs.
    S = 3
    assert IWAE_PASSES == 3280
    assert iwae_stage_ends(3280 * S) == [S * e for e in (1, 4, 13, 40, 121, 364, 1093, 3280)]
    factor = IWAEFactor(3280 * S)
    for i, (start, end) in enumerate(zip([0] + iwae_stage_ends(3280 * S)[:-1], iwae_stage_ends(3280 * S))):
        assert factor(start) == factor(end - 1) == pytest.approx(10 ** (-i / 7))
    # Shortened to 328 passes (of 30 steps): each stage keeps its share 3^i / 3280 of the steps, to a step.
    S = 30
    ends = iwae_stage_ends(328 * S)
    shares = [(b - a) / (328 * S) for a, b in zip([0] + ends[:-1], ends)]
    assert shares == pytest.approx([3 ** i / 3280 for i in range(8)], abs=1 / (328 * S))
    rates = _rates({"schedule": "iwae", "lr": 1e-3, "epochs": 328}, S)
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert len(set(rates)) == 8


def test_schedule_options_are_checked(tmp_path):
    from pyro_lvm import schema
    from pyro_lvm.training.schedules import SCHEDULES

    assert schema.SCHEDULE_CHOICES == SCHEDULES  # config.json's rule, kept below the training package
    for options, message in (({"schedule": "linear"}, "unknown --schedule"),
                             ({"schedule": "step", "lr_decay": 1.5}, "--lr-decay"),
                             ({"schedule": "cosine", "lr_decay": 0.5}, "applies to --schedule step or exponential"),
                             ({"schedule": "cosine", "lr_min": 1.0}, "--lr-min"),
                             ({"adam_betas": [0.9]}, "--adam-betas"), ({"adam_eps": 0.0}, "--adam-eps"),
                             ({"clip_grad_norm": -1.0}, "--clip-grad-norm"), ({"patience": -1}, "--patience"),
                             ({"restarts": 0}, "--restarts")):
        with pytest.raises(UserError, match=message.replace("-", r"\-")):
            pyro_lvm.fit(FA, data="faithful", out=tmp_path / "never", **options, **QUIET)
        assert not (tmp_path / "never").exists()


def test_fit_options_reach_the_optimizer_and_the_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "fit", FA, "--data", "faithful", "--epochs", "3", "--batch-size", "64", "--lr", "0.01",
                       "--schedule", "step", "--lr-decay", "0.5", "--lr-step", "1", "--adam-betas", "0.8,0.99",
                       "--adam-eps", "1e-6", "--clip-grad-norm", "5", "--out", out, "--quiet")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["schedule"], config["lr_decay"], config["lr_step"]) == ("step", 0.5, 1)
    assert config["adam_betas"] == [0.8, 0.99] and config["adam_eps"] == 1e-6 and config["clip_grad_norm"] == 5.0
    group = load_checkpoint(out / "checkpoint.pt")["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.8, 0.99) and group["eps"] == 1e-6
    # 192 points in batches of 64: 3 steps an epoch; the rate recorded after epoch e is 0.01 * 0.5^e.
    assert [m["lr"] for m in read_jsonl(out / "metrics.jsonl")] == pytest.approx([0.005, 0.0025, 0.00125])


def test_gradient_clipping_bounds_the_norm_of_the_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = torch.randn(50, 4)

    def loss(batch):
        return 100.0 * model(batch).pow(2).sum()

    grads = []
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    _, finite = take_step(loss, optimizer, x, clip_grad_norm=0.5)
    assert finite
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert step.norm().item() == pytest.approx(0.5, rel=1e-5)  # SGD with lr 1 steps by the clipped gradient
    model.weight.grad = None
    loss(x).backward()
    grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].norm() > 10  # so the clip was active

    nan_loss = lambda batch: model(batch).sum() * torch.tensor(float("nan"))  # noqa: E731
    before = [p.detach().clone() for p in model.parameters()]
    _, finite = take_step(nan_loss, optimizer, x, clip_grad_norm=0.5)
    assert not finite and all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_early_stopping_and_the_best_checkpoint(tmp_path, capsys):
    # The mixture's bound is exact (z summed out) and full-batch steps make it deterministic; no later
    # epoch beats the first by 10 nats per point, so the run stops after 1 + patience epochs.
    out = tmp_path / "mog"
    run = pyro_lvm.fit("mog", out=out, epochs=50, patience=2, min_delta=10.0, **QUIET)
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    last, best = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(out / "best.pt")
    assert last["validation"]["stopped"] and last["epoch"] == 3
    assert best["epoch"] == 1 and best["valid_elbo"] == metrics[0]["valid_elbo"]
    assert run.checkpoint == "best" and run.checkpoint_epoch == 1  # auto: best, for a run with early stopping
    for key, value in best["model"].items():
        assert torch.equal(run.model.state_dict()[key].cpu(), value)
    record = pyro_lvm.evaluate(out, estimator="exact", split="valid")
    assert record["checkpoint"] == "best" and record["log_px"] == pytest.approx(metrics[0]["valid_elbo"], rel=1e-5)
    assert pyro_lvm.evaluate(out, estimator="exact", checkpoint="last")["checkpoint_epoch"] == 3
    code, stdout, _ = cli(capsys, "evaluate", out, "--estimator", "exact", "--checkpoint", "last", "--json")
    assert code == 0 and json.loads(stdout)["checkpoint"] == "last"
    code, _, err = cli(capsys, "fit", "mog", "--out", out, "--resume")
    assert code == 0 and "stopped early" in err


def test_without_early_stopping_the_last_checkpoint_is_read_and_the_best_kept_beside_it(tmp_path, capsys):
    out = tmp_path / "fa"
    run = pyro_lvm.fit(FA, data="faithful", out=out, epochs=4, batch_size=32, lr=0.05, **QUIET)
    metrics = read_jsonl(out / "metrics.jsonl")
    best = load_checkpoint(out / "best.pt")
    top = max(metrics, key=lambda m: m["valid_elbo"])
    assert best["epoch"] == top["epoch"] and best["valid_elbo"] == top["valid_elbo"]
    assert run.checkpoint == "last" and run.checkpoint_epoch == 4
    assert pyro_lvm.load_run(out, checkpoint="best").checkpoint_epoch == top["epoch"]
    for command in (["sample", out, "-n", "4", "--out", tmp_path / "s.csv"], ["diagnose", out, "--is-samples", "0"]):
        code, _, err = cli(capsys, *command, "--checkpoint", "best")
        assert code == 0, err


def test_a_run_without_a_validation_split_has_no_best_checkpoint(tmp_path, capsys):
    import numpy as np

    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, train=rng.normal(size=(50, 2)), valid=np.zeros((0, 2)), test=rng.normal(size=(10, 2)))
    out = tmp_path / "run"
    pyro_lvm.fit(FA, data=str(data), out=out, epochs=2, **QUIET)
    assert not (out / "best.pt").exists()
    code, _, err = cli(capsys, "evaluate", out, "--estimator", "exact", "--checkpoint", "best")
    assert code == 2 and "no best checkpoint" in err and "--checkpoint last" in err
    with pytest.raises(UserError, match="no validation split"):
        pyro_lvm.fit(FA, data=str(data), out=tmp_path / "never", patience=2, **QUIET)


def test_a_run_killed_mid_epoch_resumes_its_schedule_clipping_and_early_stopping_bit_identical(tmp_path):
    # 192 points in batches of 32: 6 steps an epoch; the kill comes at the 22nd training-mode guide call
    # (the set-up's calls count too), in epoch 4, after the mid-epoch checkpoint of global step 20.
    args = ["fit", KILLED, "--data", "faithful", "--epochs", "6", "--batch-size", "32", "--seed", "5", "--lr", "0.05",
            "--schedule", "cosine", "--lr-min", "0.001", "--clip-grad-norm", "50", "--adam-betas", "0.8,0.99",
            "--patience", "4", "--checkpoint-every", "4", "--device", "cpu", "--quiet"]
    reference = cli_process(*args, "--out", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    killed = cli_process(*args, "--out", tmp_path / "killed", env={"PYRO_LVM_TEST_KILL_AT": "22"})
    assert killed.returncode == -9, (killed.returncode, killed.stderr)
    state = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert state["step_in_epoch"] > 0 and 12 < state["global_step"] < 36, state["global_step"]  # mid-epoch, mid-run
    resumed = cli_process("fit", KILLED, "--out", tmp_path / "killed", "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("checkpoint.pt", "best.pt"):
        a, b = (load_checkpoint(tmp_path / r / name) for r in ("reference", "killed"))
        assert a["epoch"] == b["epoch"]
        for key, value in a["model"].items():
            assert torch.equal(value, b["model"][key]), (name, key)
    fields = ("epoch", "train_elbo", "valid_elbo", "lr")
    metrics = [[tuple(m[f] for f in fields) for m in read_jsonl(tmp_path / r / "metrics.jsonl")]
               for r in ("reference", "killed")]
    assert metrics[0] == metrics[1] and len(metrics[0]) >= 4


def test_resuming_a_length_dependent_schedule_with_other_epochs_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    pyro_lvm.fit(FA, data="faithful", out=out, epochs=2, schedule="cosine", **QUIET)
    code, _, err = cli(capsys, "fit", FA, "--out", out, "--resume", "--epochs", "4")
    assert code == 2 and "cosine schedule" in err and "--epochs 4" in err


def test_restarts_keep_the_best_by_validation_bound_and_resume(tmp_path):
    out = tmp_path / "restarts"
    options = dict(data="faithful", epochs=2, batch_size=64, lr=0.02, seed=3, **QUIET)
    run = pyro_lvm.fit(FA, out=out, restarts=3, **options)
    summary = json.loads((out / "restarts.json").read_text())
    scores = [r["valid_elbo"] for r in summary["restarts"]]
    assert [r["seed"] for r in summary["restarts"]] == [3, 4, 5] and summary["selected_by"] == "valid_elbo"
    assert summary["chosen"] == scores.index(max(scores)) and len(set(scores)) == 3
    chosen = out / "restarts" / str(summary["chosen"])
    assert (out / "checkpoint.pt").read_bytes() == (chosen / "checkpoint.pt").read_bytes()
    assert run.metrics[-1]["valid_elbo"] == max(scores)
    # Restart 0 is the plain fit with the run's seed.
    single = pyro_lvm.fit(FA, out=tmp_path / "single", **options)
    for key, value in single.model.state_dict().items():
        assert torch.equal(value, load_checkpoint(out / "restarts" / "0" / "checkpoint.pt")["model"][key])

    # A crash during restart 2 (its directory not yet written), then --resume: the same outcome.
    crashed = tmp_path / "crashed"
    import shutil

    shutil.copytree(out, crashed)
    shutil.rmtree(crashed / "restarts" / "2")
    for name in ("checkpoint.pt", "best.pt", "metrics.jsonl", "restarts.json"):
        (crashed / name).unlink()
    resumed = pyro_lvm.fit(FA, out=crashed, resume=True, **QUIET)
    assert (crashed / "checkpoint.pt").read_bytes() == (out / "checkpoint.pt").read_bytes()
    assert resumed.metrics == run.metrics


FIT_DEFAULTS_MODEL = '''
import importlib.util, pathlib
spec = importlib.util.spec_from_file_location("fa", {fa!r})
fa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fa)

class WithDefaults(fa.FactorAnalysis):
    fit_defaults = {defaults}
'''


def test_a_models_fit_defaults_apply_under_the_options_given(tmp_path):
    path = tmp_path / "with_defaults.py"
    path.write_text(FIT_DEFAULTS_MODEL.format(fa=FA, defaults={"batch_size": 10_000, "lr": 0.05, "epochs": 3}))
    run = pyro_lvm.fit(f"{path}:WithDefaults", data="faithful", out=tmp_path / "a", **QUIET)
    assert (run.config["batch_size"], run.config["lr"], run.config["epochs"]) == (10_000, 0.05, 3)
    assert run.metrics[-1]["step"] == 3  # full-batch steps: one an epoch
    run = pyro_lvm.fit(f"{path}:WithDefaults", data="faithful", out=tmp_path / "b", epochs=1, lr=0.01, **QUIET)
    assert (run.config["lr"], run.config["epochs"]) == (0.01, 1)
    path.write_text(FIT_DEFAULTS_MODEL.format(fa=FA, defaults={"batchsize": 10}))
    with pytest.raises(UserError, match="fit_defaults has unknown option"):
        pyro_lvm.fit(f"{path}:WithDefaults", data="faithful", out=tmp_path / "c", **QUIET)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_training_options_on_cuda(tmp_path):
    run = pyro_lvm.fit("mog", out=tmp_path / "mog", device="cuda", epochs=6, patience=2, restarts=2,
                       clip_grad_norm=100.0, **QUIET)
    assert run.device.type == "cuda" and (tmp_path / "mog" / "restarts.json").is_file()
    assert all(p.device.type == "cuda" for p in run.model.parameters())
    run = pyro_lvm.fit("vae", out=tmp_path / "vae", device="cuda", epochs=2, hyperparameters={"stochastic_layers": 2},
                       schedule="iwae", adam_eps=1e-4, **QUIET)
    assert run.metrics[-1]["lr"] == pytest.approx(1e-4) and math.isfinite(run.metrics[-1]["valid_elbo"])
