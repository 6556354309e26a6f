"""pnr-cssl on image folders: the ImageNet-100 layout (class split), DomainNet domains (domain split,
folders and lists), the authors' recipes for both, their linear evaluation, --precision, an exact
resume after a kill, and the loader's one-line errors. Tiny generated PNGs (8x8 crops)."""
import json
import os

import numpy as np
import pytest
import torch

Image = pytest.importorskip("PIL.Image")

from pnr_kernels.cssl import cli  # noqa: E402
from pnr_kernels.cssl.config import Config, resolve  # noqa: E402
from pnr_kernels.cssl.data import gaussian_blur  # noqa: E402
from pnr_kernels.cssl.folders import DOMAINNET_ORDER, decode, scan_folder  # noqa: E402
from pnr_kernels.cssl.trainer import Trainer, train  # noqa: E402

TINY = ["--image-size", "8", "--epochs", "1", "--batch-size", "4", "--proj-hidden", "16", "--proj-dim", "8",
        "--distill-hidden", "16", "--workers", "0", "--no-progress", "--lr", "0.05"]


def _png(path, rng, label, size=(10, 12)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = (rng.random((*size, 3)) * 60 + 60 * label).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def class_folder(root, classes=4, train=4, val=2):
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            for i in range(count):
                _png(os.path.join(root, split, f"class{c}", f"{i}.png"), rng, c)
    return str(root)


def domain_folder(root, domains=("sketch", "clipart", "real"), classes=2, images=5):
    rng = np.random.default_rng(1)
    for d in domains:
        for c in range(classes):
            for i in range(images):
                _png(os.path.join(root, d, f"class{c}", f"{i}.png"), rng, c, size=(9, 11))
    return str(root)


def assert_one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pnr-cssl: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err


def test_class_split_with_the_paper_recipe(tmp_path):
    data = class_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = ["--dataset", "imagefolder", "--data-dir", data, "--recipe", "paper", "--tasks", "2",
            "--linear-eval-epochs", "2", "--output-dir", str(out)] + TINY
    assert cli.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    cfg = metrics["config"]
    # Their ImageNet-100 SimCLR script where not overridden: LARS, 10 warm-up epochs, 2048-wide g
    # overridden to 16 here, 224 overridden to 8, fp32 by default.
    assert (cfg["optimizer"], cfg["warmup_epochs"], cfg["image_size"], cfg["precision"]) == ("lars", 10, 8, "32")
    assert sorted(c for t in metrics["tasks"] for c in t["classes"]) == [0, 1, 2, 3]
    assert [t["train_images"] for t in metrics["tasks"]] == [8, 8]
    assert len(metrics["accuracy_matrix"]) == 2 and metrics["domains"] is None
    paper = metrics["paper_linear"]
    assert paper["epochs"] == 2 and paper["train_images"] == 16 and len(paper["per_task"]) == 2
    assert 0 <= paper["accuracy"] <= 100


def test_recipe_per_benchmark_and_split():
    def paper(**kw):
        return resolve(Config(recipe="paper", dataset="imagefolder", **kw))

    assert (paper(method="simclr").lr, paper(method="simclr").epochs) == (0.4, 400)
    byol = paper(method="byol")
    assert (byol.lr, byol.weight_decay, byol.pred_hidden, byol.negative_weight) == (0.6, 1e-5, 8192, 1.0)
    assert paper(method="byol", split="data").negative_weight == 0.1
    assert paper(method="vicreg", split="data").negative_weight == 5.0
    domain = paper(method="vicreg", split="domain")
    assert (domain.epochs, domain.negative_weight, domain.tasks, domain.linear_eval_epochs) == (200, 8.0, None, 100)
    assert paper(method="mocov2plus").lars_exclude_bias_norm is False
    cifar = resolve(Config(recipe="paper", dataset="cifar100", method="byol"))
    assert (cifar.lr, cifar.pred_hidden, cifar.negative_weight, cifar.linear_eval_epochs) == (1.0, 4096, 0.5, 0)
    with pytest.raises(ValueError, match="split 'domain' needs"):
        resolve(Config(split="domain"))


def test_domain_split_one_task_per_domain_in_the_authors_order(tmp_path):
    data = domain_folder(tmp_path / "dn")
    out = tmp_path / "out"
    assert cli.main(["--dataset", "imagefolder", "--data-dir", data, "--split", "domain", "--recipe", "paper",
                     "--linear-eval-epochs", "1", "--output-dir", str(out)] + TINY) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["domains"] == ["real", "sketch", "clipart"]
    assert metrics["domains"] == [d for d in DOMAINNET_ORDER if d in metrics["domains"]]
    assert metrics["config"]["tasks"] == 3
    # 5 images per (domain, class): 1 held out, 4 trained on; both classes in every domain.
    assert [(t["classes"], t["train_images"]) for t in metrics["tasks"]] == [([0, 1], 8)] * 3
    assert len(metrics["accuracy_matrix"]) == 3 and all(len(row) == 3 for row in metrics["accuracy_matrix"])
    assert len(metrics["paper_linear"]["per_task"]) == 3
    found = scan_folder(data, "domain")
    assert len(found.test.paths) == 6 and not set(found.test.paths) & set(found.train.paths)
    assert found.test.domains == [0, 0, 1, 1, 2, 2]


def test_domainnet_lists_and_a_missing_file_skipped(tmp_path):
    root = tmp_path / "dn"
    domain_folder(root, domains=("quickdraw", "real"), images=3)
    for d in ("quickdraw", "real"):
        for split, index in (("train", [0, 1]), ("test", [2])):
            lines = [f"{d}/class{c}/{i}.png {c}" for c in range(2) for i in index]
            if d == "real" and split == "train":
                lines.append("real/class0/missing.png 0")
            (root / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")
    found = scan_folder(str(root), "domain")
    assert found.domains == ["real", "quickdraw"] and len(found.classes) == 2
    assert len(found.train.paths) == 8 and len(found.test.paths) == 4
    assert [os.path.basename(p) for p in found.train.skipped] == ["missing.png"]
    (root / "real_test.txt").write_text("real/class0/2.png zero\n")
    with pytest.raises(ValueError, match="real_test.txt line 1"):
        scan_folder(str(root), "domain")


class Killed(Exception):
    pass


def test_resume_after_a_kill_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """Killed inside task 2 while worker processes decode (after the checkpoint of task 1), then
    resumed with another number of workers: metrics.json is byte for byte the uninterrupted one."""
    data = domain_folder(tmp_path / "dn", domains=("real", "sketch"))

    def cfg(out, **kw):
        return Config(dataset="imagefolder", data_dir=data, split="domain", image_size=8, epochs=2, batch_size=4,
                      proj_hidden=16, proj_dim=8, lr=0.05, progress=False, output_dir=str(out), linear_eval_epochs=1,
                      **kw)

    train(cfg(tmp_path / "full", workers=0), log=lambda m: None)
    original = Trainer._train_epoch

    def killed(self, task, epoch):
        if task == 1 and epoch == 1:
            raise Killed()
        return original(self, task, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", killed)
    with pytest.raises(Killed):
        train(cfg(tmp_path / "broken", workers=2), log=lambda m: None)
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    train(cfg(tmp_path / "broken", workers=1, resume=True), log=lambda m: None)
    assert (tmp_path / "broken" / "metrics.json").read_bytes() == (tmp_path / "full" / "metrics.json").read_bytes()


def test_bad_folders_are_one_line_errors(tmp_path, capsys):
    base = ["--dataset", "imagefolder", "--output-dir", str(tmp_path / "out")] + TINY

    def run(data):
        return cli.main(base + ["--data-dir", str(data)])

    data = tmp_path / "a"
    class_folder(data)
    for png in (data / "val").rglob("*.png"):
        png.unlink()
    for folder in (data / "val").iterdir():
        folder.rmdir()
    (data / "val").rmdir()
    assert_one_line_error(capsys, run(data), str(data / "val"), "is missing")
    class_folder(tmp_path / "b")
    os.makedirs(tmp_path / "b" / "train" / "empty")
    assert_one_line_error(capsys, run(tmp_path / "b"), str(tmp_path / "b" / "train" / "empty"), "holds no images")
    class_folder(tmp_path / "c")
    for png in (tmp_path / "c" / "train" / "class1").glob("*.png"):
        png.write_bytes(b"not a png")
    assert_one_line_error(capsys, run(tmp_path / "c"), "no readable image", str(tmp_path / "c" / "train" / "class1"))


def test_unreadable_images_are_skipped_or_named(tmp_path, capsys):
    data = tmp_path / "d"
    class_folder(data, train=5)
    (data / "train" / "class0" / "0.png").write_bytes(b"garbage")
    out = tmp_path / "out"
    args = ["--dataset", "imagefolder", "--data-dir", str(data), "--tasks", "2", "--output-dir", str(out)] + TINY
    assert cli.main(args) == 0
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["skipped_images"] == 1
    # A header that reads but pixels that do not: the run stops naming the file.
    good = (data / "train" / "class2" / "1.png").read_bytes()
    (data / "train" / "class2" / "1.png").write_bytes(good[:60])
    assert_one_line_error(capsys, cli.main(args[:-len(TINY)] + ["--output-dir", str(tmp_path / "o2")] + TINY),
                          "cannot decode", str(data / "train" / "class2" / "1.png"))


@pytest.mark.parametrize("args,needle", [
    (["--split", "domain"], "--split domain needs --dataset imagefolder"),
    (["--dataset", "imagefolder"], "--dataset imagefolder needs --data-dir"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent/pnr"], "argument --data-dir: /nonexistent/pnr does not exist"),
    (["--image-size", "32"], "--image-size applies to --dataset imagefolder only"),
    (["--precision", "fp16"], "--precision fp16 needs --device cuda"),
    (["--workers", "-1"], "argument --workers: must be an integer >= 0"),
    (["--linear-eval-epochs", "-2"], "argument --linear-eval-epochs: must be an integer >= 0"),
    (["--precision", "16"], "argument --precision: invalid choice"),
])
def test_option_checks_before_any_work(args, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args + ["--output-dir", str(tmp_path / "never")])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "never").exists()


def test_bf16_autocast_of_the_backbone_on_cpu(tmp_path):
    pytest.importorskip("sklearn")
    common = dict(tasks=2, epochs=1, batch_size=8, limit_train=16, max_steps_per_epoch=2, limit_test=40,
                  limit_probe=60, proj_hidden=16, proj_dim=8, progress=False)
    full = train(Config(output_dir=str(tmp_path / "32"), **common), log=lambda m: None)
    half = train(Config(output_dir=str(tmp_path / "bf16"), precision="bf16", **common), log=lambda m: None)
    assert half["config"]["precision"] == "bf16"
    losses = [e["mean_loss"] for e in half["epochs"]]
    assert all(np.isfinite(losses)) and losses != [e["mean_loss"] for e in full["epochs"]]


def test_decode_and_blur(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, 5:15] = 200  # the central 10x10 square is bright, the sides dark
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    square = decode(str(tmp_path / "wide.png"), 10)
    assert square.shape == (3, 10, 10) and square.dtype == torch.uint8 and square.min() == 200
    with pytest.raises(ValueError, match="cannot decode /nonexistent"):
        decode("/nonexistent", 8)
    x = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    flat = torch.full((2, 3, 9, 9), 0.25)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.5, 2.0]), 5), flat)
    blurred = gaussian_blur(x, torch.tensor([0.1, 1.0, 2.0]), 7)
    assert torch.allclose(blurred[0], x[0], atol=1e-6)  # sigma 0.1: the kernel is a point
    assert blurred[2].std() < blurred[1].std() < x[1].std()


def test_fp16_gradient_scaling_and_its_exact_resume(tmp_path, monkeypatch):
    """The fp16 path (autocast + GradScaler, unscaled before LARS) on a CPU, where the option
    check that keeps fp16 to GPUs is bypassed: a stopped and resumed run (the scaler's state in the
    checkpoint) ends with the uninterrupted run's losses and accuracies."""
    pytest.importorskip("sklearn")
    import dataclasses

    from pnr_kernels.cssl import config, trainer

    def resolve_fp16_on_cpu(cfg):
        out = config.resolve(dataclasses.replace(cfg, precision="32"))
        return dataclasses.replace(out, precision=cfg.precision)

    monkeypatch.setattr(trainer, "resolve", resolve_fp16_on_cpu)
    common = dict(tasks=2, epochs=2, batch_size=8, limit_train=16, max_steps_per_epoch=2, limit_test=40,
                  limit_probe=60, proj_hidden=16, proj_dim=8, progress=False, method="byol", recipe="paper",
                  precision="fp16")
    full = train(Config(output_dir=str(tmp_path / "full"), **common), log=lambda m: None)
    with pytest.raises(trainer.StopRequested):
        train(Config(output_dir=str(tmp_path / "cut"), stop_after_epochs=3, **common), log=lambda m: None)
    resumed = train(Config(output_dir=str(tmp_path / "cut"), resume=True, **common), log=lambda m: None)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["scaler"]["scale"] > 0
    assert [e["mean_loss"] for e in resumed["epochs"]] == [e["mean_loss"] for e in full["epochs"]]
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
