"""End-to-end tests of the continual SSL trainer (pnr_kernels.cssl) on tiny runs."""
import json
import os
import types

import pytest
import torch

pytest.importorskip("sklearn")

from pnr_kernels import backends  # noqa: E402
from pnr_kernels.testing import TOLERANCES  # noqa: E402
from pnr_kernels.cssl import cli  # noqa: E402
from pnr_kernels.cssl.config import METHODS, STRATEGIES, Config  # noqa: E402
from pnr_kernels.cssl.trainer import train  # noqa: E402

TINY = ["--tasks", "2", "--epochs", "1", "--batch-size", "8", "--limit-train", "16", "--max-steps-per-epoch", "2",
        "--limit-test", "60", "--limit-probe", "120", "--proj-hidden", "32", "--proj-dim", "16", "--queue-size", "16", "--no-progress"]


def tiny_config(tmp_path, **overrides) -> Config:
    values = dict(tasks=2, epochs=1, batch_size=8, limit_train=16, max_steps_per_epoch=2, limit_test=60, limit_probe=120,
                  proj_hidden=32, proj_dim=16, queue_size=16, progress=False, output_dir=str(tmp_path))
    values.update(overrides)
    return Config(**values)


def quiet(_message):
    pass


@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_strategy_trains_and_scores(tmp_path, method):
    """Each strategy runs; task 0 is identical across strategies (same seed, same weights), task 1
    differs from fine-tuning once a regulariser is on."""
    runs = {}
    for strategy in STRATEGIES:
        metrics = train(tiny_config(tmp_path / strategy, method=method, strategy=strategy), log=quiet)
        assert len(metrics["accuracy_matrix"]) == 2 and all(len(r) == 2 for r in metrics["accuracy_matrix"])
        assert len(metrics["knn_accuracy_matrix"]) == 2
        assert 0 <= metrics["average_accuracy"] <= 100 and metrics["knn_average_accuracy"] is not None
        assert all(torch.isfinite(torch.tensor(e["mean_loss"])) for e in metrics["epochs"])
        assert metrics["config"]["method"] == method and metrics["config"]["strategy"] == strategy
        assert os.path.exists(tmp_path / strategy / "metrics.json")
        assert os.path.exists(tmp_path / strategy / "accuracy.png")
        runs[strategy] = [e["mean_loss"] for e in metrics["epochs"]]
    assert runs["finetune"][0] == runs["cassle"][0] == runs["pnr"][0]
    assert runs["cassle"][1] != runs["finetune"][1] and runs["pnr"][1] != runs["finetune"][1]


def _run_cli(args):
    return cli.main(args)


@pytest.mark.parametrize("method,strategy,stop_after", [("mocov2plus", "pnr", 3), ("byol", "cassle", 2)])
def test_resume_after_a_stop_gives_the_uninterrupted_metrics(tmp_path, method, strategy, stop_after):
    """Stop after epoch k (3: inside task 1; 2: after task 0's last epoch, before its evaluation),
    resume in a new Trainer, and compare metrics.json with an uninterrupted run byte for byte."""
    common = TINY + ["--method", method, "--strategy", strategy, "--epochs", "2", "--seed", "3"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert _run_cli(common + ["--output-dir", str(full)]) == 0
    assert _run_cli(common + ["--output-dir", str(broken), "--stop-after-epochs", str(stop_after)]) == 0
    assert not (broken / "metrics.json").exists() or not json.loads((broken / "metrics.json").read_text())["completed"]
    assert _run_cli(common + ["--output-dir", str(broken), "--resume"]) == 0
    assert (broken / "metrics.json").read_bytes() == (full / "metrics.json").read_bytes()


def test_resume_refuses_a_different_configuration(tmp_path, capsys):
    args = TINY + ["--output-dir", str(tmp_path)]
    assert _run_cli(args + ["--stop-after-epochs", "1"]) == 0
    assert _run_cli(args + ["--seed", "1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "seed: 0 in the checkpoint, 1 now" in err
    assert _run_cli(args) == 2  # a checkpoint exists and --resume was not given
    assert "pass --resume" in capsys.readouterr().err


def test_verification_of_the_reference_records_its_float32_rounding(tmp_path):
    """--verify-backend compares against the float64 reference (pnr_kernels.testing): the float32
    reference itself differs from it only by rounding."""
    metrics = train(tiny_config(tmp_path, method="mocov2plus", strategy="pnr", verify_backend="reference"), log=quiet)
    records = metrics["verification"]
    assert [(r["task"], r["epoch"]) for r in records] == [(0, 0), (1, 0)]
    assert set(records[1]["losses"]) == {"moco_pnr_loss"}
    loss_tol, grad_tol = TOLERANCES[torch.float32]
    assert all(r["max_loss_rel_diff"] <= loss_tol / 10 and r["max_grad_rel_diff"] <= grad_tol / 10 for r in records)


def test_verification_stops_on_a_backend_that_is_off(tmp_path, monkeypatch, capsys):
    """A stand-in backend whose SimCLR-PNR loss is 1e-3 too large must stop the run with the
    docs/losses.md tolerance in the message."""
    real = backends.loss_function

    def off(backend, loss):
        fn = real(backend, loss)
        if backend == "native" and loss == "simclr_pnr":
            return lambda *args, **kwargs: fn(*args, **kwargs) * 1.001
        return fn

    monkeypatch.setattr(backends, "loss_function", off)
    code = _run_cli(TINY + ["--output-dir", str(tmp_path), "--verify-backend", "native"])
    assert code == 2
    err = capsys.readouterr().err
    assert "simclr_pnr_loss with backend 'native' differs from the reference at task 2" in err
    assert "tolerance 1e-05" in err


def test_an_unavailable_backend_is_refused_before_training(tmp_path, monkeypatch, capsys):
    fake = types.ModuleType("fake_missing_backend")
    fake.unavailable_reason = lambda device, dtype: "it was not built"
    fake.kernels = dict
    monkeypatch.setitem(backends._FUSED, "native", fake)
    assert _run_cli(TINY + ["--output-dir", str(tmp_path), "--verify-backend", "native"]) == 2
    assert "--verify-backend native cannot run on cpu: it was not built" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists()


def test_data_incremental_split_runs(tmp_path):
    metrics = train(tiny_config(tmp_path, split="data", method="vicreg"), log=quiet)
    assert all(t["classes"] == list(range(10)) for t in metrics["tasks"])
    row = metrics["accuracy_matrix"][0]
    assert row[0] == row[1]  # every task holds every class


def test_help_and_bad_options(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--verify-backend" in out and "digits:" in out and "--resume" in out
    assert cli.main(["--tasks", "11", "--output-dir", "/nonexistent/never"]) == 2
    assert "cannot exceed the number of classes" in capsys.readouterr().err
