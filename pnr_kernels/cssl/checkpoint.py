"""Atomic checkpoint files and the capture/restore of every random number generator."""
from __future__ import annotations

import json
import os
import random
import tempfile
from typing import Any, Dict

import numpy as np
import torch


def _atomic_write(path: str, write) -> None:
    """Write through ``write(file)`` into a temporary file in the same folder, fsync it, then
    ``os.replace`` it over ``path`` (and fsync the folder): a reader sees the old or the new
    file, never a partial one, even if the process is killed mid-write."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=folder)
    try:
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


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    _atomic_write(path, lambda handle: torch.save(payload, handle))


def load_checkpoint(path: str) -> Dict[str, Any]:
    # Everything saved is tensors and plain Python containers, so the safe loader suffices.
    return torch.load(path, map_location="cpu", weights_only=True)


def write_json(path: str, data: Any) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    _atomic_write(path, lambda handle: handle.write(text.encode()))


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
