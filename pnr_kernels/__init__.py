"""pnr_kernels: exact, fused losses for continual self-supervised learning with Pseudo-Negative
Regularization (PNR, Cha et al., ICML 2024). See docs/losses.md for the mathematics."""
from .backends import BACKENDS, BackendUnavailableError, available_backends
from .losses import (
    barlow_pnr_regularizer,
    barlow_twins_loss,
    byol_loss,
    byol_pnr_regularizer,
    cassle_simclr_regularizer,
    moco_loss,
    moco_pnr_loss,
    multi_key_infonce,
    nt_xent_loss,
    simclr_pnr_loss,
    vicreg_loss,
    vicreg_pnr_regularizer,
)
from .queue import PNRQueue
from .modules import (
    BarlowPNRRegularizer,
    BarlowTwinsLoss,
    BYOLLoss,
    BYOLPNRRegularizer,
    CaSSLeSimCLRRegularizer,
    MoCoLoss,
    MoCoPNRLoss,
    NTXentLoss,
    SimCLRPNRLoss,
    VICRegLoss,
    VICRegPNRRegularizer,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BYOLLoss",
    "BYOLPNRRegularizer",
    "BackendUnavailableError",
    "BarlowPNRRegularizer",
    "BarlowTwinsLoss",
    "CaSSLeSimCLRRegularizer",
    "MoCoLoss",
    "MoCoPNRLoss",
    "NTXentLoss",
    "PNRQueue",
    "SimCLRPNRLoss",
    "VICRegLoss",
    "VICRegPNRRegularizer",
    "available_backends",
    "barlow_pnr_regularizer",
    "barlow_twins_loss",
    "byol_loss",
    "byol_pnr_regularizer",
    "cassle_simclr_regularizer",
    "moco_loss",
    "moco_pnr_loss",
    "multi_key_infonce",
    "nt_xent_loss",
    "simclr_pnr_loss",
    "vicreg_loss",
    "vicreg_pnr_regularizer",
]
