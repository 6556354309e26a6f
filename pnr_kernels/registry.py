"""The loss registry: one description per loss, the only table in the library that names a loss.

Everything that needs "every loss" derives it from :data:`LOSSES`: the public functions validate
and dispatch through their entry (``pnr_kernels.losses``, which registers them here: the registry
never imports it), every backend finds the composition it runs (``pnr_kernels.backends``), the
benchmark runner takes its inputs, sizes and work model from it (``pnr_kernels.bench``), and the
tests parametrise over it. Adding a loss is one entry here, its reference function, its fused
composition over an op family (``pnr_kernels/ops/``), its public function and module twin, and its
docs section: docs/adding-a-loss.md lists the steps.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import reference
from ._validation import DATA_PARALLEL_CHECKS, check_positive_number, check_weight
from .ops import infonce, regularizers

# Kinds of loss: which op family a fused backend runs them on, and how the bench sizes them.
CONTRASTIVE, QUEUE, REGULARIZER = "contrastive", "queue", "regularizer"

# Work of one forward + backward at batch ``b`` (per view), width ``d``, queue length ``k`` and
# element size ``itemsize``, in the entry's ``work_unit``.
WorkModel = Callable[[int, int, Optional[int], int], float]


@dataclass(frozen=True)
class LossSpec:
    """Everything the library knows about one loss besides its kernels and its docs.

    name: the key (``"simclr_pnr"``), used by ``backend=...`` errors, the bench and the tests.
    public: the public function's name in ``pnr_kernels`` (its signature gives the input names,
        the options and their defaults); module: the ``nn.Module`` twin's name.
    reference: the plain PyTorch statement (``pnr_kernels.reference``), the ground truth.
    family / fused: the op family (``"infonce"`` or ``"regularizers"``) and the composition over a
        backend's ops of that family, ``fused(ops, *inputs, **options)``.
    kind: CONTRASTIVE, QUEUE (MoCo: rows against (2, K, D) queues) or REGULARIZER.
    trainable: the (B, D) inputs that receive a gradient; the other (B, D) inputs and every queue
        are frozen (detached before dispatch).
    queues: the names of the (2, K, D) queue inputs.
    options: a check per keyword option (it validates and converts the user's value); the
        contrastive losses over the batch itself also take DATA_PARALLEL's options.
    example_options: option values that differ from the defaults, so that a test or a benchmark
        notices an option a backend ignores.
    work, work_unit: the work model of one forward + backward (bench throughput), or None, and
        its unit ("FLOP": the products no exact kernel can avoid, 2 per multiply-add, see
        ``ops.infonce.infonce_flops``; "byte": one read of each input, one write of each gradient).
    docs: where the mathematics is (docs/losses.md section).
    """
    name: str
    public: str
    module: str
    reference: Callable
    family: str
    fused: Callable
    kind: str
    trainable: Tuple[str, ...]
    docs: str
    queues: Tuple[str, ...] = ()
    options: Dict[str, Callable] = field(default_factory=dict)
    example_options: Dict[str, float] = field(default_factory=dict)
    work: Optional[WorkModel] = None
    work_unit: str = "FLOP"

    @property
    def function(self) -> Callable:
        """The public function (``pnr_kernels.<public>``), as ``pnr_kernels.losses`` registered it."""
        function = _PUBLIC_FUNCTIONS.get(self.public)
        if function is None:
            raise LookupError(f"the public function {self.public!r} of loss {self.name!r} is not registered: "
                              "pnr_kernels.losses registers them when it is imported (import pnr_kernels)")
        return function

    def _signature(self) -> Dict[str, inspect.Parameter]:
        """The public function's parameters, read once (a plain memo in the instance dict:
        functools.cached_property takes a lock that torch.compile cannot trace on Python 3.11)."""
        return self._memo("_parameters", lambda: dict(inspect.signature(self.function).parameters))

    def _memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per instance (the public path reads these at every call)."""
        value = self.__dict__.get(key)
        if value is None:
            value = self.__dict__[key] = compute()
        return value

    @property
    def inputs(self) -> Tuple[str, ...]:
        """Positional input names, in order: the (B, D) embeddings, then the queues."""
        return self._memo("_inputs", lambda: tuple(name for name, p in self._signature().items()
                                                   if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD))

    @property
    def embeddings(self) -> Tuple[str, ...]:
        return self._memo("_embeddings", lambda: tuple(name for name in self.inputs if name not in self.queues))

    @property
    def defaults(self) -> Dict[str, float]:
        """The options' default values, from the public signature."""
        return {name: p.default for name, p in self._signature().items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "backend"}

    @property
    def gathers(self) -> bool:
        """Whether the loss takes ``gather_distributed`` / ``process_group`` (its keys are the
        global batch under data parallelism)."""
        return "gather_distributed" in self.options

    @property
    def trainable_mask(self) -> Tuple[bool, ...]:
        """Per positional input, whether it receives a gradient."""
        return self._memo("_trainable_mask", lambda: tuple(name in self.trainable for name in self.inputs))


flops = infonce.infonce_flops


def _simclr_pnr_work(b, d, k, itemsize):
    """Rows Z, P against keys Z, F (N = 2B each, a row's own index excluded from every block); Z
    gets row and key gradients, P row gradients; Z against Z is symmetric."""
    return flops([2 * b] * 2, [2 * b] * 2, d, [True, True], [True, False], [True, True], symmetric=[(0, 0)])


def _nt_xent_work(b, d, k, itemsize):
    return flops([2 * b], [2 * b], d, [True], [True], [True], symmetric=[(0, 0)])


def _moco_pnr_work(b, d, k, itemsize):
    """Per view: rows q, p against both queues (K keys each), row gradients only."""
    return 2 * flops([b, b], [k, k], d, [True, True], [False, False])


def _moco_work(b, d, k, itemsize):
    return 2 * flops([b], [k], d, [True], [False])


def _cassle_simclr_work(b, d, k, itemsize):
    """d(P, F) and d(F, P) share their logits (F P^T is P F^T transposed), and P's gradient from
    both is one product, d P = (G_PF + G_FP^T) F: P rows against F keys, row gradients only."""
    return flops([2 * b], [2 * b], d, [True], [False])


def _barlow_pnr_work(b, d, k, itemsize):
    """The two Barlow terms (p1, f1) and (p2, f2), each the cheaper of its two exact forms (2 per
    multiply-add; f frozen): the correlation C = p^T f^ / B (D x D) and d p^ = f^ d C^T, 4 B D^2; or
    the Gram form <G_p, G_f> / B^2 = tr(p^T G_f p^) / B^2 with G_f = f^ f^T and d p^ = 2 G_f p^ / B^2
    (G_f, G_f p^ and the gradient's product), 6 B^2 D. The cosine negatives are O(B D)."""
    return 2 * min(4 * b * d * d, 6 * b * b * d)


def _paired_bytes(b, d, k, itemsize):
    """A fused BYOL/VICReg-PNR reads p1, p2, f1, f2 and writes two gradients once."""
    return 6 * b * d * itemsize


_TEMPERATURE = {"temperature": check_positive_number}
# The data-parallel options of the losses whose keys are the batch itself (docs/losses.md,
# "Data-parallel"): a loss supports ``gather_distributed`` exactly when its entry has these.
DATA_PARALLEL = DATA_PARALLEL_CHECKS
_GATHERED = {**_TEMPERATURE, **DATA_PARALLEL}
_PNR_WEIGHTS = {"distill_weight": check_weight, "negative_weight": check_weight}
_PNR_EXAMPLE = {"distill_weight": 1.3, "negative_weight": 0.7}

LOSSES: Dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec(
        "simclr_pnr", "simclr_pnr_loss", "SimCLRPNRLoss", reference.simclr_pnr_loss,
        "infonce", infonce.simclr_pnr_loss, CONTRASTIVE, trainable=("z1", "z2", "p1", "p2"),
        docs="docs/losses.md section 1", options=_GATHERED, example_options={"temperature": 0.3},
        work=_simclr_pnr_work,
    ),
    LossSpec(
        "nt_xent", "nt_xent_loss", "NTXentLoss", reference.nt_xent_loss,
        "infonce", infonce.nt_xent_loss, CONTRASTIVE, trainable=("z1", "z2"),
        docs="docs/losses.md section 2", options=_GATHERED, example_options={"temperature": 0.3},
        work=_nt_xent_work,
    ),
    LossSpec(
        "moco_pnr", "moco_pnr_loss", "MoCoPNRLoss", reference.moco_pnr_loss,
        "infonce", infonce.moco_pnr_loss, QUEUE, trainable=("q1", "q2", "p1", "p2"),
        queues=("key_queue", "prev_queue"), docs="docs/losses.md section 3",
        options={"temperature": check_positive_number, "distill_temperature": check_positive_number},
        example_options={"temperature": 0.3, "distill_temperature": 0.45},
        work=_moco_pnr_work,
    ),
    LossSpec(
        "moco", "moco_loss", "MoCoLoss", reference.moco_loss,
        "infonce", infonce.moco_loss, QUEUE, trainable=("q1", "q2"),
        queues=("key_queue",), docs="docs/losses.md section 3", options=_TEMPERATURE,
        example_options={"temperature": 0.3},
        work=_moco_work,
    ),
    LossSpec(
        "cassle_simclr", "cassle_simclr_regularizer", "CaSSLeSimCLRRegularizer",
        reference.cassle_simclr_regularizer, "infonce", infonce.cassle_simclr_regularizer, CONTRASTIVE,
        trainable=("p1", "p2"), docs="docs/losses.md section 5", options=_GATHERED,
        example_options={"temperature": 0.3},
        work=_cassle_simclr_work,
    ),
    LossSpec(
        "byol_pnr", "byol_pnr_regularizer", "BYOLPNRRegularizer", reference.byol_pnr_regularizer,
        "regularizers", regularizers.byol_pnr_regularizer, REGULARIZER, trainable=("p1", "p2"),
        docs="docs/losses.md section 4", options=_PNR_WEIGHTS, example_options=_PNR_EXAMPLE,
        work=_paired_bytes, work_unit="byte",
    ),
    LossSpec(
        "vicreg_pnr", "vicreg_pnr_regularizer", "VICRegPNRRegularizer", reference.vicreg_pnr_regularizer,
        "regularizers", regularizers.vicreg_pnr_regularizer, REGULARIZER, trainable=("p1", "p2"),
        docs="docs/losses.md section 4", options=_PNR_WEIGHTS, example_options=_PNR_EXAMPLE,
        work=_paired_bytes, work_unit="byte",
    ),
    LossSpec(
        "barlow_pnr", "barlow_pnr_regularizer", "BarlowPNRRegularizer", reference.barlow_pnr_regularizer,
        "regularizers", regularizers.barlow_pnr_regularizer, REGULARIZER, trainable=("p1", "p2"),
        docs="docs/losses.md section 4",
        options={**_PNR_WEIGHTS, "off_diagonal_weight": check_weight, "scale": check_weight},
        example_options={**_PNR_EXAMPLE, "off_diagonal_weight": 0.05, "scale": 0.2},
        work=_barlow_pnr_work,
    ),
)}


# The public functions by name. pnr_kernels.losses imports this registry to validate and dispatch,
# so the registry never imports it back: losses registers its functions here when it is imported,
# which importing any pnr_kernels module does first (the package's __init__ imports losses).
_PUBLIC_FUNCTIONS: Dict[str, Callable] = {}


def register_public_functions(namespace: Dict[str, object]) -> None:
    """Record every entry's public function from ``namespace`` (``pnr_kernels.losses``'s globals);
    an entry whose function is missing there is a KeyError naming it."""
    missing = [spec.public for spec in LOSSES.values() if not callable(namespace.get(spec.public))]
    if missing:
        raise KeyError(f"no public function named {', '.join(missing)} to register")
    _PUBLIC_FUNCTIONS.update({spec.public: namespace[spec.public] for spec in LOSSES.values()})


def spec_of(public: str) -> LossSpec:
    """The entry of the loss whose public function is named ``public`` (``"simclr_pnr_loss"``)."""
    for spec in LOSSES.values():
        if spec.public == public:
            return spec
    raise KeyError(f"no registered loss has the public function {public!r}")


def make_inputs(loss: str, batch: int, dim: int, dtype: torch.dtype, *, device="cpu",
                requires_grad: bool = False, queue_size: int = 5, options: Optional[dict] = None):
    """Positional inputs and keyword options for ``loss``: random (B, D) embeddings (only the
    trainable ones require a gradient, when ``requires_grad``; for the regularisers with
    non-zero column means and each f close to its p), and (2, K, D) queues of unit rows laid out
    as transposed views of (2, D, K) buffers (strided rows, as a trainer keeps them). The options
    are the entry's ``example_options`` updated with ``options``."""
    spec = LOSSES[loss]
    values = {}
    for name in spec.inputs:
        if name in spec.queues:
            buffer = F.normalize(torch.randn(2, dim, queue_size, device=device), dim=1)
            values[name] = buffer.to(dtype).transpose(1, 2)
        else:
            values[name] = torch.randn(batch, dim, dtype=torch.float64, device=device)
    if spec.kind == REGULARIZER:
        # non-zero column means (Barlow's standardisation matters) and f close to p of its view
        # (cosines and differences of realistic size, not of independent noise)
        values = {name: 1.5 * x + 0.3 for name, x in values.items()}
        values["f1"] = 0.8 * values["p1"] + 0.6 * values["f1"]
        values["f2"] = 0.8 * values["p2"] + 0.6 * values["f2"]
    args = [x if name in spec.queues else x.to(dtype).requires_grad_(requires_grad and name in spec.trainable)
            for name, x in values.items()]
    return args, {**spec.example_options, **(options or {})}
