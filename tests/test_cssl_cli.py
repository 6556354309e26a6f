"""The trainer's user-facing behaviour: one-line CLI errors, output file modes, no progress bars
off a terminal, the announced native build, stale temporaries, --checkpoint-every, --limit-probe,
task numbering and the plot."""
import os
import stat
import subprocess
import sys
import types

import pytest

pytest.importorskip("sklearn")

from pnr_kernels.cssl import cli, trainer as trainer_module  # noqa: E402
from pnr_kernels.cssl.config import Config, resolve  # noqa: E402
from pnr_kernels.cssl.evaluation import save_plot  # noqa: E402
from pnr_kernels.cssl.methods import Learner  # noqa: E402
from pnr_kernels.cssl.trainer import Trainer, bars_enabled, prepare_native, train  # noqa: E402

from .fake_cifar import write_fake_cifar10  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tasks", "2", "--epochs", "1", "--batch-size", "8", "--limit-train", "16", "--max-steps-per-epoch", "2",
        "--limit-test", "40", "--limit-probe", "60", "--proj-hidden", "32", "--proj-dim", "16", "--queue-size", "16",
        "--no-progress"]


def tiny_config(out, **overrides) -> Config:
    values = dict(tasks=2, epochs=1, batch_size=8, limit_train=16, max_steps_per_epoch=2, limit_test=40,
                  limit_probe=60, proj_hidden=32, proj_dim=16, queue_size=16, progress=False, output_dir=str(out))
    values.update(overrides)
    return Config(**values)


def assert_one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pnr-cssl: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def test_corrupt_cifar_pickle_is_one_line(tmp_path, capsys):
    folder = write_fake_cifar10(tmp_path / "data", per_batch=2, test=4)
    (folder / "data_batch_2").write_bytes(b"\x80\x04 this is not a pickle")
    code = cli.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "o")]
                    + TINY)
    assert_one_line_error(capsys, code, "data_batch_2", "CIFAR python-pickle")


def test_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short by a kill")
    code = cli.main(TINY + ["--output-dir", str(out), "--resume"])
    assert_one_line_error(capsys, code, "checkpoint.pt", "not a readable pnr-cssl checkpoint")


def test_unusable_output_paths_are_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert_one_line_error(capsys, cli.main(TINY + ["--output-dir", str(a_file)]), "is a file, not a folder")
    assert_one_line_error(capsys, cli.main(TINY + ["--output-dir", str(a_file / "sub")]),
                          "cannot be created", "is a file")

    def denied(path, exist_ok=False):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(trainer_module.os, "makedirs", denied)
    assert_one_line_error(capsys, cli.main(TINY + ["--output-dir", str(tmp_path / "ro" / "x")]), "permission denied")


def test_divergence_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    original = Learner.loss

    def diverging(self, *args, **kwargs):
        loss, pending = original(self, *args, **kwargs)
        return loss * float("nan"), pending

    monkeypatch.setattr(Learner, "loss", diverging)
    line = assert_one_line_error(capsys, cli.main(TINY + ["--output-dir", str(tmp_path / "a")]),
                                 "training diverged", "try a lower --lr")
    assert "task 1, epoch 1, step 1" in line
    assert cli.main(TINY + ["--output-dir", str(tmp_path / "b"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_simclr_pnr_refuses_a_second_temperature(tmp_path, capsys):
    assert_one_line_error(capsys, cli.main(TINY + ["--output-dir", str(tmp_path), "--distill-temperature", "0.5"]),
                          "one temperature")
    assert resolve(Config(method="simclr", strategy="pnr", temperature=0.3)).distill_temperature == 0.3
    assert resolve(Config(method="simclr", strategy="cassle", distill_temperature=0.5)).distill_temperature == 0.5
    assert resolve(Config(method="mocov2plus", strategy="pnr")).distill_temperature == 0.2


def test_outputs_are_0644_and_logs_number_tasks_from_one(tmp_path):
    old = os.umask(0o022)
    try:
        lines = []
        out = tmp_path / "run"
        out.mkdir()
        stale = out / ".tmp-checkpoint.ptk2j3h"
        stale.write_bytes(b"half a checkpoint")
        metrics = train(tiny_config(out), log=lines.append)
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "metrics.json", "accuracy.png"):
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o644, name
    assert not stale.exists() and any("removed 1 temporary file" in line for line in lines)
    text = "\n".join(lines)
    assert "task 1/2: classes" in text and "task 2/2: classes" in text and "after task 2/2" in text
    assert "task 0" not in text and "after task 0" not in text
    table = [line for line in text.splitlines() if line.strip().startswith(("1 |", "2 |"))]
    assert len(table) == 2  # the accuracy table's rows are numbered 1 and 2
    assert "0-based" in metrics["task_numbering"]
    assert metrics["probe_train_images"] == 60


def test_redirected_output_has_no_progress_bars(tmp_path):
    """A real process whose stdout and stderr are pipes: no carriage returns, one line per epoch."""
    args = [a for a in TINY if a != "--no-progress"] + ["--epochs", "2", "--output-dir", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "pnr_kernels.cssl", *args], capture_output=True, env=env,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    assert b"\r" not in done.stdout and b"\r" not in done.stderr
    assert done.stdout.decode().count(" epoch ") == 4  # 2 tasks x 2 epochs, one line each


def test_bars_only_on_a_terminal():
    tty = types.SimpleNamespace(isatty=lambda: True)
    pipe = types.SimpleNamespace(isatty=lambda: False)
    assert bars_enabled(True, tty) and not bars_enabled(True, pipe) and not bars_enabled(False, tty)


class FakePlan:
    def __init__(self, tmp_path):
        self.directory = tmp_path / "cache" / "torch-x"
        self.library = self.directory / "lib.so"
        self.nvcc = None


def test_the_native_build_is_announced_before_it_starts(tmp_path, monkeypatch):
    from pnr_kernels import native

    events = []
    monkeypatch.setattr(native, "make_plan", lambda: (FakePlan(tmp_path), None))

    def fake_build(plan, force=False):
        events.append("build")
        return types.SimpleNamespace(built=True)

    monkeypatch.setattr(native, "build", fake_build)
    prepare_native(events.append)
    assert events[1] == "build"
    assert "building the native extension once" in events[0] and "pnr-kernels build" in events[0]
    assert "built in" in events[2]
    # cached: nothing said, nothing built
    FakePlan(tmp_path).directory.mkdir(parents=True)
    FakePlan(tmp_path).library.write_bytes(b"")
    events.clear()
    prepare_native(events.append)
    assert events == []


def test_the_trainer_builds_before_the_first_step(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_module, "prepare_native", lambda log: calls.append("native"))
    original = Trainer._train_epoch
    monkeypatch.setattr(Trainer, "_train_epoch", lambda self, *a: (calls.append("epoch"), original(self, *a)))
    train(tiny_config(tmp_path), log=lambda m: None)
    assert calls[0] == "native" and calls.count("native") == 1 and calls[1] == "epoch"
    calls.clear()
    train(tiny_config(tmp_path / "ref", backend="reference"), log=lambda m: None)
    assert "native" not in calls


class Killed(Exception):
    pass


def test_checkpoint_every_and_an_exact_resume_from_an_older_checkpoint(tmp_path, monkeypatch):
    """--checkpoint-every 2 over 3 epochs per task saves after epochs 2 and 3 and after each
    evaluation; a kill after epoch 3 of task 2 (last checkpoint: epoch 2) resumes to the
    uninterrupted metrics."""
    saves = []
    original_save = Trainer._save
    monkeypatch.setattr(Trainer, "_save", lambda self: (saves.append(dict(self.position)), original_save(self)))
    full = train(tiny_config(tmp_path / "full", epochs=3, checkpoint_every=2), log=lambda m: None)
    assert [(s["task"], s["epochs_done"], s["evaluated"]) for s in saves] == [
        (0, 2, False), (0, 3, False), (0, 3, True), (1, 2, False), (1, 3, False), (1, 3, True)]

    original_epoch = Trainer._train_epoch

    def killed_in_task_2(self, task, epoch):
        if task == 1 and epoch == 2:
            raise Killed()
        return original_epoch(self, task, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", killed_in_task_2)
    with pytest.raises(Killed):
        train(tiny_config(tmp_path / "broken", epochs=3, checkpoint_every=2), log=lambda m: None)
    monkeypatch.setattr(Trainer, "_train_epoch", original_epoch)
    resumed = train(tiny_config(tmp_path / "broken", epochs=3, checkpoint_every=5, resume=True), log=lambda m: None)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert [e["mean_loss"] for e in resumed["epochs"]] == [e["mean_loss"] for e in full["epochs"]]


def test_plot_of_many_tasks(tmp_path):
    t = 12
    matrix = [[90 + (i + j) % 7 + 0.1 * i for j in range(t)] for i in range(t)]
    metrics = {"accuracy_matrix": matrix, "linear_accuracy": [95.0 + 0.1 * i for i in range(t)],
               "knn_accuracy": [94.0 + 0.1 * i for i in range(t)],
               "config": {"dataset": "cifar100", "method": "byol", "strategy": "pnr", "seed": 0, "recipe": "paper"}}
    assert save_plot(metrics, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_states_one_time_and_cites_docs():
    text = cli.build_parser().format_help()
    assert "SPEC" not in text and "docs/losses.md" in text and cli.DEFAULT_RUN_TIME in text
