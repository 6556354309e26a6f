"""The run configuration of the continual SSL trainer and its per-dataset defaults.

Every option the CLI exposes is a field of :class:`Config`. Fields left at ``None`` take the
dataset's default in :func:`resolve`, so a saved configuration always holds concrete values and
a resumed run can be checked against it field by field.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

DATASETS = ("digits", "cifar10", "cifar100")
METHODS = ("simclr", "mocov2plus", "byol", "vicreg", "barlow")
STRATEGIES = ("finetune", "cassle", "pnr")
SPLITS = ("class", "data")
BACKEND_CHOICES = ("auto", "reference", "triton", "native")
DEVICES = ("cpu", "cuda")
OPTIMIZERS = ("sgd", "adamw")

# Fields that describe how this process runs, not what it computes: they may differ between a
# killed run and its --resume without changing a single number of the result.
RUNTIME_FIELDS = ("output_dir", "data_dir", "resume", "stop_after_epochs", "progress")

# Per-dataset defaults (digits: a CPU-sized run of a couple of minutes; CIFAR: the usual
# ResNet-18 setting of the CaSSLe/PNR papers, shortened to something a single GPU finishes).
DATASET_DEFAULTS = {
    "digits": dict(tasks=5, epochs=40, batch_size=64, optimizer="adamw", lr=2e-3, weight_decay=1e-4,
                   proj_hidden=256, proj_dim=64, queue_size=512, momentum_tau=0.99),
    "cifar10": dict(tasks=5, epochs=200, batch_size=256, optimizer="sgd", lr=0.3, weight_decay=1e-4,
                    proj_hidden=2048, proj_dim=256, queue_size=65536, momentum_tau=0.99),
    "cifar100": dict(tasks=5, epochs=200, batch_size=256, optimizer="sgd", lr=0.3, weight_decay=1e-4,
                     proj_hidden=2048, proj_dim=256, queue_size=65536, momentum_tau=0.99),
}

# PNR regulariser weights (SPEC.md section 4; w_n is the CIFAR-100 value of the paper). CaSSLe
# uses the same w_d with w_n = 0 (SPEC.md section 5).
REGULARIZER_WEIGHTS = {
    "byol": dict(distill_weight=1.0, negative_weight=0.5),
    "vicreg": dict(distill_weight=25.0, negative_weight=23.0),
    "barlow": dict(distill_weight=1.0, negative_weight=1.0),
}


@dataclass
class Config:
    dataset: str = "digits"
    data_dir: Optional[str] = None
    method: str = "simclr"
    strategy: str = "pnr"
    split: str = "class"
    tasks: Optional[int] = None
    epochs: Optional[int] = None
    seed: int = 0
    backend: str = "auto"
    verify_backend: Optional[str] = None
    device: str = "cpu"
    threads: int = 1
    batch_size: Optional[int] = None
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    temperature: float = 0.2
    distill_temperature: float = 0.2
    cassle_weight: float = 1.0
    distill_weight: Optional[float] = None
    negative_weight: Optional[float] = None
    proj_hidden: Optional[int] = None
    proj_dim: Optional[int] = None
    queue_size: Optional[int] = None
    momentum_tau: Optional[float] = None
    max_steps_per_epoch: Optional[int] = None
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    output_dir: Optional[str] = None
    resume: bool = False
    stop_after_epochs: Optional[int] = None
    progress: bool = True

    def fingerprint(self) -> dict:
        """The fields that determine the result (everything but :data:`RUNTIME_FIELDS`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def resolve(cfg: Config) -> Config:
    """Check the choices and fill every ``None`` default from the dataset's defaults; returns a
    new Config (the input is not modified)."""
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("method", cfg.method, METHODS)
    _choice("strategy", cfg.strategy, STRATEGIES)
    _choice("split", cfg.split, SPLITS)
    _choice("backend", cfg.backend, BACKEND_CHOICES)
    _choice("device", cfg.device, DEVICES)
    if cfg.verify_backend is not None:
        _choice("verify_backend", cfg.verify_backend, BACKEND_CHOICES)
    values = dataclasses.asdict(cfg)
    for key, default in DATASET_DEFAULTS[cfg.dataset].items():
        if values[key] is None:
            values[key] = default
    weights = REGULARIZER_WEIGHTS.get(cfg.method, {})
    for key in ("distill_weight", "negative_weight"):
        if values[key] is None and key in weights:
            values[key] = weights[key]
    if values["output_dir"] is None:
        values["output_dir"] = os.path.join(
            "cssl_runs", f"{cfg.dataset}_{cfg.method}_{cfg.strategy}_seed{cfg.seed}")
    out = Config(**values)
    _choice("optimizer", out.optimizer, OPTIMIZERS)
    for name in ("tasks", "epochs", "batch_size", "lr", "proj_hidden", "proj_dim", "queue_size",
                 "temperature", "distill_temperature"):
        _positive(name, getattr(out, name))
    for name in ("max_steps_per_epoch", "limit_train", "limit_test", "stop_after_epochs"):
        _positive(name, getattr(out, name), allow_none=True)
    if out.threads < 0:
        raise ValueError(f"threads must be >= 0 (0: torch's default), got {out.threads}")
    if out.batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (batch statistics), got {out.batch_size}")
    if out.method == "mocov2plus" and out.queue_size < 2:
        raise ValueError(f"queue_size must be at least 2 for mocov2plus, got {out.queue_size}")
    if not 0 <= out.momentum_tau < 1:
        raise ValueError(f"momentum_tau must be in [0, 1), got {out.momentum_tau}")
    return out
