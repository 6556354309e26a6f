"""pnr-cssl under torchrun: 2 CPU processes (gloo) end to end, and a stopped run resumed.

Each run is ``python -m torch.distributed.run --standalone --nproc-per-node 2 -m pnr_kernels.cssl``
in a subprocess (--standalone: a free rendezvous port on localhost), one OpenMP thread per rank, with
a timeout. Tiny settings: about 8 s per run on 2 idle cores.
"""
import json
import os
import signal
import time
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tasks", "2", "--epochs", "2", "--batch-size", "8", "--limit-train", "64", "--max-steps-per-epoch", "2",
        "--limit-test", "60", "--limit-probe", "120", "--proj-hidden", "32", "--proj-dim", "16", "--queue-size", "64",
        "--no-progress"]
TIMEOUT = 180

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _command(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "pnr_kernels.cssl", *args]


def torchrun(args, nproc=2):
    """Run torchrun to its end; on a timeout, SIGABRT the ranks (faulthandler prints where each one
    waits), kill them and fail with their output. torchrun starts each rank in a session of its
    own, so they are found and killed by pid."""
    process = subprocess.Popen(_command(args, nproc), cwd=ROOT, env=dict(_env(), PYTHONFAULTHANDLER="1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        ranks = _children(process.pid)
        _kill(ranks, signal.SIGABRT)
        time.sleep(2)
        _kill(ranks + [process.pid], signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=60)
        pytest.fail(f"torchrun did not finish in {TIMEOUT} s\n{stdout[-3000:]}\n{stderr[-6000:]}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _kill(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("simclr_w2")
    return out, torchrun(TINY + ["--output-dir", str(out)])


def test_two_rank_run_writes_rank0_outputs(simclr_run):
    out, result = simclr_run
    assert sorted(os.listdir(out)) == ["accuracy.png", "checkpoint.pt", "metrics.json"]  # nothing per rank
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["completed"] and metrics["config"]["method"] == "simclr" and metrics["config"]["strategy"] == "pnr"
    assert len(metrics["accuracy_matrix"]) == 2 and all(len(row) == 2 for row in metrics["accuracy_matrix"])
    assert all(0 <= a <= 100 for row in metrics["accuracy_matrix"] for a in row)
    assert 30 <= metrics["average_accuracy"] <= 100 and metrics["knn_average_accuracy"] is not None
    # 64 images per task, 8 per rank and step: a global batch of 16, capped at 2 steps.
    assert [(e["task"], e["epoch"], e["steps"]) for e in metrics["epochs"]] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert all(torch.isfinite(torch.tensor(e["mean_loss"])) for e in metrics["epochs"])
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng_ranks"]) == 2
    # Ranks draw different augmentations, the same data order.
    assert not torch.equal(checkpoint["rng_ranks"][0]["generators"]["augment"],
                           checkpoint["rng_ranks"][1]["generators"]["augment"])
    assert torch.equal(checkpoint["rng_ranks"][0]["generators"]["data"], checkpoint["rng_ranks"][1]["generators"]["data"])
    # Rank 0 alone logs: each line once.
    assert "data-parallel: 2 ranks (gloo), 8 images per rank and step, global batch 16" in result.stdout
    assert result.stdout.count("task 1/2 epoch 1/2:") == 1 and result.stdout.count("after task 2/2:") == 1


def test_two_rank_moco_pnr_stopped_and_resumed_matches_the_uninterrupted_run(tmp_path):
    """MoCo-PNR (queues fed by both ranks, CaSSLe-free PNR path): stop after 3 epochs (inside the
    second task, after its checkpoint), resume with --resume: every rank restarts from rank 0's
    checkpoint and its own generator states, and metrics.json equals the uninterrupted run's."""
    common = TINY + ["--method", "mocov2plus", "--seed", "1"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    torchrun(common + ["--output-dir", str(full)])
    stopped = torchrun(common + ["--output-dir", str(broken), "--stop-after-epochs", "3"])
    assert stopped.stderr.count("stopped after 3 epoch(s)") == 1
    partial = json.loads((broken / "metrics.json").read_text())
    assert not partial["completed"] and len(partial["accuracy_matrix"]) == 1
    resumed = torchrun(common + ["--output-dir", str(broken), "--resume"])
    assert "resuming from" in resumed.stdout and "task 2/2, 1 of 2 epoch(s) done" in resumed.stdout
    assert (broken / "metrics.json").read_bytes() == (full / "metrics.json").read_bytes()


def test_resume_with_another_number_of_ranks_is_refused(simclr_run, tmp_path):
    out, _ = simclr_run
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-m", "pnr_kernels.cssl", *TINY, "--output-dir", str(copy), "--resume"],
                            cwd=ROOT, env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    assert "written by a run of 2 rank(s), this one has 1" in result.stderr


def _children(pid):
    """The processes whose parent is ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    stat = handle.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the ranks through /proc (Linux)")
def test_two_rank_run_killed_after_its_first_checkpoint_resumes_to_the_same_metrics(simclr_run, tmp_path):
    """SIGKILL to both ranks and torchrun as soon as checkpoint.pt appears,
    then --resume: metrics.json equals the uninterrupted run's (the module's SimCLR-PNR run)."""
    full, _ = simclr_run
    out = tmp_path / "killed"
    args = TINY + ["--output-dir", str(out)]
    process = subprocess.Popen(_command(args), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (out / "checkpoint.pt").exists(), "no checkpoint was written"
    finally:
        # torchrun starts each rank in a session of its own: kill the ranks by pid, then torchrun.
        _kill(_children(process.pid) + [process.pid], signal.SIGKILL)
        process.wait(timeout=60)
    assert not (out / "metrics.json").exists() or not json.loads((out / "metrics.json").read_text())["completed"]
    resumed = torchrun(args + ["--resume"])
    assert "resuming from" in resumed.stdout
    assert (out / "metrics.json").read_bytes() == (full / "metrics.json").read_bytes()
