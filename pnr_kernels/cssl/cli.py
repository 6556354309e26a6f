"""Command line of the continual SSL trainer: ``pnr-cssl --help``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from typing import List, Optional

from .. import _cli
from ..backends import BackendUnavailableError
from .config import (BACKEND_CHOICES, DATASET_DEFAULTS, DATASETS, DEFAULT_WORKERS, DEVICES, METHODS, NUMERIC_RANGES,
                     OPTIMIZERS, PAPER_COMMON, PAPER_RECIPE, PRECISIONS, RECIPES, SPLITS, STRATEGIES, Config)
from .methods import VerificationError
from .trainer import StopRequested, train

# Measured on a 2-core machine (docs/trainer.md, "Times"): the default digits run, the native
# extension already built.
DEFAULT_RUN_TIME = "45 s on 2 CPU cores"

EXAMPLES = """\
examples:
  pnr-cssl                                                          # the default digits run, {time}
  pnr-cssl --dataset digits --method byol --strategy cassle --seed 1 --output-dir runs/byol_cassle
  pnr-cssl --dataset cifar100 --data-dir ~/data --method simclr --strategy pnr --device cuda
  pnr-cssl --dataset cifar100 --data-dir ~/data --method byol --recipe paper --device cuda  # the authors' settings
  pnr-cssl --dataset imagefolder --data-dir ~/imagenet100 --recipe paper --device cuda --precision fp16
  pnr-cssl --dataset imagefolder --data-dir ~/domainnet --split domain --recipe paper --device cuda
  pnr-cssl ... --output-dir DIR --resume                            # continue a killed run
  torchrun --nproc-per-node 2 -m pnr_kernels.cssl --output-dir DIR   # data-parallel, 2 ranks (gloo on CPU)
  pnr-cssl ... --backend triton --verify-backend triton --device cuda  # check every loss against the reference

outputs in --output-dir (mode 0644): checkpoint.pt (every --checkpoint-every epochs and after each
task), metrics.json (accuracy matrix, average accuracy, forgetting, kNN, per-epoch losses,
verification, the configuration; lists 0-based), accuracy.png. Tasks are numbered from 1 in the log
and the plot. The first run builds the native extension once (announced; `pnr-kernels build` does it
ahead). docs/trainer.md describes all of this; docs/losses.md the losses.
""".replace("{time}", DEFAULT_RUN_TIME)


def _defaults_help() -> str:
    rows = [f"{name}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for name, d in DATASET_DEFAULTS.items()]
    paper = [f"{method}: " + ", ".join(f"{k}={v}" for k, v in d.items()) for method, d in PAPER_RECIPE.items()]
    common = ", ".join(f"{k}={v}" for k, v in PAPER_COMMON.items())
    return ("per-dataset defaults of the options shown as 'dataset default' (--recipe default):\n  "
            + "\n  ".join(rows)
            + f"\n--recipe paper (the authors' CIFAR-100 scripts; docs/trainer.md): {common}, and per method\n  "
            + "\n  ".join(paper)
            + "\nimagefolder --recipe paper: their ImageNet-100 scripts (--split class/data) or DomainNet scripts "
              "(--split domain); docs/trainer.md, \"Recipes\", lists them")


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.ArgumentParser(
        prog="pnr-cssl", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continual self-supervised learning with pseudo-negative regularisation (PNR), "
                    "CaSSLe or plain fine-tuning; every loss comes from pnr_kernels with --backend.",
        epilog=_defaults_help() + "\n\n" + EXAMPLES)
    d = "(dataset default)"
    run = parser.add_argument_group("what to train")
    run.add_argument("--dataset", choices=DATASETS, default="digits",
                     help="digits: scikit-learn's 8x8 digits, no download; cifar10/cifar100: the python-pickle "
                          "release in --data-dir; imagefolder: JPEG/PNG images in --data-dir (ImageNet-100's "
                          "train/<class>/ and val/<class>/, or DomainNet's domains) (default: %(default)s)")
    run.add_argument("--data-dir", type=_cli.input_dir,
                     help="folder holding cifar-10-batches-py/ or cifar-100-python/ (CIFAR), or the image folder "
                          "(imagefolder; docs/trainer.md, \"Image folders\")")
    run.add_argument("--method", choices=METHODS, default="simclr", help="SSL method (default: %(default)s)")
    run.add_argument("--strategy", choices=STRATEGIES, default="pnr",
                     help="continual strategy from the second task on (default: %(default)s)")
    run.add_argument("--recipe", choices=RECIPES, default="default",
                     help="default: small CPU-friendly settings; paper: the authors' settings per method "
                          "(heads, LARS, warm-up + cosine, learning rates, epochs, momentum schedule, "
                          "augmentation; docs/trainer.md) of their CIFAR-100 scripts, or for imagefolder of their "
                          "ImageNet-100 (--split class/data) or DomainNet (--split domain) scripts. Options given "
                          "explicitly override the recipe (default: %(default)s)"),
    run.add_argument("--split", choices=SPLITS, default="class",
                     help="class-incremental (seeded class order), data-incremental, or domain-incremental "
                          "(imagefolder: one task per domain, DomainNet's order) (default: %(default)s)")
    run.add_argument("--image-size", type=int,
                     help="imagefolder: side of the training crops and of the evaluated central crop; images are "
                          "decoded to a square of side x 256/224 (default: 224)")
    run.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                     help="imagefolder: processes decoding images ahead of the training step (0: in the main "
                          "process); results do not depend on it (default: one per core, up to 8: %(default)s)")
    run.add_argument("--precision", choices=PRECISIONS, default="32",
                     help="autocast of the backbone (bf16, fp16: GPU only, with gradient scaling); heads and "
                          "losses stay float32 (default: %(default)s)")
    run.add_argument("--tasks", type=int, help=f"number of tasks {d}; --split domain: the number of domains")
    run.add_argument("--epochs", type=int, help=f"epochs per task {d}")
    run.add_argument("--seed", type=int, default=0, help="seed of everything random (default: %(default)s)")
    run.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                     help="pnr_kernels backend of the losses (default: %(default)s)")
    run.add_argument("--device", choices=DEVICES, default="cpu", help="(default: %(default)s)")
    run.add_argument("--threads", type=int, default=1,
                     help="CPU threads of torch; 0 keeps torch's default. 1 is fastest for the small digits "
                          "model on a shared machine; results are exact per thread count (default: %(default)s)")
    run.add_argument("--output-dir", help="where checkpoint, metrics and plot go "
                                          "(default: cssl_runs/<dataset>_<method>_<strategy>_seed<seed>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run whose checkpoint is in --output-dir (same options required)")
    run.add_argument("--verify-backend", choices=BACKEND_CHOICES,
                     help="also compute every loss with this backend and with the reference on the same inputs; "
                          "record the largest relative loss/gradient differences per epoch and stop past the "
                          "docs/losses.md (\"Precision\") tolerance")

    run.add_argument("--sync-bn", action="store_true",
                     help="under torchrun with 2+ ranks: synchronise BatchNorm statistics over the ranks "
                          "(nn.SyncBatchNorm; GPU only). Without it each rank normalises by its own batch")

    hp = parser.add_argument_group("hyper-parameters")
    hp.add_argument("--batch-size", type=int,
                    help=f"images per step and rank (each seen in two views); under torchrun the global batch is "
                         f"ranks x this, and --lr is not rescaled {d}")
    hp.add_argument("--optimizer", choices=OPTIMIZERS,
                    help=f"lars: SGD with momentum 0.9 and the clipped LARS trust ratio (eta 0.02) {d}")
    hp.add_argument("--lr", type=float, help=f"peak learning rate, cosine decay over each task {d}")
    hp.add_argument("--warmup-epochs", type=int,
                    help="linear warm-up epochs before the cosine decay, per task (default: 0; paper recipe: 10)")
    hp.add_argument("--weight-decay", type=float, help=f"{d}")
    hp.add_argument("--temperature", type=float, default=0.2,
                    help="SimCLR/MoCo temperature; SimCLR-PNR uses it for both of its terms (default: %(default)s)")
    hp.add_argument("--distill-temperature", type=float,
                    help="MoCo-PNR distillation temperature and CaSSLe's contrastive one; refused for "
                         "SimCLR-PNR, which has one temperature (docs/losses.md section 1) (default: 0.2)")
    hp.add_argument("--cassle-weight", type=float, default=1.0,
                    help="weight of CaSSLe's SimCLR/MoCo regulariser (default: %(default)s)")
    hp.add_argument("--distill-weight", type=float,
                    help="w_d of the BYOL/VICReg/Barlow regulariser (default: docs/losses.md section 4: 1, 25, 1)")
    hp.add_argument("--negative-weight", type=float,
                    help="w_n of the BYOL/VICReg/Barlow PNR regulariser (default: docs/losses.md section 4: 0.5, 23, 1)")
    hp.add_argument("--proj-hidden", type=int, help=f"projector/predictor hidden width {d}")
    hp.add_argument("--proj-dim", type=int, help=f"projection width {d}")
    hp.add_argument("--pred-hidden", type=int,
                    help="hidden width of BYOL's predictor (default: --proj-hidden; paper recipe: 4096 CIFAR, "
                         "8192 ImageNet-100/DomainNet)")
    hp.add_argument("--linear-eval-epochs", type=int,
                    help="after the last task, also train the authors' linear evaluation for this many epochs "
                         "(SGD on augmented images; metrics.json 'paper_linear'); 0: none (default: 0; paper "
                         "recipe: 100 on imagefolder)")
    hp.add_argument("--distill-hidden", type=int,
                    help="hidden width of the distillation predictor g (default: --proj-hidden; paper recipe: 2048)")
    hp.add_argument("--queue-size", type=int, help=f"MoCo queue entries per view {d}")
    hp.add_argument("--momentum-tau", type=float, help=f"EMA rate of the momentum encoder (BYOL, MoCo) {d}")
    hp.add_argument("--final-momentum-tau", type=float,
                    help="EMA rate at the end of each task, reached along a cosine (default: --momentum-tau; "
                         "paper recipe: 0.999 MoCo, 1.0 BYOL)")

    small = parser.add_argument_group("tiny runs and testing")
    small.add_argument("--max-steps-per-epoch", type=int, help="cap the steps of every epoch")
    small.add_argument("--limit-train", type=int, help="keep at most this many training images per task")
    small.add_argument("--limit-test", type=int, help="score on at most this many test images")
    small.add_argument("--limit-probe", type=int,
                       help="fit the linear probe and kNN on at most this many training images (a seeded subset)")
    small.add_argument("--stop-after-epochs", type=int,
                       help="stop (as a kill would, after a checkpoint) once this process trained N epochs")
    small.add_argument("--checkpoint-every", type=int, default=1,
                       help="write checkpoint.pt every N epochs (and after each task); a resume replays the "
                            "epochs since the last one exactly (default: %(default)s)")
    small.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bars (there are none anyway when stderr is not a terminal)")
    small.add_argument("--debug", action="store_true", help="show the traceback of an error")
    _cli.use_ranges(parser, NUMERIC_RANGES)  # every numeric option: finite and in range as it is parsed
    return parser


def _error(message: str) -> int:
    print(f"pnr-cssl: error: {message}", file=sys.stderr)
    return 2


def _interrupt(number, _frame):
    raise KeyboardInterrupt(signal.Signals(number).name)


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-option checks of the data and precision options (each value's own range is checked
    as it is parsed, NUMERIC_RANGES): one line naming the option (``parser.error``, exit status 2)
    before any work starts."""
    if args.split == "domain" and args.dataset != "imagefolder":
        parser.error(f"--split domain needs --dataset imagefolder (DomainNet-style domains), not {args.dataset}")
    if args.dataset == "imagefolder" and args.data_dir is None:
        parser.error("--dataset imagefolder needs --data-dir (nothing is downloaded)")
    if args.dataset != "imagefolder" and args.image_size is not None:
        parser.error(f"--image-size applies to --dataset imagefolder only ({args.dataset} images keep their size)")
    if args.precision == "fp16" and args.device != "cuda":
        parser.error("--precision fp16 needs --device cuda (on a CPU use bf16 or 32)")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options(parser, args)
    cfg = Config(**vars(args))
    # SIGTERM (a polite kill, a scheduler's preemption) stops the run as Ctrl-C does: exit 130,
    # the last checkpoint kept (both wait for a checkpoint write in progress: checkpoint.py).
    sigterm = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        return _train(cfg)
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def _train(cfg: Config) -> int:
    try:
        train(cfg)
    except StopRequested as stop:
        if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 says it
            print(f"pnr-cssl: {stop}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        if cfg.debug:
            raise
        _error("interrupted; continue with --resume (the last checkpoint is kept)")
        return 130
    except FloatingPointError as exc:  # divergence
        if cfg.debug:
            traceback.print_exc()
        return _error(f"training diverged: {exc}")
    except (ValueError, ImportError, OSError, VerificationError, BackendUnavailableError) as exc:
        # Expected failures whose message says what to change: bad options and data, a checkpoint
        # of another configuration or a corrupt one (ValueError), a missing extra (ImportError),
        # unusable paths (OSError), a backend off the reference or unavailable.
        if cfg.debug:
            traceback.print_exc()
        message = str(exc) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
            message = f"{message}: {exc.filename}"
        return _error(" ".join(message.split()))
    return 0


__all__ = ["main", "build_parser"]
