"""Atomic checkpoint files and the capture/restore of every random number generator."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import signal
import tempfile
import threading
from typing import Any, Dict, List, Sequence

import numpy as np
import torch


TEMP_PREFIX = ".tmp-"


def _file_mode() -> int:
    """0666 minus the process umask (0644 under the usual 022), the mode ``open`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred(signals: Sequence[int] = DEFERRED_SIGNALS):
    """Hold ``signals`` (SIGINT, SIGTERM) back while the block runs: one that arrives is recorded,
    and once the block has finished (or failed) the previous handlers are restored and each
    recorded signal is raised again, so it then does what it would have done (SIGINT's
    KeyboardInterrupt, the CLI's clean stop). Outside the main thread, where Python cannot set
    handlers, the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = {}
    try:
        for number in signals:
            if signal.getsignal(number) is not None:  # None: a handler set outside Python, left alone
                previous[number] = signal.signal(number, lambda n, _frame: received.append(n))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)


def atomic_write(path: str, write) -> None:
    """Write through ``write(file)`` into a temporary file in the same folder, fsync it, then
    ``os.replace`` it over ``path`` (and fsync the folder): a reader sees the old or the new
    file, never a partial one, even if the process is killed mid-write. SIGINT and SIGTERM are
    deferred (:func:`signals_deferred`) until the rename is done, so Ctrl-C or a polite kill never
    interrupts the write: they take effect right after it, with the new file in place. The file
    gets the mode a plain ``open`` would give it (0644 under the usual umask), not mkstemp's
    0600. A SIGKILL during the write can leave a ``.tmp-<name>*`` file behind:
    :func:`remove_stale_temporaries` clears them when the next run starts."""
    with signals_deferred():
        _write_and_replace(path, write)


def _write_and_replace(path: str, write) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path), dir=folder)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_atomic_write = atomic_write


def remove_stale_temporaries(folder: str, names: Sequence[str]) -> List[str]:
    """Delete the ``.tmp-<name>*`` files that a killed :func:`atomic_write` of one of ``names``
    left in ``folder``; returns their paths. Only one run may use an output folder at a time."""
    removed = []
    for entry in sorted(os.listdir(folder)):
        if any(entry.startswith(TEMP_PREFIX + name) for name in names):
            path = os.path.join(folder, entry)
            if os.path.isfile(path) and not os.path.islink(path):
                os.unlink(path)
                removed.append(path)
    return removed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


class CorruptCheckpointError(ValueError):
    """checkpoint.pt could not be read back."""


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str) -> Dict[str, Any]:
    # Everything saved is tensors and plain Python containers, so the safe loader suffices.
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, AttributeError, KeyError,
            TypeError, IndexError) as exc:
        if isinstance(exc, PermissionError):
            raise
        raise CorruptCheckpointError(
            f"{path} is not a readable pnr-cssl checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            f"delete it to start over, or choose another --output-dir") from exc
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"{path} is not a pnr-cssl checkpoint; delete it to start over, "
                                     f"or choose another --output-dir")
    return checkpoint


def write_json(path: str, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def rng_state(generators: Dict[str, torch.Generator]) -> Dict[str, Any]:
    """The states of python's, numpy's and torch's global generators (CUDA too when present) and
    of the named ``generators``, in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any], generators: Dict[str, torch.Generator]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    for key, generator in generators.items():
        generator.set_state(state["generators"][key])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
