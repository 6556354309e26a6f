"""--recipe paper (the authors' CIFAR settings) and what every recipe now shares with the authors'
code: MoCo's g on the normalised query, g and the previous-model queue carried over."""
import colorsys
import math

import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from pnr_kernels.cssl.config import PAPER_RECIPE, Config, resolve  # noqa: E402
from pnr_kernels.cssl.data import ImageData, PaperAugment, make_augment, shift_hue  # noqa: E402
from pnr_kernels.cssl.methods import Learner, LossRunner  # noqa: E402
from pnr_kernels.cssl.trainer import Trainer, lars_adapt_  # noqa: E402

from .fake_cifar import write_fake_cifar10  # noqa: E402


def linears(module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def batch_norms(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm1d)]


@pytest.mark.parametrize("method", list(PAPER_RECIPE))
def test_paper_recipe_tiny_run(tmp_path, method):
    """Each method trains two tasks with the paper recipe's heads, optimiser and schedule (on
    digits: small and quick); options given explicitly (epochs, sizes) override the recipe."""
    cfg = Config(method=method, strategy="pnr", recipe="paper", tasks=2, epochs=2, batch_size=8, limit_train=16,
                 max_steps_per_epoch=2, queue_size=16, limit_test=40, limit_probe=60, progress=False,
                 output_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg, log=lambda m: None)
    resolved, paper = trainer.cfg, PAPER_RECIPE[method]
    assert (resolved.optimizer, resolved.lr, resolved.weight_decay, resolved.warmup_epochs) == \
        ("lars", paper["lr"], paper["weight_decay"], 10)
    assert (resolved.epochs, resolved.proj_hidden, resolved.proj_dim) == (2, paper["proj_hidden"], paper["proj_dim"])
    assert resolved.distill_hidden == 2048 and resolved.batch_size == 8
    projector = trainer.learner.online.projector
    if method in ("simclr", "mocov2plus"):
        assert len(linears(projector)) == 2 and not batch_norms(projector) and resolved.proj_dim == 128
    elif method in ("vicreg", "barlow"):
        assert len(linears(projector)) == 3 and len(batch_norms(projector)) == 2
    else:
        assert (linears(projector)[0].out_features, resolved.proj_dim) == (4096, 256)
        assert linears(trainer.learner.predictor)[0].out_features == 4096
        assert resolved.final_momentum_tau == 1.0
    if method == "mocov2plus":
        assert (resolved.momentum_tau, resolved.final_momentum_tau) == (0.99, 0.999)
        assert not resolved.lars_exclude_bias_norm
    metrics = trainer.run()
    assert len(metrics["accuracy_matrix"]) == 2 and metrics["config"]["recipe"] == "paper"
    assert all(math.isfinite(e["mean_loss"]) for e in metrics["epochs"])


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_paper_recipe_tiny_cifar_run(tmp_path, method):
    """The same on a tiny fake CIFAR-10: ResNet-18 with the authors' augmentation."""
    write_fake_cifar10(tmp_path / "data", per_batch=4, test=4)
    cfg = Config(dataset="cifar10", data_dir=str(tmp_path / "data"), method=method, strategy="pnr", recipe="paper",
                 tasks=2, epochs=2, batch_size=4, max_steps_per_epoch=1, limit_probe=6, progress=False,
                 output_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg, log=lambda m: None)
    assert isinstance(trainer.augment, PaperAugment)
    metrics = trainer.run()
    assert len(metrics["accuracy_matrix"]) == 2
    assert all(math.isfinite(e["mean_loss"]) for e in metrics["epochs"])


def test_paper_schedule_and_momentum():
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = resolve(Config(method="byol", recipe="paper", epochs=20))
    steps_per_epoch, total = 5, 100
    lr0, tau0 = trainer._schedule(0, total)
    assert lr0 == pytest.approx(0.003) and tau0 == pytest.approx(0.99)
    assert trainer._schedule(25, total)[0] == pytest.approx(0.003 + (1.0 - 0.003) * 25 / 50)
    assert trainer._schedule(10 * steps_per_epoch, total)[0] == pytest.approx(1.0)  # warm-up done: the peak
    assert trainer._schedule(75, total)[0] == pytest.approx(0.5)  # half-way through the cosine
    assert trainer._schedule(99, total)[1] == pytest.approx(1.0, abs=1e-3)
    default = Trainer.__new__(Trainer)
    default.cfg = resolve(Config(epochs=4))
    assert default._schedule(0, 40) == (default.cfg.lr, 0.99)  # no warm-up, constant tau


def test_lars_trust_ratio_and_exclusions():
    weight = nn.Parameter(torch.full((2, 2), 3.0))  # |w| = 6
    bias = nn.Parameter(torch.ones(2))
    weight.grad, bias.grad = torch.full((2, 2), 0.5), torch.full((2,), 0.25)  # |g| = 1
    lars_adapt_([weight, bias], lr=0.5, weight_decay=0.1, eta=0.02, exclude_bias_norm=True)
    ratio = min(0.02 * 6 / (1 + 6 * 0.1 + 1e-8) / 0.5, 1.0)
    assert torch.allclose(weight.grad, (0.5 + 0.1 * 3.0) * ratio * torch.ones(2, 2))
    assert torch.equal(bias.grad, torch.full((2,), 0.25))  # excluded: no trust ratio, no weight decay
    bias.grad = torch.full((2,), 0.25)
    lars_adapt_([bias], lr=0.5, weight_decay=0.1, eta=0.02, exclude_bias_norm=False)
    assert not torch.equal(bias.grad, torch.full((2,), 0.25))


def test_hue_shift_matches_colorsys():
    x = torch.rand(3, 3, 4, 4)
    shift = torch.tensor([0.1, -0.05, 0.3])
    out = shift_hue(x, shift)
    for b in range(3):
        r, g, bl = x[b, :, 1, 2].tolist()
        h, s, v = colorsys.rgb_to_hsv(r, g, bl)
        expected = colorsys.hsv_to_rgb((h + shift[b].item()) % 1.0, s, v)
        assert torch.allclose(out[b, :, 1, 2], torch.tensor(expected), atol=1e-5)


def test_paper_augmentation_is_asymmetric_and_reproducible():
    x = torch.rand(64, 3, 8, 8)
    data = ImageData(x, torch.zeros(64, dtype=torch.long), x, torch.zeros(64, dtype=torch.long), 10,
                     (0.5,) * 3, (0.25,) * 3)
    aug = make_augment("paper", "simclr", "cifar10", data)
    assert aug.solarize == (0.0, 0.2) and aug.min_scale == 0.08
    assert make_augment("paper", "vicreg", "cifar100", data).min_scale == 0.2
    assert torch.allclose(aug.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))
    a, b = aug(x, torch.Generator().manual_seed(1), view=1), aug(x, torch.Generator().manual_seed(1), view=1)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    always = PaperAugment(data, min_scale=1.0, jitter=(0, 0, 0, 0), solarize=(0.0, 1.0))
    plain = always(x, torch.Generator().manual_seed(3), view=0) * always.std + always.mean
    solar = always(x, torch.Generator().manual_seed(3), view=1) * always.std + always.mean
    assert (plain >= 0.5).any() and (solar < 0.5 + 1e-6).all()  # view 1: every pixel above 1/2 solarised


def test_moco_distillation_predictor_takes_the_normalised_query():
    cfg = resolve(Config(method="mocov2plus", strategy="pnr", proj_hidden=32, proj_dim=16, queue_size=8))
    learner = Learner(cfg, 1)
    frozen = Learner(cfg, 1).online.eval()
    seen = []
    learner.distill_predictor.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x = torch.rand(4, 1, 16, 16)
    learner.loss(x, x.flip(-1), frozen, LossRunner("reference"))
    assert len(seen) == 2 and all(torch.allclose(s.norm(dim=1), torch.ones(4), atol=1e-5) for s in seen)


def test_g_and_the_previous_model_queue_carry_over_between_tasks(tmp_path):
    """MoCo-PNR over three tasks: nothing of g or the previous-model queue changes when a task
    starts; g trains from the second task on; the queue keeps the second task's frozen outputs."""
    cfg = Config(method="mocov2plus", strategy="pnr", tasks=3, epochs=1, batch_size=8, limit_train=16,
                 max_steps_per_epoch=2, limit_test=40, limit_probe=60, proj_hidden=32, proj_dim=16, queue_size=64,
                 progress=False, output_dir=str(tmp_path))
    trainer = Trainer(cfg, log=lambda m: None)
    snapshots = []
    original = trainer._start_task

    def start(task):
        before = ({k: v.clone() for k, v in trainer.learner.distill_predictor.state_dict().items()},
                  trainer.learner.prev_queue.clone(), trainer.learner.queue_pointers.clone())
        original(task)
        after = ({k: v.clone() for k, v in trainer.learner.distill_predictor.state_dict().items()},
                 trainer.learner.prev_queue.clone(), trainer.learner.queue_pointers.clone())
        snapshots.append((task, before, after))

    trainer._start_task = start
    trainer.run()
    for task, before, after in snapshots:
        assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]), task
        assert torch.equal(before[1], after[1]) and torch.equal(before[2], after[2]), task
    g1, g2 = snapshots[1][2][0], snapshots[2][2][0]  # g when tasks 2 and 3 start
    assert any(not torch.equal(g1[k], g2[k]) for k in g1 if k.endswith("weight"))  # trained in task 2
    queue_at_task_3 = snapshots[2][2][1]
    assert int(snapshots[2][2][2][1]) == 2 * 8  # two steps of 8 frozen outputs were enqueued in task 2
    assert not torch.equal(queue_at_task_3[:, :16], snapshots[1][2][1][:, :16])
