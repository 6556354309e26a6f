"""The run configuration of the continual SSL trainer, its per-dataset defaults and its recipes.

Every option the CLI exposes is a field of :class:`Config`. Fields left at ``None`` take the
recipe's value for the method, else the dataset's default, in :func:`resolve`, so a saved
configuration always holds concrete values and a resumed run can be checked against it field
by field.

Recipes: ``default`` is deliberately small (2 CPU cores finish the digits run in 45 s);
``paper`` follows the authors' released scripts per benchmark and method: CIFAR-100 for digits and
CIFAR, ImageNet-100 for image folders with ``--split class``/``data``, DomainNet for ``--split
domain`` (docs/trainer.md, "Recipes", lists every value and its source).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional

from .._cli import Number, nonneg_float, nonneg_int, positive_float, positive_int, unit_interval

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
METHODS = ("simclr", "mocov2plus", "byol", "vicreg", "barlow")
STRATEGIES = ("finetune", "cassle", "pnr")
SPLITS = ("class", "data", "domain")
BACKEND_CHOICES = ("auto", "reference", "triton", "native")
DEVICES = ("cpu", "cuda")
OPTIMIZERS = ("sgd", "adamw", "lars")
RECIPES = ("default", "paper")
PRECISIONS = ("32", "bf16", "fp16")
# Image-decoding worker processes (image folders): one per core, up to 8.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)

# Fields that describe how this process runs, not what it computes: they may differ between a
# killed run and its --resume without changing a single number of the result.
RUNTIME_FIELDS = ("output_dir", "data_dir", "resume", "stop_after_epochs", "progress", "checkpoint_every",
                  "debug", "workers")

# Per-dataset defaults of the default recipe (digits: 45 s on 2 CPU cores; CIFAR:
# the usual ResNet-18 setting of the CaSSLe/PNR papers, shortened to something a single GPU finishes).
DATASET_DEFAULTS = {
    "digits": dict(tasks=5, epochs=40, batch_size=64, optimizer="adamw", lr=2e-3, weight_decay=1e-4,
                   proj_hidden=256, proj_dim=64, queue_size=512, momentum_tau=0.99),
    "cifar10": dict(tasks=5, epochs=200, batch_size=256, optimizer="sgd", lr=0.3, weight_decay=1e-4,
                    proj_hidden=2048, proj_dim=256, queue_size=65536, momentum_tau=0.99),
    "cifar100": dict(tasks=5, epochs=200, batch_size=256, optimizer="sgd", lr=0.3, weight_decay=1e-4,
                     proj_hidden=2048, proj_dim=256, queue_size=65536, momentum_tau=0.99),
    "imagefolder": dict(tasks=5, epochs=200, batch_size=256, optimizer="sgd", lr=0.3, weight_decay=1e-4,
                        proj_hidden=2048, proj_dim=256, queue_size=65536, momentum_tau=0.99, image_size=224),
}

# --recipe paper: the authors' CIFAR-100 scripts (bash_files/continual/cifar/<method>_pnr.sh of
# csm9493/PNR) and the defaults of their code base; docs/trainer.md has the table with sources.
# Every method: batch 256, 500 epochs per task, SGD(0.9) + LARS (eta 0.02, clipped), 10 warm-up
# epochs from lr 0.003 then cosine to 0, distillation predictor hidden width 2048.
PAPER_COMMON = dict(epochs=500, batch_size=256, optimizer="lars", warmup_epochs=10, distill_hidden=2048,
                    queue_size=65536, momentum_tau=0.99)
PAPER_RECIPE = {
    "simclr": dict(lr=0.6, weight_decay=1e-4, proj_hidden=2048, proj_dim=128, lars_exclude_bias_norm=True),
    "mocov2plus": dict(lr=0.6, weight_decay=1e-4, proj_hidden=2048, proj_dim=128, final_momentum_tau=0.999,
                       lars_exclude_bias_norm=False),
    "byol": dict(lr=1.0, weight_decay=1e-5, proj_hidden=4096, proj_dim=256, final_momentum_tau=1.0,
                 lars_exclude_bias_norm=True),
    "vicreg": dict(lr=0.3, weight_decay=1e-4, proj_hidden=2048, proj_dim=2048, lars_exclude_bias_norm=True),
    "barlow": dict(lr=0.4, weight_decay=1e-4, proj_hidden=2048, proj_dim=2048, lars_exclude_bias_norm=True),
}
PAPER_RECIPE["byol"]["pred_hidden"] = 4096

# Their ImageNet-100 scripts (bash_files/continual/imagenet-100/{class,data}/<method>_pnr.sh):
# 400 epochs, 128 images per GPU on 2 GPUs (one device here: 256), fp16, the other defaults as for
# CIFAR; w_n differs between class- and data-incremental (PAPER_NEGATIVE_WEIGHTS).
_PAPER_IMAGENET_METHODS = {
    "simclr": dict(lr=0.4, weight_decay=1e-4, proj_hidden=2048, proj_dim=128, lars_exclude_bias_norm=True),
    "mocov2plus": dict(lr=0.6, weight_decay=1e-4, proj_hidden=2048, proj_dim=128, final_momentum_tau=0.999,
                       lars_exclude_bias_norm=False),
    "byol": dict(lr=0.6, weight_decay=1e-5, proj_hidden=4096, proj_dim=256, pred_hidden=8192,
                 final_momentum_tau=1.0, lars_exclude_bias_norm=True),
    "vicreg": dict(lr=0.4, weight_decay=1e-4, proj_hidden=2048, proj_dim=2048, lars_exclude_bias_norm=True),
    "barlow": dict(lr=0.4, weight_decay=1e-4, proj_hidden=2048, proj_dim=2048, lars_exclude_bias_norm=True),
}
_PAPER_FOLDER_COMMON = dict(batch_size=256, optimizer="lars", warmup_epochs=10, distill_hidden=2048,
                            queue_size=65536, momentum_tau=0.99, image_size=224, linear_eval_epochs=100)
# benchmark -> (common values, per-method values); the DomainNet scripts
# (bash_files/continual/domainnet/<method>_pnr.sh) differ from ImageNet-100's in epochs (200),
# tasks (the 6 domains) and w_n only.
PAPER_RECIPES = {
    "cifar100": (PAPER_COMMON, PAPER_RECIPE),
    "imagenet100": (dict(_PAPER_FOLDER_COMMON, epochs=400), _PAPER_IMAGENET_METHODS),
    "domainnet": (dict(_PAPER_FOLDER_COMMON, epochs=200), _PAPER_IMAGENET_METHODS),
}
# w_n of their scripts per benchmark and split (``--negative_lamb``); CIFAR's are REGULARIZER_WEIGHTS.
PAPER_NEGATIVE_WEIGHTS = {
    ("imagenet100", "class"): dict(byol=1.0, vicreg=23.0, barlow=1.0),
    ("imagenet100", "data"): dict(byol=0.1, vicreg=5.0, barlow=0.1),
    ("domainnet", "domain"): dict(byol=1.0, vicreg=8.0, barlow=1.0),
}
PAPER_WARMUP_START_LR = 0.003
PAPER_LARS_ETA = 0.02
# Their linear evaluation (bash_files/linear/{imagenet-100,domainnet}/..._linear.sh, main_linear.py):
# SGD without momentum (their --momentum default 0), lr 3.0 at batch 256, no weight decay, the
# learning rate times 0.1 at 60 % and 80 % of the epochs (their 60 and 80 of 100).
PAPER_LINEAR_EVAL = dict(lr=3.0, batch_size=256, weight_decay=0.0, momentum=0.0, milestones=(0.6, 0.8), gamma=0.1)


def paper_benchmark(dataset: str, split: str) -> str:
    """Which of the authors' benchmarks ``--recipe paper`` follows for ``dataset`` and ``split``."""
    if dataset != "imagefolder":
        return "cifar100"
    return "domainnet" if split == "domain" else "imagenet100"

# PNR regulariser weights (docs/losses.md section 4; w_n is the CIFAR-100 value of the paper).
# CaSSLe uses the same w_d with w_n = 0 (docs/losses.md section 5).
REGULARIZER_WEIGHTS = {
    "byol": dict(distill_weight=1.0, negative_weight=0.5),
    "vicreg": dict(distill_weight=25.0, negative_weight=23.0),
    "barlow": dict(distill_weight=1.0, negative_weight=1.0),
}
DEFAULT_TEMPERATURE = 0.2
DEFAULT_DISTILL_TEMPERATURE = 0.2


@dataclass
class Config:
    dataset: str = "digits"
    data_dir: Optional[str] = None
    method: str = "simclr"
    strategy: str = "pnr"
    recipe: str = "default"
    split: str = "class"
    image_size: Optional[int] = None
    tasks: Optional[int] = None
    epochs: Optional[int] = None
    seed: int = 0
    backend: str = "auto"
    verify_backend: Optional[str] = None
    device: str = "cpu"
    threads: int = 1
    workers: int = DEFAULT_WORKERS
    precision: str = "32"
    batch_size: Optional[int] = None
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup_epochs: Optional[int] = None
    temperature: float = DEFAULT_TEMPERATURE
    distill_temperature: Optional[float] = None
    cassle_weight: float = 1.0
    distill_weight: Optional[float] = None
    negative_weight: Optional[float] = None
    proj_hidden: Optional[int] = None
    proj_dim: Optional[int] = None
    pred_hidden: Optional[int] = None
    distill_hidden: Optional[int] = None
    queue_size: Optional[int] = None
    momentum_tau: Optional[float] = None
    final_momentum_tau: Optional[float] = None
    lars_exclude_bias_norm: Optional[bool] = None
    linear_eval_epochs: Optional[int] = None
    max_steps_per_epoch: Optional[int] = None
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    limit_probe: Optional[int] = None
    output_dir: Optional[str] = None
    resume: bool = False
    stop_after_epochs: Optional[int] = None
    checkpoint_every: int = 1
    sync_bn: bool = False
    progress: bool = True
    debug: bool = False

    def fingerprint(self) -> dict:
        """The fields that determine the result (everything but :data:`RUNTIME_FIELDS`)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}


# The range of every numeric option, checked by the CLI as it parses (argparse ``type=``) and by
# :func:`resolve` for a Config built in Python; None (a dataset default) is left to the defaults.
# Cross-field conditions (final_momentum_tau >= momentum_tau, MoCo's queue) are in resolve().
NUMERIC_RANGES = {
    "tasks": positive_int, "epochs": positive_int, "seed": Number(int, 0, 2 ** 32 - 1),  # numpy's seeds
    "threads": nonneg_int, "batch_size": Number(int, 2),  # batch statistics need 2 rows
    "lr": positive_float, "weight_decay": nonneg_float, "warmup_epochs": nonneg_int,
    "temperature": positive_float, "distill_temperature": positive_float,
    "cassle_weight": nonneg_float, "distill_weight": nonneg_float, "negative_weight": nonneg_float,
    "proj_hidden": positive_int, "proj_dim": positive_int, "distill_hidden": positive_int, "queue_size": positive_int,
    "momentum_tau": Number(float, 0, 1, high_open=True), "final_momentum_tau": unit_interval,
    "max_steps_per_epoch": positive_int, "limit_train": positive_int, "limit_test": positive_int,
    "limit_probe": Number(int, 2), "stop_after_epochs": positive_int, "checkpoint_every": positive_int,
    "image_size": positive_int, "workers": nonneg_int, "pred_hidden": positive_int, "linear_eval_epochs": nonneg_int,
}


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def resolve(cfg: Config) -> Config:
    """Check the choices and fill every ``None`` from the recipe, then the dataset's defaults;
    returns a new Config (the input is not modified)."""
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("method", cfg.method, METHODS)
    _choice("strategy", cfg.strategy, STRATEGIES)
    _choice("recipe", cfg.recipe, RECIPES)
    _choice("split", cfg.split, SPLITS)
    _choice("backend", cfg.backend, BACKEND_CHOICES)
    _choice("device", cfg.device, DEVICES)
    _choice("precision", cfg.precision, PRECISIONS)
    if cfg.split == "domain" and cfg.dataset != "imagefolder":
        raise ValueError(f"split 'domain' needs a dataset with domains (imagefolder), not {cfg.dataset!r}")
    if cfg.precision == "fp16" and cfg.device != "cuda":
        raise ValueError("precision fp16 needs device cuda (on a CPU use bf16 or 32)")
    if cfg.image_size is not None and cfg.dataset != "imagefolder":
        raise ValueError(f"image_size applies to imagefolder only ({cfg.dataset} images keep their size)")
    if cfg.verify_backend is not None:
        _choice("verify_backend", cfg.verify_backend, BACKEND_CHOICES)
    if cfg.method == "simclr" and cfg.strategy == "pnr" and cfg.distill_temperature is not None \
            and cfg.distill_temperature != cfg.temperature:
        raise ValueError(
            f"SimCLR-PNR uses one temperature for both of its terms (docs/losses.md section 1): set "
            f"--temperature, not --distill-temperature ({cfg.distill_temperature} given, --temperature "
            f"{cfg.temperature})")
    values = dataclasses.asdict(cfg)
    layers = []
    if cfg.recipe == "paper":
        benchmark = paper_benchmark(cfg.dataset, cfg.split)
        common, per_method = PAPER_RECIPES[benchmark]
        w_n = PAPER_NEGATIVE_WEIGHTS.get((benchmark, cfg.split), {})
        if cfg.method in w_n:
            layers.append(dict(negative_weight=w_n[cfg.method]))
        layers += [per_method[cfg.method], common]
    defaults = dict(DATASET_DEFAULTS[cfg.dataset])
    if cfg.split == "domain":
        defaults.pop("tasks")  # one task per domain: the trainer counts them
    layers.append(defaults)
    layers.append(dict(warmup_epochs=0, lars_exclude_bias_norm=True, linear_eval_epochs=0))
    layers.append(REGULARIZER_WEIGHTS.get(cfg.method, {}))
    for layer in layers:
        for key, default in layer.items():
            if values[key] is None:
                values[key] = default
    if values["distill_hidden"] is None:
        values["distill_hidden"] = values["proj_hidden"]
    if values["pred_hidden"] is None:
        values["pred_hidden"] = values["proj_hidden"]
    if values["final_momentum_tau"] is None:
        values["final_momentum_tau"] = values["momentum_tau"]
    if values["distill_temperature"] is None:
        # SimCLR-PNR: the one temperature of docs/losses.md section 1 (recorded so the
        # configuration says what ran); elsewhere MoCo-PNR's tau_d and CaSSLe's temperature.
        simclr_pnr = cfg.method == "simclr" and cfg.strategy == "pnr"
        values["distill_temperature"] = cfg.temperature if simclr_pnr else DEFAULT_DISTILL_TEMPERATURE
    if values["output_dir"] is None:
        suffix = "_paper" if cfg.recipe == "paper" else ""
        values["output_dir"] = os.path.join(
            "cssl_runs", f"{cfg.dataset}_{cfg.method}_{cfg.strategy}_seed{cfg.seed}{suffix}")
    out = Config(**values)
    _choice("optimizer", out.optimizer, OPTIMIZERS)
    for name, number in NUMERIC_RANGES.items():
        if getattr(out, name) is not None:
            number.check(name, getattr(out, name))
    if out.method == "mocov2plus" and out.queue_size < 2:
        raise ValueError(f"queue_size must be at least 2 for mocov2plus, got {out.queue_size}")
    if not out.momentum_tau <= out.final_momentum_tau:
        raise ValueError(f"final_momentum_tau must be in [momentum_tau, 1] = [{out.momentum_tau}, 1], "
                         f"got {out.final_momentum_tau}")
    return out
