"""Evaluation of frozen features: linear probe, weighted kNN, the accuracy matrix and forgetting.

After each task the backbone's features of every train and test image are computed once; a
multinomial logistic regression over all classes is fitted on the train features (full-batch
L-BFGS on standardised features, zero initialisation, so it is deterministic) and scored on the
test features. Accuracy on task j = accuracy on the test images of task j's classes (with
``--split domain``: of task j's domain), predicting among all classes (class-incremental); the
task-aware variant predicts among task j's classes only.

:func:`paper_linear_eval` is the authors' offline linear evaluation (docs/trainer.md, "Results
comparable with the paper"): a linear layer trained by SGD on augmented images through the frozen
backbone, after the last task.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import PAPER_LINEAR_EVAL
from .folders import iterate_batches
from .models import backbone_features

LINEAR_L2 = 1e-4        # weight decay of the probe (on the standardised features)
LINEAR_MAX_ITER = 200   # L-BFGS iterations
KNN_K = 20
KNN_TEMPERATURE = 0.07


@torch.no_grad()
def extract_features(backbone: nn.Module, images, view: Callable[[torch.Tensor], torch.Tensor],
                     device: torch.device, batch_size: int = 512, workers: int = 0,
                     precision: str = "32", progress=None) -> torch.Tensor:
    """Backbone features (float32, on the CPU) of un-augmented images (``view``: the central crop
    and normalisation), in eval mode under the run's ``precision``; the module's mode is restored
    afterwards. ``images``: a tensor or folders.FolderImages (decoded by ``workers`` processes);
    ``progress(iterable, total=..., desc=...)`` may wrap the batches in a progress bar."""
    was_training = backbone.training
    backbone.eval()
    chunks = [torch.arange(i, min(i + batch_size, len(images))) for i in range(0, len(images), batch_size)]
    batches = iterate_batches(images, chunks, device, workers)
    if progress is not None:
        batches = progress(batches, total=len(chunks), desc="features", unit="batch", leave=False)
    out = [backbone_features(backbone, view(x), precision).float().cpu() for x in batches]
    backbone.train(was_training)
    return torch.cat(out)


def linear_probe_logits(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor,
                        num_classes: int) -> torch.Tensor:
    """Fit softmax regression on (train_f, train_y) and return its logits on test_f."""
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    weight = torch.zeros(num_classes, train_f.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=LINEAR_MAX_ITER,
                                  history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_f @ weight.T + bias, train_y) + LINEAR_L2 * (weight ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return test_f @ weight.T + bias


def knn_scores(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, num_classes: int,
               k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> torch.Tensor:
    """Weighted kNN class scores on cosine similarity: each of the k nearest train features votes
    for its class with weight ``exp(similarity / temperature)``."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_f))
    scores = torch.zeros(len(test_f), num_classes)
    for i in range(0, len(test_f), 1024):
        sim, idx = (test_f[i:i + 1024] @ train_f.T).topk(k, dim=1)
        scores[i:i + 1024].scatter_add_(1, train_y[idx], torch.exp(sim / temperature))
    return scores


def task_accuracies(scores: torch.Tensor, test_y: torch.Tensor, task_classes: Sequence[Sequence[int]],
                    groups: Optional[Sequence[torch.Tensor]] = None) -> Dict:
    """Accuracies (in %) from class scores: over all test images, per task over all classes
    (class-incremental) and per task among the task's classes only (task-aware). A task's test
    images are those of its classes, or ``groups[j]`` (a boolean mask per task: its domain)."""
    pred = scores.argmax(1)
    per_task, task_aware = [], []
    for j, classes in enumerate(task_classes):
        cls = torch.tensor(classes)
        mask = torch.isin(test_y, cls) if groups is None else groups[j]
        if not mask.any():
            per_task.append(float("nan"))
            task_aware.append(float("nan"))
            continue
        per_task.append(100.0 * (pred[mask] == test_y[mask]).float().mean().item())
        local = cls[scores[mask][:, cls].argmax(1)]
        task_aware.append(100.0 * (local == test_y[mask]).float().mean().item())
    return {"all": 100.0 * (pred == test_y).float().mean().item(), "per_task": per_task, "task_aware": task_aware}


def paper_linear_eval(backbone: nn.Module, train_images, train_y: torch.Tensor, test_features: torch.Tensor,
                      num_classes: int, augment, *, epochs: int, seed: int, device: torch.device,
                      workers: int = 0, precision: str = "32", progress=None) -> torch.Tensor:
    """The authors' linear evaluation (their main_linear.py with the ImageNet-100/DomainNet
    scripts); returns the logits of ``test_features`` (the central crops' features).

    The backbone stays frozen in eval mode (their ``backbone.eval()``); a ``Linear(features,
    classes)`` (PyTorch's default initialisation, drawn from a generator seeded ``seed``) is
    trained for ``epochs`` epochs over every training image, in a fresh seeded order each epoch,
    batches of 256 (the last one smaller), each image seen once per epoch through
    ``augment.linear_view`` (RandomResizedCrop 0.08-1 and a flip); cross-entropy, SGD with lr 3.0,
    no momentum and no weight decay, the learning rate times 0.1 at 60 % and 80 % of the epochs
    (config.PAPER_LINEAR_EVAL). Nothing depends on the global random state, so a rerun (a resume)
    gives the same logits.
    """
    hp = PAPER_LINEAR_EVAL
    generator = torch.Generator().manual_seed(seed)
    dim = test_features.shape[1]
    bound = 1 / math.sqrt(dim)
    weight = ((torch.rand(num_classes, dim, generator=generator) * 2 - 1) * bound).to(device).requires_grad_()
    bias = ((torch.rand(num_classes, generator=generator) * 2 - 1) * bound).to(device).requires_grad_()
    optimizer = torch.optim.SGD([weight, bias], lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    milestones = [round(m * epochs) for m in hp["milestones"]]
    was_training = backbone.training
    backbone.eval()
    labels = train_y.to(device)
    n = len(train_y)
    epoch_range = range(epochs) if progress is None else progress(range(epochs), desc="linear evaluation",
                                                                  unit="epoch", leave=False)
    for epoch in epoch_range:
        for group in optimizer.param_groups:
            group["lr"] = hp["lr"] * hp["gamma"] ** sum(epoch >= m for m in milestones)
        order = torch.randperm(n, generator=generator)
        chunks = [order[i:i + hp["batch_size"]] for i in range(0, n, hp["batch_size"])]
        for chunk, images in zip(chunks, iterate_batches(train_images, chunks, device, workers)):
            with torch.no_grad():
                features = backbone_features(backbone, augment.linear_view(images, generator), precision).float()
            loss = F.cross_entropy(features @ weight.T + bias, labels[chunk.to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    backbone.train(was_training)
    with torch.no_grad():
        return (test_features.to(device) @ weight.T + bias).cpu()


def forgetting(matrix: List[List[float]]) -> float:
    """Mean over tasks j < T-1 of ``max_{j <= l < T-1} A[l][j] - A[T-1][j]`` (0 for one task)."""
    t = len(matrix)
    if t < 2:
        return 0.0
    drops = [max(matrix[l][j] for l in range(j, t - 1)) - matrix[t - 1][j] for j in range(t - 1)]
    return sum(drops) / len(drops)


def format_table(metrics: dict) -> str:
    """A plain-text summary: the accuracy matrix and the final numbers (tasks numbered from 1)."""
    matrix = metrics["accuracy_matrix"]
    t = len(matrix)
    lines = ["linear probe accuracy (%) on each task's test images, all-class prediction",
             "after task | " + " ".join(f"task {j + 1:<3d}" for j in range(t)) + " |   all  |  kNN all"]
    for i, row in enumerate(matrix):
        lines.append(f"{i + 1:>10d} | " + " ".join(f"{a:8.2f}" for a in row)
                     + f" | {metrics['linear_accuracy'][i]:6.2f} | {metrics['knn_accuracy'][i]:7.2f}")
    lines.append(f"average accuracy (all classes, after the last task): {metrics['average_accuracy']:.2f}%  "
                 f"forgetting: {metrics['forgetting']:.2f}  kNN: {metrics['knn_average_accuracy']:.2f}% "
                 f"(forgetting {metrics['knn_forgetting']:.2f})")
    paper = metrics.get("paper_linear")
    if paper:
        lines.append(f"linear evaluation as the authors' ({paper['epochs']} epochs on augmented images): "
                     f"{paper['accuracy']:.2f}% (per task " + ", ".join(f"{a:.1f}" for a in paper["per_task"]) + ")")
    return "\n".join(lines)


# Past this many tasks the per-task curves are drawn as thin grey lines without legend entries.
PLOT_MAX_LABELLED_TASKS = 10


def save_plot(metrics: dict, path: str) -> bool:
    """The accuracy matrix as a heat map (colours scaled to the values) and the all-class and
    per-task curves, tasks numbered from 1; returns False (and writes nothing) when matplotlib is
    not installed. The file is written atomically, mode 0644 (subject to the umask)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from .checkpoint import atomic_write

    matrix = torch.tensor(metrics["accuracy_matrix"], dtype=torch.float64)
    t = matrix.shape[0]
    finite = matrix[torch.isfinite(matrix)]
    lo, hi = (finite.min().item(), finite.max().item()) if finite.numel() else (0.0, 100.0)
    if hi - lo < 1.0:  # a flat matrix: give the scale one point of range
        lo, hi = lo - 0.5, hi + 0.5
    size = min(7.5, 3.2 + 0.35 * t)
    fig, (ax_matrix, ax_curve) = plt.subplots(1, 2, figsize=(2 * size + 2.8, size),
                                              gridspec_kw={"width_ratios": [1.0, 1.15]})
    cmap = plt.get_cmap("viridis")
    image = ax_matrix.imshow(matrix.numpy(), vmin=lo, vmax=hi, cmap=cmap)
    if t <= 16:
        fontsize = 9 if t <= 6 else (7 if t <= 10 else 5.5)
        for i in range(t):
            for j in range(t):
                value = matrix[i, j].item()
                shade = (value - lo) / (hi - lo) if value == value else 0.0
                ax_matrix.text(j, i, f"{value:.1f}" if t <= 10 else f"{value:.0f}", ha="center", va="center",
                               color="black" if shade > 0.6 else "white", fontsize=fontsize)
    ticks = list(range(t)) if t <= 20 else list(range(0, t, max(1, t // 10)))
    ax_matrix.set_xticks(ticks, [str(k + 1) for k in ticks])
    ax_matrix.set_yticks(ticks, [str(k + 1) for k in ticks])
    ax_matrix.set_xlabel("evaluated on task")
    ax_matrix.set_ylabel("after training task")
    ax_matrix.set_title(f"linear accuracy (%), colours {lo:.1f} to {hi:.1f}", fontsize=10)
    fig.colorbar(image, ax=ax_matrix, fraction=0.046, pad=0.04)

    steps = list(range(1, t + 1))
    labelled = t <= PLOT_MAX_LABELLED_TASKS
    colours = plt.get_cmap("tab10") if labelled else None
    for j in range(t):  # task j's accuracy from the moment it has been trained on
        xs, ys = steps[j:], matrix[j:, j].tolist()
        if labelled:
            ax_curve.plot(xs, ys, "-", marker=".", color=colours(j % 10), alpha=0.75, linewidth=1.2,
                          label=f"task {j + 1}")
        else:
            ax_curve.plot(xs, ys, "-", color="0.6", alpha=0.5, linewidth=0.8,
                          label="each task, once trained" if j == 0 else None)
    ax_curve.plot(steps, metrics["linear_accuracy"], "k-o", linewidth=2.2, label="linear, all classes")
    ax_curve.plot(steps, metrics["knn_accuracy"], "--s", color="tab:red", linewidth=2.0, label="kNN, all classes")
    ax_curve.set_xticks(ticks and [k + 1 for k in ticks])
    ax_curve.set_xlabel("after training task")
    ax_curve.set_ylabel("accuracy (%)")
    curves = [v for v in matrix.flatten().tolist() + list(metrics["linear_accuracy"]) + list(metrics["knn_accuracy"])
              if v == v]
    if curves:
        span = max(curves) - min(curves)
        pad = max(0.5, 0.08 * span)
        ax_curve.set_ylim(max(0.0, min(curves) - pad), max(curves) + pad)
    ax_curve.grid(alpha=0.3)
    cfg = metrics["config"]
    recipe = f", {cfg['recipe']} recipe" if cfg.get("recipe", "default") != "default" else ""
    ax_curve.set_title(f"{cfg['dataset']} {cfg['method']} {cfg['strategy']} (seed {cfg['seed']}{recipe})", fontsize=10)
    ax_curve.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return True
