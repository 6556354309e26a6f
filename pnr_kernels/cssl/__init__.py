"""The reference continual self-supervised trainer (``pnr-cssl``, ``python -m pnr_kernels.cssl``).

It trains SimCLR, MoCo v2+, BYOL, VICReg or Barlow Twins over a sequence of tasks with the
fine-tuning, CaSSLe or PNR strategy, taking every loss from pnr_kernels' public API with the
chosen backend, and scores the frozen features after each task (linear probe and kNN). Needs the
``train`` extra (scikit-learn for the digits data, tqdm, matplotlib) for the full experience.
"""
from .config import Config
from .trainer import Trainer, train

__all__ = ["Config", "Trainer", "train"]
