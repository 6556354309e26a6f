"""Unit tests of the trainer's parts: CIFAR reader, task splits, augmentation, MoCo InfoNCE,
forgetting, checkpoint RNG round trip."""
import pickle
import random
import sys

import numpy as np
import pytest
import torch

from pnr_kernels.cssl.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pnr_kernels.cssl.config import Config
from pnr_kernels.cssl.data import ImageData, TwoViewAugment, load_cifar_data, load_digits_data, make_tasks
from pnr_kernels.cssl.evaluation import forgetting, knn_scores, task_accuracies
from pnr_kernels.cssl.trainer import train

from .fake_cifar import write_fake_cifar10


def test_cifar_pickle_reader(tmp_path):
    folder = write_fake_cifar10(tmp_path)
    for data_dir in (tmp_path, folder):  # the parent or the extracted folder itself
        data = load_cifar_data("cifar10", str(data_dir))
        assert data.train_x.shape == (30, 3, 32, 32) and data.test_x.shape == (10, 3, 32, 32)
        assert data.train_x.dtype == torch.float32 and 0 <= data.train_x.min() and data.train_x.max() <= 1
        assert data.num_classes == 10 and data.train_y.shape == (30,)
    with open(folder / "data_batch_1", "rb") as handle:
        first = pickle.load(handle)
    expected = torch.tensor(first[b"data"][0].reshape(3, 32, 32), dtype=torch.float32) / 255
    assert torch.equal(data.train_x[0], expected)
    assert data.train_y[:6].tolist() == first[b"labels"]
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_3"):
        load_cifar_data("cifar10", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        load_cifar_data("cifar100", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="needs --data-dir"):
        load_cifar_data("cifar10", None)


def test_tiny_cifar_run_with_resnet18(tmp_path):
    write_fake_cifar10(tmp_path / "data", per_batch=2, test=4)
    cfg = Config(dataset="cifar10", data_dir=str(tmp_path / "data"), method="simclr", strategy="pnr", tasks=2,
                 epochs=1, batch_size=2, max_steps_per_epoch=1, proj_hidden=32, proj_dim=16, progress=False,
                 output_dir=str(tmp_path / "run"))
    metrics = train(cfg, log=lambda m: None)
    assert len(metrics["accuracy_matrix"]) == 2 and sum(t["train_images"] for t in metrics["tasks"]) == 10


def test_class_and_data_splits():
    labels = torch.arange(100) % 10
    tasks = make_tasks(labels, 10, 3, "class", seed=5)
    classes = sorted(c for t in tasks for c in t.classes)
    assert classes == list(range(10)) and [len(t.classes) for t in tasks] == [4, 3, 3]
    for t in tasks:
        assert set(labels[t.train_indices].tolist()) == set(t.classes)
    assert sum(len(t.train_indices) for t in tasks) == 100
    assert [t.classes for t in make_tasks(labels, 10, 3, "class", seed=5)] == [t.classes for t in tasks]
    assert [t.classes for t in make_tasks(labels, 10, 3, "class", seed=6)] != [t.classes for t in tasks]
    data = make_tasks(labels, 10, 4, "data", seed=0)
    assert sorted(torch.cat([t.train_indices for t in data]).tolist()) == list(range(100))
    limited = make_tasks(labels, 10, 2, "class", seed=0, limit=7)
    assert all(len(t.train_indices) == 7 for t in limited)
    with pytest.raises(ValueError, match="cannot exceed"):
        make_tasks(labels, 10, 11, "class", seed=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_augmentation_is_random_per_image_and_reproducible(channels):
    x = torch.rand(6, channels, 16, 16)
    data = ImageData(x, torch.zeros(6, dtype=torch.long), x, torch.zeros(6, dtype=torch.long), 2,
                     (0.5,) * channels, (0.25,) * channels)
    aug = TwoViewAugment.for_dataset("digits" if channels == 1 else "cifar10", data)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.allclose(a[0], a[1])


def test_forgetting_and_accuracies():
    assert forgetting([[50.0]]) == 0.0
    # task 0 peaks at 80 (after task 1) and ends at 60; task 1 ends where it peaked
    assert forgetting([[70.0, 10.0, 0.0], [80.0, 50.0, 0.0], [60.0, 50.0, 90.0]]) == pytest.approx(10.0)
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.0, 0.4]])
    acc = task_accuracies(scores, torch.tensor([0, 1, 2]), [[0, 1], [2]])
    assert acc["all"] == pytest.approx(200 / 3) and acc["per_task"] == [100.0, 0.0] and acc["task_aware"] == [100.0, 100.0]
    train_f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert knn_scores(train_f, torch.tensor([0, 1]), torch.tensor([[0.9, 0.1]]), 2, k=1).argmax().item() == 0


def test_checkpoint_round_trip_restores_every_generator(tmp_path):
    gens = {"data": torch.Generator().manual_seed(1)}
    state = rng_state(gens)
    path = str(tmp_path / "ck.pt")
    save_checkpoint(path, {"rng": state})
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gens["data"]).item())
    set_rng_state(load_checkpoint(path)["rng"], gens)
    again = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gens["data"]).item())
    assert first == again
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pnr-kernels\[train\]"):
        load_digits_data()
