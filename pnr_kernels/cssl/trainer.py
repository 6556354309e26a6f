"""The continual training loop: tasks, epochs, checkpoints, resume and evaluation.

Tasks are numbered from 1 in every log line, the plot and docs/trainer.md; metrics.json keeps
Python's 0-based list positions (its ``task_numbering`` entry says so).

Per task: (from the second on) deep-copy the online encoder as the frozen previous model (eval
mode, no gradients); the distillation predictor g and MoCo's previous-model queue carry over; build
a fresh optimiser with the recipe's learning-rate schedule (optional linear warm-up, then cosine)
over the task's steps; train ``epochs`` epochs, writing a checkpoint every ``checkpoint_every``
epochs and after the task's last; then evaluate (linear probe and kNN on the backbone features;
after the last task also the authors' linear evaluation when ``linear_eval_epochs`` > 0) and write
metrics.json. Image folders are decoded batch by batch by ``workers`` processes (folders.py); with
``precision`` bf16/fp16 the backbone runs under autocast (fp16 with a GradScaler, checkpointed).

Exact resume: a checkpoint holds the learner (online and momentum encoders, predictors, queues),
the frozen model, the optimiser, every RNG state (python, numpy, torch, the data-order and
augmentation generators) and the position (task, epochs done, evaluated). Whatever happens after
a checkpoint is a deterministic function of it (deterministic algorithms are switched on), so a
run resumed from it ends with the metrics of the uninterrupted run, bit for bit on the same device.

Under torchrun with 2+ ranks (parallel.py, docs/trainer.md "Data-parallel training (torchrun)"):
each rank trains on its slice of every global batch through DistributedDataParallel; rank 0 alone
logs, evaluates and writes; the checkpoint holds every rank's generator states.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import sys
import time
from typing import Callable, List, Optional

import numpy as np
import torch

from .. import _cli, backends
from .checkpoint import (load_checkpoint, remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state,
                         write_json)
from .config import PAPER_LARS_ETA, PAPER_WARMUP_START_LR, Config, resolve
from .data import load_data, make_augment, make_tasks
from .evaluation import (extract_features, forgetting, format_table, knn_scores, linear_probe_logits,
                         paper_linear_eval, save_plot, task_accuracies)
from .folders import iterate_batches
from .methods import Learner, LossRunner
from .parallel import LONG_TIMEOUT, TIMEOUT, Parallel, setup as setup_parallel, teardown as teardown_parallel

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
PLOT = "accuracy.png"


class ConfigMismatchError(ValueError):
    """--resume found a checkpoint written by a run with a different configuration."""


class StopRequested(Exception):
    """Raised after the checkpoint of epoch ``--stop-after-epochs``: a clean stand-in for a kill."""


class OutputDirError(ValueError):
    """--output-dir cannot hold the run's files (a file, under a file, not writable)."""


def bars_enabled(requested: bool, stream=None) -> bool:
    """Progress bars only when asked for, tqdm is installed and ``stream`` (stderr, where tqdm
    draws) is a terminal: redirected output gets one log line per epoch and no ``\\r``."""
    stream = sys.stderr if stream is None else stream
    if not requested:
        return False
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _progress(iterable, enabled: bool, **kwargs):
    """tqdm around ``iterable`` when ``enabled``; otherwise the iterable."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def _log(message: str) -> None:
    """One log line on stdout, through tqdm.write when tqdm is there so that it never lands inside
    a progress bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(message, flush=True)
        return
    tqdm.write(message)
    sys.stdout.flush()


def native_needed(cfg: Config, device: torch.device) -> bool:
    """Whether this run's losses will go through the native extension."""
    if "native" in (cfg.backend, cfg.verify_backend):
        return True
    if cfg.backend != "auto":
        return False
    if device.type == "cpu":
        return True
    return backends.unavailable_reason("triton", None, device, torch.float32) is not None


def prepare_native(log: Callable[[str], None]) -> None:
    """Build the native extension now, saying so first, when it is not in the cache yet: the
    one-time build then happens before training (and outside the step timing), not silently
    inside the first training step. A failed build is reported; ``auto`` then falls back to the
    reference backend and an explicit ``--backend native`` is refused by the caller."""
    from .. import native

    try:
        plan, why_not = native.make_plan()
    except (OSError, RuntimeError) as exc:
        plan, why_not = None, str(exc)
    if plan is None:
        log(f"the native extension cannot be built here ({why_not}); backend 'auto' uses the reference losses")
        return
    if plan.library.exists():
        return
    parts = "C++ and CUDA (nvcc found)" if plan.nvcc else "C++"
    cores = os.cpu_count() or 1
    duration = ("about 40 s on 2 idle cores with the CUDA part, minutes on a busy machine" if plan.nvcc
                else "under a minute on 2 idle cores, longer on a busy machine")
    log(f"building the native extension once, before training: the {parts} kernels of the losses, compiled for "
        f"this torch and compiler; {duration}, this machine has {cores}. It is cached in {plan.directory} for "
        f"every later run; `pnr-kernels build` does this ahead of time.")
    started = time.perf_counter()
    try:
        result = native.build(plan)
    except (native.BuildError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log(f"the native build failed ({first}); backend 'auto' uses the reference losses "
            f"(`pnr-kernels build` shows the whole compiler output)")
        return
    log(f"native extension {'built' if result.built else 'found in the cache'} in "
        f"{time.perf_counter() - started:.0f} s")


def check_output_dir(path: str) -> None:
    """Fail early (before data loading and any build) when ``path`` cannot become the run's
    folder (``_cli.output_problem``: it is a file, lies under a file, or the nearest existing
    folder is not writable). Creates nothing."""
    why = _cli.output_problem(path, folder=True)
    if why:
        raise OutputDirError(f"--output-dir {why}; choose another --output-dir")


def prepare_output_dir(path: str) -> None:
    """Create ``path`` (and its parents) and check that files can be written there; raises
    :class:`OutputDirError` with what to change otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"--output-dir {path} is a file, not a folder; choose another --output-dir")
    try:
        os.makedirs(path, exist_ok=True)
    except NotADirectoryError as exc:
        parent = os.path.dirname(os.path.abspath(path))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        raise OutputDirError(f"--output-dir {path} cannot be created: {parent} is a file, not a folder; "
                             f"choose another --output-dir") from exc
    except FileExistsError as exc:
        raise OutputDirError(f"--output-dir {path} cannot be created: a part of it is a file; "
                             f"choose another --output-dir") from exc
    except PermissionError as exc:
        raise OutputDirError(f"--output-dir {path} cannot be created: permission denied ({exc.filename}); "
                             f"choose a folder you can write to") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirError(f"--output-dir {path} is not writable (permission denied); "
                             f"choose a folder you can write to")


def lars_adapt_(params: List[torch.nn.Parameter], lr: float, weight_decay: float, eta: float,
                exclude_bias_norm: bool, eps: float = 1e-8) -> None:
    """LARS as the authors' code applies it around SGD, in place on the gradients: every
    parameter (every one with 2+ dimensions when ``exclude_bias_norm``) gets ``g <- (g + wd p) *
    min(eta |p| / (|g| + wd |p| + eps) / lr, 1)`` (the clipped trust ratio); excluded biases and
    norm weights get their plain gradient and no weight decay."""
    for p in params:
        if p.grad is None or (exclude_bias_norm and p.ndim == 1):
            continue
        p_norm, g_norm = torch.norm(p.detach()), torch.norm(p.grad)
        if p_norm == 0 or g_norm == 0:
            continue
        ratio = eta * p_norm / (g_norm + p_norm * weight_decay + eps)
        if lr > 0:
            ratio = torch.clamp(ratio / lr, max=1.0)
        p.grad.add_(p.detach(), alpha=weight_decay).mul_(ratio)


class Trainer:
    """Runs one configuration end to end; ``run()`` returns the final metrics dictionary."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = _log, parallel: Optional[Parallel] = None):
        self.cfg = cfg = resolve(cfg)
        # Under torchrun with 2+ ranks (parallel.py): rank 0 logs, writes and evaluates.
        self.parallel = par = parallel if parallel is not None else Parallel()
        self.log = log if par.is_main else (lambda _message: None)
        self.bars = bars_enabled(cfg.progress) and par.is_main
        check_output_dir(cfg.output_dir)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
        if cfg.sync_bn and par.enabled and cfg.device != "cuda":
            raise ValueError("--sync-bn needs --device cuda (nn.SyncBatchNorm runs on GPUs only); "
                             "drop --sync-bn on CPU (each rank then normalises by its own batch)")
        if cfg.device == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.device = torch.device(cfg.device, par.local_rank) if cfg.device == "cuda" and par.enabled \
            else torch.device(cfg.device)
        if native_needed(cfg, self.device):  # rank 0 builds (once, into the cache) before the others look
            if par.is_main:
                prepare_native(self.log)
            par.barrier()
            if not par.is_main:
                prepare_native(self.log)
        for option, name in (("--backend", cfg.backend), ("--verify-backend", cfg.verify_backend)):
            reason = None if name in (None, "auto") else backends.unavailable_reason(
                name, None, self.device, torch.float32)
            if reason is not None:  # fail before any training, not at the first loss
                raise backends.BackendUnavailableError(f"{option} {name} cannot run on {cfg.device}: {reason}")
        self.data = load_data(cfg.dataset, cfg.data_dir, split=cfg.split, image_size=cfg.image_size)
        if cfg.dataset == "imagefolder":
            domains = f", domains {', '.join(self.data.domains)}" if self.data.domains else ""
            self.log(f"{cfg.data_dir}: {len(self.data.train_y)} training and {len(self.data.test_y)} test images, "
                     f"{self.data.num_classes} classes{domains}")
        if self.data.skipped:
            self.log(f"skipped {len(self.data.skipped)} unreadable image(s) of {cfg.data_dir} "
                     f"(first: {self.data.skipped[0]})")
        if cfg.split == "domain":  # one task per domain
            domains = len(self.data.domains)
            if cfg.tasks is not None and cfg.tasks != domains:
                raise ValueError(f"--tasks {cfg.tasks} but {cfg.data_dir} has {domains} domains "
                                 f"({', '.join(self.data.domains)}); with --split domain every domain is one task")
            self.cfg = cfg = dataclasses.replace(cfg, tasks=domains)
        if cfg.limit_test is not None:
            keep = torch.randperm(len(self.data.test_y), generator=torch.Generator().manual_seed(cfg.seed))
            keep = torch.sort(keep[:cfg.limit_test]).values
            self.data.test_x, self.data.test_y = self.data.test_x[keep], self.data.test_y[keep]
            if self.data.test_domain is not None:
                self.data.test_domain = self.data.test_domain[keep]
        # The probe (linear and kNN) is fitted on every training image, or on a seeded subset of
        # --limit-probe of them.
        self.probe_indices = None
        if cfg.limit_probe is not None and cfg.limit_probe < len(self.data.train_y):
            keep = torch.randperm(len(self.data.train_y), generator=torch.Generator().manual_seed(cfg.seed + 3))
            self.probe_indices = torch.sort(keep[:cfg.limit_probe]).values
        self.tasks = make_tasks(self.data.train_y, self.data.num_classes, cfg.tasks, cfg.split, cfg.seed,
                                limit=cfg.limit_train, domains=self.data.train_domain)
        for i, task in enumerate(self.tasks):
            if len(task.train_indices) < 2:
                raise ValueError(f"task {i + 1} has {len(task.train_indices)} training images; at least 2 are needed")
        self.augment = make_augment(cfg.recipe, cfg.method, cfg.dataset, self.data, image_size=cfg.image_size)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        # The data order is the same on every rank (each takes its slice of the global batch); the
        # augmentations are drawn per rank (rank 0's generator is the single-process one).
        self.generators = {"data": torch.Generator().manual_seed(cfg.seed + 1),
                           "augment": torch.Generator().manual_seed(cfg.seed + 2 + 1_000_003 * par.rank)}
        self.learner = Learner(cfg, self.data.channels).to(self.device)
        if par.enabled and cfg.sync_bn:
            self.learner = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.learner)
        self.model = self.learner  # what a training step calls: the Learner, or DDP around it (_wrap)
        self._wrapped = None
        self.frozen = None
        self.optimizer = None
        self.runner = LossRunner(cfg.backend, cfg.verify_backend)
        # fp16: gradients scaled against underflow (bf16 and 32 need none).
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.position = {"task": 0, "epochs_done": 0, "started": False, "evaluated": False}
        self.records = {key: [] for key in ("accuracy_matrix", "task_aware_accuracy_matrix", "linear_accuracy",
                                            "knn_accuracy_matrix", "knn_task_aware_accuracy_matrix",
                                            "knn_accuracy", "epochs", "verification")}
        self.records["paper_linear"] = None
        self.epochs_this_process = 0
        self.checkpoint_path = os.path.join(cfg.output_dir, CHECKPOINT)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, par = self.cfg, self.parallel
        checkpoint = par.broadcast_object(self._prepare_and_read)  # rank 0 reads, every rank gets it
        if checkpoint is not None:
            self._restore(checkpoint)
            pos = self.position
            if pos["evaluated"] and pos["task"] == cfg.tasks - 1:
                self.log(f"{self.checkpoint_path} holds a finished run: its results again "
                         f"(delete {cfg.output_dir} to train from scratch)")
            else:
                state = ("trained and evaluated" if pos["evaluated"] else
                         f"{pos['epochs_done']} of {cfg.epochs} epoch(s) done")
                self.log(f"resuming from {self.checkpoint_path}: task {pos['task'] + 1}/{cfg.tasks}, {state}")
        elif cfg.resume:
            self.log(f"no checkpoint in {cfg.output_dir} yet: starting a new run")
        if par.enabled:
            self.log(f"data-parallel: {par.world} ranks ({'nccl' if self.device.type == 'cuda' else 'gloo'}), "
                     f"{cfg.batch_size} images per rank and step, global batch {par.world * cfg.batch_size}"
                     f"{', SyncBatchNorm' if cfg.sync_bn else ''}; rank 0 writes {cfg.output_dir}")
        deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
        torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        try:
            self._run_tasks()
        finally:
            torch.use_deterministic_algorithms(deterministic)
            torch.set_num_threads(threads)
        metrics = self.metrics(completed=True)
        if par.is_main:
            write_json(os.path.join(cfg.output_dir, METRICS), metrics)
            if not save_plot(metrics, os.path.join(cfg.output_dir, PLOT)):
                self.log("matplotlib is not installed: no plot (pip install 'pnr-kernels[train]')")
            self.log(format_table(metrics))
            self.log(f"outputs in {cfg.output_dir}: {METRICS}, {PLOT}, {CHECKPOINT}")
        par.barrier()
        return metrics

    def _prepare_and_read(self) -> Optional[dict]:
        """Create the output folder, clear stale temporaries and read the checkpoint, if any
        (on rank 0 only under torchrun)."""
        cfg = self.cfg
        prepare_output_dir(cfg.output_dir)
        stale = remove_stale_temporaries(cfg.output_dir, (CHECKPOINT, METRICS, PLOT))
        if stale:
            self.log(f"removed {len(stale)} temporary file(s) left by an interrupted write: "
                     + ", ".join(os.path.basename(p) for p in stale))
        if not os.path.exists(self.checkpoint_path):
            return None
        if not cfg.resume:
            raise FileExistsError(
                f"{self.checkpoint_path} exists: pass --resume to continue that run, or choose another --output-dir")
        return load_checkpoint(self.checkpoint_path)

    def _run_tasks(self) -> None:
        cfg, pos = self.cfg, self.position
        for t in range(pos["task"], cfg.tasks):
            if pos["task"] != t:
                pos.update(task=t, epochs_done=0, started=False, evaluated=False)
            if not pos["started"]:
                self._start_task(t)
                pos["started"] = True
            epochs = _progress(range(pos["epochs_done"], cfg.epochs), self.bars,
                               desc=f"task {t + 1}/{cfg.tasks}", unit="epoch", leave=False)
            for epoch in epochs:
                self._train_epoch(t, epoch)
                pos["epochs_done"] = epoch + 1
                self.epochs_this_process += 1
                stop = cfg.stop_after_epochs is not None and self.epochs_this_process >= cfg.stop_after_epochs
                if stop or (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    self._save()
                if stop:
                    raise StopRequested(f"stopped after {self.epochs_this_process} epoch(s) as asked "
                                        f"(--stop-after-epochs); continue with --resume")
            if not pos["evaluated"]:
                if self.parallel.is_main:  # rank 0 evaluates; the others wait in _save's collectives
                    self._evaluate(t)
                pos["evaluated"] = True
                self._save()
                if self.parallel.is_main:
                    write_json(os.path.join(cfg.output_dir, METRICS), self.metrics(completed=False))

    def _start_task(self, task: int) -> None:
        if task > 0:
            # Every rank's frozen model is rank 0's (BatchNorm running statistics differ per rank
            # without --sync-bn; the weights are the same).
            self.parallel.broadcast_buffers(self.learner)
            self.frozen = copy.deepcopy(self.learner.online).requires_grad_(False).eval()
        self.optimizer = self._new_optimizer()
        what = (f"domain {self.data.domains[task]}, {len(self.tasks[task].classes)} classes" if self.data.domains
                else f"classes {self.tasks[task].classes}")
        self.log(f"task {task + 1}/{self.cfg.tasks}: {what}, {len(self.tasks[task].train_indices)} training images")

    def _wrap(self, task: int) -> None:
        """Under torchrun: DistributedDataParallel around the Learner (gradients averaged over the
        ranks). The distillation predictor g is unused in the first task (and under fine-tuning):
        DDP looks for unused parameters then only. Buffers (BatchNorm statistics, MoCo's queues)
        are not synchronised per step: the queues are the same on every rank anyway, and the
        statistics are taken from rank 0 where they matter (the frozen copy at each task's start,
        evaluation, checkpoints)."""
        unused = task == 0 or self.cfg.strategy == "finetune"
        if not self.parallel.enabled or self._wrapped == unused:
            return
        from torch.nn.parallel import DistributedDataParallel
        import inspect
        buffers = (dict(forward_sync_buffers=False)
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else dict(broadcast_buffers=False))
        self.model = DistributedDataParallel(
            self.learner, device_ids=[self.parallel.local_rank] if self.device.type == "cuda" else None,
            find_unused_parameters=unused, **buffers)
        self._wrapped = unused

    def _new_optimizer(self) -> torch.optim.Optimizer:
        cfg, params = self.cfg, self.learner.trainable_parameters()
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "lars":  # weight decay is applied by lars_adapt_ (not to excluded parameters)
            return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=0.0)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)

    def _steps_per_epoch(self, task: int) -> tuple:
        """(batch size per rank, steps per epoch): full global batches only (the last partial one
        is dropped)."""
        n, world = len(self.tasks[task].train_indices), self.parallel.world
        batch = min(self.cfg.batch_size, n // world)
        steps = n // (batch * world)
        if self.cfg.max_steps_per_epoch is not None:
            steps = min(steps, self.cfg.max_steps_per_epoch)
        return batch, steps

    def _schedule(self, step: int, total: int) -> tuple:
        """(learning rate, momentum tau) at ``step`` of the task's ``total`` steps: linear warm-up
        from min(0.003, lr) over ``warmup_epochs``, then cosine to 0; tau rises from
        ``momentum_tau`` to ``final_momentum_tau`` along a cosine (constant when they are equal)."""
        cfg = self.cfg
        warmup = min(total, cfg.warmup_epochs * (total // cfg.epochs))
        if step < warmup:
            start = min(PAPER_WARMUP_START_LR, cfg.lr)
            lr = start + (cfg.lr - start) * step / warmup
        else:
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        base, final = cfg.momentum_tau, cfg.final_momentum_tau
        tau = final - (final - base) * (math.cos(math.pi * step / total) + 1) / 2
        return lr, tau

    def _train_epoch(self, task: int, epoch: int) -> None:
        cfg = self.cfg
        batch, steps = self._steps_per_epoch(task)
        total_steps = steps * cfg.epochs
        indices = self.tasks[task].train_indices
        order = indices[torch.randperm(len(indices), generator=self.generators["data"])]
        par = self.parallel
        self._wrap(task)
        self.model.train()
        losses = []
        started = time.perf_counter()
        bar = _progress(range(steps), self.bars, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        params = self.learner.trainable_parameters() if cfg.optimizer == "lars" else None
        # This rank's slice of each global batch, decoded ahead by --workers processes for folders.
        chunks = [order[(step * par.world + par.rank) * batch:][:batch] for step in range(steps)]
        batches = iterate_batches(self.data.train_x, chunks, self.device, cfg.workers)
        for step, images in zip(bar, batches):
            x1 = self.augment(images, self.generators["augment"], view=0)
            x2 = self.augment(images, self.generators["augment"], view=1)
            lr, tau = self._schedule(epoch * steps + step, total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.runner.where = f"task {task + 1}, epoch {epoch + 1}, step {step + 1}"
            loss, pending = self.model(x1, x2, self.frozen, self.runner)
            # The mean over ranks (the loss of the global batch): logged, and checked on every rank
            # alike so that all of them stop together.
            value = par.mean(loss)
            if not torch.isfinite(value):  # name what is not finite (Learner.explain_nonfinite)
                culprit = (self.learner.explain_nonfinite(pending) if not torch.isfinite(loss)
                           else f"another rank's loss is not finite; try a lower --lr (now {cfg.lr})")
                raise FloatingPointError(f"the loss is {value.item()} at {self.runner.where}: {culprit}")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
            else:  # fp16: scaled backward, gradients unscaled before LARS and the (skipped if inf) step
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            if params is not None:
                lars_adapt_(params, lr, cfg.weight_decay, PAPER_LARS_ETA, cfg.lars_exclude_bias_norm)
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.learner.after_step(pending, tau)
            losses.append(value.item())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        mean_loss = sum(losses) / len(losses)
        self.records["epochs"].append({"task": task, "epoch": epoch, "steps": steps, "mean_loss": mean_loss})
        if cfg.verify_backend is not None:
            per_loss = self.runner.take_records()
            self.records["verification"].append({
                "task": task, "epoch": epoch, "backend": cfg.verify_backend, "losses": per_loss,
                "max_loss_rel_diff": max((v["loss_rel_diff"] for v in per_loss.values()), default=0.0),
                "max_grad_rel_diff": max((v["grad_rel_diff"] for v in per_loss.values()), default=0.0)})
        # Without bars: one line per epoch. With bars: a line at each quarter of the task.
        if not self.bars or (epoch + 1) % max(1, cfg.epochs // 4) == 0 or epoch + 1 == cfg.epochs:
            self.log(f"  task {task + 1}/{cfg.tasks} epoch {epoch + 1}/{cfg.epochs}: loss {mean_loss:.4f} "
                     f"({steps} steps, {time.perf_counter() - started:.1f} s)")

    def _evaluate(self, task: int) -> None:
        data, classes, cfg = self.data, [t.classes for t in self.tasks], self.cfg
        # Accuracy on task j: its classes' test images, or (--split domain) its domain's.
        groups = None if data.test_domain is None else [data.test_domain == j for j in range(cfg.tasks)]
        backbone = self.learner.online.backbone
        train_x, train_y = data.train_x, data.train_y
        if self.probe_indices is not None:
            train_x, train_y = train_x[self.probe_indices], train_y[self.probe_indices]
        bar = (lambda iterable, **kw: _progress(iterable, self.bars, **kw))
        features = dict(view=self.augment.eval_view, device=self.device, workers=cfg.workers, precision=cfg.precision,
                        progress=bar)
        train_f = extract_features(backbone, train_x, **features)
        test_f = extract_features(backbone, data.test_x, **features)
        if not (torch.isfinite(train_f).all() and torch.isfinite(test_f).all()):
            raise FloatingPointError(
                f"the backbone's features are not finite after task {task + 1} (eval mode, BatchNorm running "
                f"statistics); try a lower --lr (now {self.cfg.lr}) or more steps per epoch")
        linear = task_accuracies(linear_probe_logits(train_f, train_y, test_f, data.num_classes),
                                 data.test_y, classes, groups)
        knn = task_accuracies(knn_scores(train_f, train_y, test_f, data.num_classes), data.test_y, classes, groups)
        rec = self.records
        rec["accuracy_matrix"].append(linear["per_task"])
        rec["task_aware_accuracy_matrix"].append(linear["task_aware"])
        rec["linear_accuracy"].append(linear["all"])
        rec["knn_accuracy_matrix"].append(knn["per_task"])
        rec["knn_task_aware_accuracy_matrix"].append(knn["task_aware"])
        rec["knn_accuracy"].append(knn["all"])
        self.log(f"after task {task + 1}/{self.cfg.tasks}: linear {linear['all']:.2f}% (per task "
                 + ", ".join(f"{a:.1f}" for a in linear["per_task"]) + f"), kNN {knn['all']:.2f}%")
        if task == cfg.tasks - 1 and cfg.linear_eval_epochs > 0:
            self.log(f"linear evaluation as the authors' (--linear-eval-epochs {cfg.linear_eval_epochs}, augmented "
                     f"training images, SGD): {len(train_y)} training images")
            started = time.perf_counter()
            logits = paper_linear_eval(
                backbone, train_x, train_y, test_f, data.num_classes, self.augment, epochs=cfg.linear_eval_epochs,
                seed=cfg.seed + 4, device=self.device, workers=cfg.workers, precision=cfg.precision,
                progress=bar)
            paper = task_accuracies(logits, data.test_y, classes, groups)
            rec["paper_linear"] = {"accuracy": paper["all"], "per_task": paper["per_task"],
                                   "epochs": cfg.linear_eval_epochs, "train_images": len(train_y)}
            self.log(f"linear evaluation after task {task + 1}: {paper['all']:.2f}% (per task "
                     + ", ".join(f"{a:.1f}" for a in paper["per_task"])
                     + f"), {time.perf_counter() - started:.0f} s")

    # -- results and checkpoints ----------------------------------------------------------------

    def metrics(self, completed: bool) -> dict:
        rec, cfg = self.records, self.cfg
        out = {
            "config": cfg.fingerprint(),
            "completed": completed,
            "task_numbering": "lists are 0-based: tasks[0], accuracy_matrix[0][0] and epochs[].task == 0 are "
                              "task 1 of the logs and the plot; epochs[].epoch is 0-based too",
            "tasks": [{"classes": t.classes, "train_images": len(t.train_indices)} for t in self.tasks],
            "domains": self.data.domains,
            "skipped_images": len(self.data.skipped),
            "probe_train_images": len(self.data.train_y) if self.probe_indices is None else len(self.probe_indices),
            "auto_backend_order": backends.available_backends(self.device),
            **{k: v for k, v in rec.items() if k != "verification"},
            "average_accuracy": rec["linear_accuracy"][-1] if rec["linear_accuracy"] else None,
            "forgetting": forgetting(rec["accuracy_matrix"]),
            "knn_average_accuracy": rec["knn_accuracy"][-1] if rec["knn_accuracy"] else None,
            "knn_forgetting": forgetting(rec["knn_accuracy_matrix"]),
            "verification": rec["verification"] if cfg.verify_backend is not None else None,
        }
        return out

    def _save(self) -> None:
        """Write the checkpoint (rank 0, holding every rank's generator states; a barrier after)."""
        par = self.parallel
        states = par.all_gather_object(rng_state(self.generators))
        if par.is_main:
            payload = {
                "format": 2,
                "config": self.cfg.fingerprint(),
                "position": dict(self.position),
                "records": self.records,
                "learner": self.learner.state_dict(),
                "frozen": None if self.frozen is None else self.frozen.state_dict(),
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
                "rng": states[0],
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
            }
            if par.enabled:
                payload.update(world_size=par.world, rng_ranks=states)
            save_checkpoint(self.checkpoint_path, payload)
        par.barrier()

    def _restore(self, checkpoint: dict) -> None:
        missing = [k for k in ("config", "position", "records", "learner", "frozen", "optimizer", "rng")
                   if k not in checkpoint]
        if missing or checkpoint.get("format") != 2:
            raise ConfigMismatchError(
                f"{self.checkpoint_path} is not a checkpoint of this pnr-cssl version (format "
                f"{checkpoint.get('format')!r}, expected 2{'; lacks ' + ', '.join(missing) if missing else ''}); "
                f"delete it to start over, or choose another --output-dir")
        # Fields added after format 2 was fixed, at the value that reproduces the older runs.
        older = dict(sync_bn=False, image_size=None, precision="32", linear_eval_epochs=0,
                     pred_hidden=checkpoint["config"].get("proj_hidden"))
        saved, now = {**older, **checkpoint["config"]}, self.cfg.fingerprint()
        if saved != now:
            keys = sorted(set(saved) | set(now))
            diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys
                     if saved.get(k) != now.get(k)]
            raise ConfigMismatchError(
                f"{self.checkpoint_path} was written by a different configuration ("
                + "; ".join(diffs) + "); rerun with the same options or use another --output-dir")
        saved_world = checkpoint.get("world_size", 1)
        if saved_world != self.parallel.world:
            raise ConfigMismatchError(
                f"{self.checkpoint_path} was written by a run of {saved_world} rank(s), this one has "
                f"{self.parallel.world}; resume with the same torchrun --nproc-per-node x --nnodes")
        self.learner.load_state_dict(checkpoint["learner"])
        if checkpoint["frozen"] is not None:
            self.frozen = copy.deepcopy(self.learner.online).requires_grad_(False).eval()
            self.frozen.load_state_dict(checkpoint["frozen"])
        if checkpoint["optimizer"] is not None:
            self.optimizer = self._new_optimizer()
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.position = dict(checkpoint["position"])
        self.records = {"paper_linear": None, **checkpoint["records"]}
        set_rng_state(checkpoint["rng_ranks"][self.parallel.rank] if self.parallel.enabled else checkpoint["rng"],
                      self.generators)


def train(cfg: Config, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run ``cfg`` (see :class:`Trainer`) and return its metrics."""
    resolved = resolve(cfg)
    parallel = setup_parallel(  # torchrun's process group, when there is one
        resolved.device, timeout=LONG_TIMEOUT if resolved.linear_eval_epochs else TIMEOUT)
    trainer, clean = None, False
    try:
        trainer = Trainer(cfg, log=log or _log, parallel=parallel)
        metrics = trainer.run()
        clean = True
        return metrics
    except StopRequested:
        clean = True  # raised on every rank after the same checkpoint
        raise
    finally:
        # Free DistributedDataParallel (its reducer holds the process group) now, while every rank
        # is alive: freed later, with the exception's traceback, after a peer has exited, gloo's
        # destructor can wait for that peer forever. Then a barrier (when every rank got here) and
        # the process group's end.
        if trainer is not None:
            trainer.model = trainer.learner
        trainer = None
        teardown_parallel(parallel, synchronise=clean)
