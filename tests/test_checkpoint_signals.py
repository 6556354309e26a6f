"""Ctrl-C (SIGINT) or SIGTERM while pnr-cssl writes a checkpoint: the documented clean stop (exit
130, one line, no traceback) and a checkpoint on disk that always loads and is the previous or the
new one, never a partial file (docs/trainer.md, "Checkpoints").

Each trial is a process running ``pnr_kernels.cssl.cli.main`` whose training is replaced by a loop
of 32 MiB checkpoint writes (so that nearly every moment is inside a write), signalled at a
delay spread over two write times. The trials fork this process (torch is imported once); two
more run the real interpreter, where what escapes ``main`` would print its own traceback.

Every child handles SIGINT as an interpreter started from a terminal does (KeyboardInterrupt),
whatever this process inherited: a test run started in the background by a non-interactive shell
has SIGINT ignored, which its children would inherit and the trials would then wait on a child
that never stops (each wait is bounded, too).
"""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from pnr_kernels.cssl import checkpoint, cli

BLOB = 8 * 2 ** 20  # float32 entries: 32 MiB per checkpoint
TRIALS = 24
WAIT_S = 60  # the longest a signalled child may take to stop


def _sigint_as_from_a_terminal():
    """For a child before it runs Python: SIGINT at its default disposition, so that the
    interpreter installs its KeyboardInterrupt handler (it leaves an inherited SIG_IGN alone)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _writer(path, ready_fd):
    """What replaces ``train``: tell the parent it runs (the CLI's handlers are in place), then
    write checkpoints without end; checkpoint ``i`` holds ``step = i`` and a blob of ``i % 2 + 1``."""
    blobs = [torch.full((BLOB,), 1.0), torch.full((BLOB,), 2.0)]

    def train(cfg):
        os.write(ready_fd, b"r")
        step = 1
        while True:
            checkpoint.save_checkpoint(path, {"step": step, "blob": blobs[step % 2]})
            step += 1
    return train


def _check_checkpoint(path):
    state = checkpoint.load_checkpoint(path)  # a partial file raises CorruptCheckpointError
    assert bool(state["blob"].eq(state["step"] % 2 + 1).all()), state["step"]
    leftovers = [name for name in os.listdir(os.path.dirname(path)) if name.startswith(checkpoint.TEMP_PREFIX)]
    assert not leftovers, leftovers
    return state["step"]


def _forked_trial(folder, sig, delay):
    """(exit status, stderr) of one forked pnr-cssl run signalled ``delay`` s after it starts writing."""
    path = os.path.join(folder, "checkpoint.pt")
    err_path = os.path.join(folder, "stderr.txt")
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as the interpreter would run the entry point, a traceback for what escapes
        status = 99
        try:
            os.close(ready_r)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(err, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            torch.set_num_threads(1)
            cli.train = _writer(path, ready_w)
            status = cli.main(["--output-dir", folder, "--no-progress"])
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(status)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"r"
    os.close(ready_r)
    time.sleep(delay)
    os.kill(pid, sig)
    deadline = time.monotonic() + WAIT_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child did not stop within {WAIT_S} s of {sig.name}")
        time.sleep(0.01)
    with open(err_path) as f:
        return os.waitstatus_to_exitcode(status), f.read()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_signal_during_a_checkpoint_write_stops_cleanly_and_keeps_a_whole_checkpoint(tmp_path):
    folder = str(tmp_path)
    path = os.path.join(folder, "checkpoint.pt")
    started = time.perf_counter()
    checkpoint.save_checkpoint(path, {"step": 0, "blob": torch.full((BLOB,), 1.0)})  # the previous one
    write_s = time.perf_counter() - started
    rng = random.Random(0)
    steps = []
    for trial in range(TRIALS):
        sig = (signal.SIGINT, signal.SIGTERM)[trial % 2]
        delay = rng.uniform(0, 2 * write_s)
        code, err = _forked_trial(folder, sig, delay)
        what = f"trial {trial}: {sig.name} after {delay * 1e3:.0f} ms"
        assert "Traceback" not in err, f"{what}\n{err}"
        assert code == 130, f"{what}: exit {code}\n{err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pnr-cssl: error: interrupted"), f"{what}\n{err}"
        steps.append(_check_checkpoint(path))
    assert max(steps) > 0  # the writes landed: the signal met a writer, not one waiting to start
    assert time.perf_counter() - started < 120


CHILD = textwrap.dedent("""
    import os, sys, torch
    from pnr_kernels.cssl import checkpoint, cli
    path = os.path.join(sys.argv[1], "checkpoint.pt")
    blobs = [torch.full(({blob},), 1.0), torch.full(({blob},), 2.0)]
    def train(cfg):
        print("ready", flush=True)
        step = 1
        while True:
            checkpoint.save_checkpoint(path, {{"step": step, "blob": blobs[step % 2]}})
            step += 1
    cli.train = train
    sys.exit(cli.main(["--output-dir", sys.argv[1], "--no-progress"]))
""").format(blob=BLOB)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_entry_point_stops_cleanly_on_a_signal_during_a_write(tmp_path, sig):
    checkpoint.save_checkpoint(str(tmp_path / "checkpoint.pt"), {"step": 0, "blob": torch.full((BLOB,), 1.0)})
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_as_from_a_terminal)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.05)
        child.send_signal(sig)
        _, err = child.communicate(timeout=WAIT_S)
    finally:
        child.kill()
    assert "Traceback" not in err, err
    assert child.returncode == 130, err
    assert err.strip().splitlines() == [
        "pnr-cssl: error: interrupted; continue with --resume (the last checkpoint is kept)"]
    _check_checkpoint(str(tmp_path / "checkpoint.pt"))
