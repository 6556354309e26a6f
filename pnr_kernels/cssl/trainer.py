"""The continual training loop: tasks, epochs, checkpoints, resume and evaluation.

Per task t: (t > 0) deep-copy the online encoder as the frozen previous model (eval mode, no
gradients), reset the distillation predictor, build a fresh optimiser with a cosine learning-rate
schedule over the task's steps; train ``epochs`` epochs, writing a checkpoint after each; then
evaluate (linear probe and kNN on the backbone features) and write metrics.json.

Exact resume: a checkpoint holds the learner (online and momentum encoders, predictors, queues),
the frozen model, the optimiser, every RNG state (python, numpy, torch, the data-order and
augmentation generators) and the position (task, epochs done, evaluated). Whatever happens after
a checkpoint is a deterministic function of it (deterministic algorithms are switched on), so a
run resumed from it ends with the metrics of the uninterrupted run, bit for bit on the same device.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from typing import Callable, Optional

import numpy as np
import torch

from .. import backends
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state, write_json
from .config import Config, resolve
from .data import TwoViewAugment, load_data, make_tasks
from .evaluation import (extract_features, forgetting, format_table, knn_scores, linear_probe_logits,
                         save_plot, task_accuracies)
from .methods import Learner, LossRunner

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
PLOT = "accuracy.png"


class ConfigMismatchError(ValueError):
    """--resume found a checkpoint written by a run with a different configuration."""


class StopRequested(Exception):
    """Raised after the checkpoint of epoch ``--stop-after-epochs``: a clean stand-in for a kill."""


def _progress(iterable, enabled: bool, **kwargs):
    """tqdm around ``iterable`` when tqdm is installed and ``enabled``; otherwise the iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def _log(message: str) -> None:
    try:
        from tqdm.auto import tqdm
        tqdm.write(message)
    except ImportError:
        print(message, flush=True)


class Trainer:
    """Runs one configuration end to end; ``run()`` returns the final metrics dictionary."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = _log):
        self.cfg = cfg = resolve(cfg)
        self.log = log
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False; use --device cpu")
        if cfg.device == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        self.device = torch.device(cfg.device)
        for option, name in (("--backend", cfg.backend), ("--verify-backend", cfg.verify_backend)):
            reason = None if name in (None, "auto") else backends.unavailable_reason(
                name, None, self.device, torch.float32)
            if reason is not None:  # fail before any training, not at the first loss
                raise backends.BackendUnavailableError(f"{option} {name} cannot run on {cfg.device}: {reason}")
        self.data = load_data(cfg.dataset, cfg.data_dir)
        if cfg.limit_test is not None:
            keep = torch.randperm(len(self.data.test_y), generator=torch.Generator().manual_seed(cfg.seed))
            keep = torch.sort(keep[:cfg.limit_test]).values
            self.data.test_x, self.data.test_y = self.data.test_x[keep], self.data.test_y[keep]
        self.tasks = make_tasks(self.data.train_y, self.data.num_classes, cfg.tasks, cfg.split, cfg.seed,
                                limit=cfg.limit_train)
        for i, task in enumerate(self.tasks):
            if len(task.train_indices) < 2:
                raise ValueError(f"task {i} has {len(task.train_indices)} training images; at least 2 are needed")
        self.augment = TwoViewAugment.for_dataset(cfg.dataset, self.data)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.generators = {"data": torch.Generator().manual_seed(cfg.seed + 1),
                           "augment": torch.Generator().manual_seed(cfg.seed + 2)}
        self.learner = Learner(cfg, self.data.channels).to(self.device)
        self.frozen = None
        self.optimizer = None
        self.runner = LossRunner(cfg.backend, cfg.verify_backend)
        self.position = {"task": 0, "epochs_done": 0, "started": False, "evaluated": False}
        self.records = {key: [] for key in ("accuracy_matrix", "task_aware_accuracy_matrix", "linear_accuracy",
                                            "knn_accuracy_matrix", "knn_task_aware_accuracy_matrix",
                                            "knn_accuracy", "epochs", "verification")}
        self.epochs_this_process = 0
        self.checkpoint_path = os.path.join(cfg.output_dir, CHECKPOINT)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        if os.path.exists(self.checkpoint_path):
            if not cfg.resume:
                raise FileExistsError(
                    f"{self.checkpoint_path} exists: pass --resume to continue that run, or choose another --output-dir")
            self._restore(load_checkpoint(self.checkpoint_path))
            pos = self.position
            self.log(f"resuming from {self.checkpoint_path}: task {pos['task']}, "
                     f"{pos['epochs_done']} epoch(s) done, evaluated={pos['evaluated']}")
        elif cfg.resume:
            self.log(f"--resume: no checkpoint in {cfg.output_dir}, starting from the beginning")
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
        write_json(os.path.join(cfg.output_dir, METRICS), metrics)
        if not save_plot(metrics, os.path.join(cfg.output_dir, PLOT)):
            self.log("matplotlib is not installed: no plot (pip install 'pnr-kernels[train]')")
        self.log(format_table(metrics))
        return metrics

    def _run_tasks(self) -> None:
        cfg, pos = self.cfg, self.position
        for t in range(pos["task"], cfg.tasks):
            if pos["task"] != t:
                pos.update(task=t, epochs_done=0, started=False, evaluated=False)
            if not pos["started"]:
                self._start_task(t)
                pos["started"] = True
            epochs = _progress(range(pos["epochs_done"], cfg.epochs), cfg.progress,
                               desc=f"task {t + 1}/{cfg.tasks}", unit="epoch", leave=False)
            for epoch in epochs:
                self._train_epoch(t, epoch)
                pos["epochs_done"] = epoch + 1
                self._save()
                self.epochs_this_process += 1
                if cfg.stop_after_epochs is not None and self.epochs_this_process >= cfg.stop_after_epochs:
                    raise StopRequested(f"stopped after {self.epochs_this_process} epoch(s) as asked "
                                        f"(--stop-after-epochs); continue with --resume")
            if not pos["evaluated"]:
                self._evaluate(t)
                pos["evaluated"] = True
                self._save()
                write_json(os.path.join(cfg.output_dir, METRICS), self.metrics(completed=False))

    def _start_task(self, task: int) -> None:
        if task > 0:
            self.frozen = copy.deepcopy(self.learner.online).requires_grad_(False).eval()
        self.learner.start_task(task)
        self.optimizer = self._new_optimizer()
        self.log(f"task {task + 1}/{self.cfg.tasks}: classes {self.tasks[task].classes}, "
                 f"{len(self.tasks[task].train_indices)} training images")

    def _new_optimizer(self) -> torch.optim.Optimizer:
        cfg, params = self.cfg, self.learner.trainable_parameters()
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)

    def _steps_per_epoch(self, task: int) -> tuple:
        """(batch size, steps per epoch): full batches only (the last partial one is dropped)."""
        n = len(self.tasks[task].train_indices)
        batch = min(self.cfg.batch_size, n)
        steps = n // batch
        if self.cfg.max_steps_per_epoch is not None:
            steps = min(steps, self.cfg.max_steps_per_epoch)
        return batch, steps

    def _train_epoch(self, task: int, epoch: int) -> None:
        cfg = self.cfg
        batch, steps = self._steps_per_epoch(task)
        total_steps = steps * cfg.epochs
        indices = self.tasks[task].train_indices
        order = indices[torch.randperm(len(indices), generator=self.generators["data"])]
        self.learner.train()
        losses = []
        started = time.perf_counter()
        bar = _progress(range(steps), cfg.progress, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for step in bar:
            images = self.data.train_x[order[step * batch:(step + 1) * batch]].to(self.device)
            x1 = self.augment(images, self.generators["augment"])
            x2 = self.augment(images, self.generators["augment"])
            lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + step) / total_steps))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.runner.where = f"task {task}, epoch {epoch}, step {step}"
            loss, pending = self.learner.loss(x1, x2, self.frozen, self.runner)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at {self.runner.where}; "
                                         f"try a lower --lr (now {cfg.lr})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.learner.after_step(pending)
            losses.append(loss.item())
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
        if not cfg.progress or (epoch + 1) % max(1, cfg.epochs // 4) == 0 or epoch + 1 == cfg.epochs:
            self.log(f"  task {task} epoch {epoch + 1}/{cfg.epochs}: loss {mean_loss:.4f} "
                     f"({steps} steps, {time.perf_counter() - started:.1f}s)")

    def _evaluate(self, task: int) -> None:
        data, classes = self.data, [t.classes for t in self.tasks]
        backbone = self.learner.online.backbone
        train_f = extract_features(backbone, data.train_x, self.augment.normalize, self.device)
        test_f = extract_features(backbone, data.test_x, self.augment.normalize, self.device)
        linear = task_accuracies(linear_probe_logits(train_f, data.train_y, test_f, data.num_classes),
                                 data.test_y, classes)
        knn = task_accuracies(knn_scores(train_f, data.train_y, test_f, data.num_classes), data.test_y, classes)
        rec = self.records
        rec["accuracy_matrix"].append(linear["per_task"])
        rec["task_aware_accuracy_matrix"].append(linear["task_aware"])
        rec["linear_accuracy"].append(linear["all"])
        rec["knn_accuracy_matrix"].append(knn["per_task"])
        rec["knn_task_aware_accuracy_matrix"].append(knn["task_aware"])
        rec["knn_accuracy"].append(knn["all"])
        self.log(f"after task {task}: linear {linear['all']:.2f}% (per task "
                 + ", ".join(f"{a:.1f}" for a in linear["per_task"]) + f"), kNN {knn['all']:.2f}%")

    # -- results and checkpoints ----------------------------------------------------------------

    def metrics(self, completed: bool) -> dict:
        rec, cfg = self.records, self.cfg
        out = {
            "config": cfg.fingerprint(),
            "completed": completed,
            "tasks": [{"classes": t.classes, "train_images": len(t.train_indices)} for t in self.tasks],
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
        save_checkpoint(self.checkpoint_path, {
            "format": 1,
            "config": self.cfg.fingerprint(),
            "position": dict(self.position),
            "records": self.records,
            "learner": self.learner.state_dict(),
            "frozen": None if self.frozen is None else self.frozen.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "rng": rng_state(self.generators),
        })

    def _restore(self, checkpoint: dict) -> None:
        saved, now = checkpoint["config"], self.cfg.fingerprint()
        if saved != now:
            keys = sorted(set(saved) | set(now))
            diffs = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in keys
                     if saved.get(k) != now.get(k)]
            raise ConfigMismatchError(
                f"{self.checkpoint_path} was written by a different configuration ("
                + "; ".join(diffs) + "); rerun with the same options or use another --output-dir")
        self.learner.load_state_dict(checkpoint["learner"])
        if checkpoint["frozen"] is not None:
            self.frozen = copy.deepcopy(self.learner.online).requires_grad_(False).eval()
            self.frozen.load_state_dict(checkpoint["frozen"])
        if checkpoint["optimizer"] is not None:
            self.optimizer = self._new_optimizer()
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.position = dict(checkpoint["position"])
        self.records = checkpoint["records"]
        set_rng_state(checkpoint["rng"], self.generators)


def train(cfg: Config, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run ``cfg`` (see :class:`Trainer`) and return its metrics."""
    return Trainer(cfg, log=log or _log).run()

