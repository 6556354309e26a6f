"""Input factories shared by the test files."""
import torch
import torch.nn.functional as F

# Arguments each loss takes besides its embeddings, and how many (B, D) embeddings it takes.
LOSS_ARITY = {
    "simclr_pnr": 6, "nt_xent": 2, "moco_pnr": 8, "cassle_simclr": 4,
    "byol_pnr": 4, "vicreg_pnr": 4, "barlow_pnr": 4,
}
# Which of the embeddings are trainable (the rest are frozen: f*, k*).
TRAINABLE = {
    "simclr_pnr": [True, True, True, True, False, False],
    "nt_xent": [True, True],
    "moco_pnr": [True, True, False, False, True, True, False, False],
    "cassle_simclr": [True, True, False, False],
    "byol_pnr": [True, True, False, False],
    "vicreg_pnr": [True, True, False, False],
    "barlow_pnr": [True, True, False, False],
}


def make_inputs(loss, batch, dim, dtype, *, requires_grad=False, queue_size=5, device="cpu",
                temperature=0.2):
    """Positional arguments and keyword arguments for ``reference.LOSSES[loss]`` (and the public
    function of the same loss), with the frozen inputs never requiring a gradient."""
    args = [
        torch.randn(batch, dim, dtype=dtype, device=device).requires_grad_(requires_grad and trainable)
        for trainable in TRAINABLE[loss]
    ]
    kwargs = {}
    if loss == "moco_pnr":
        # (2, K, D) views of (2, D, K) buffers: the queues' rows are strided, as in a real trainer.
        for name in ("key_queue", "prev_queue"):
            buffer = F.normalize(torch.randn(2, dim, queue_size, dtype=torch.float64), dim=1)
            args.append(buffer.to(dtype=dtype, device=device).transpose(1, 2))
        kwargs = dict(temperature=temperature, distill_temperature=temperature * 1.5)
    elif loss in ("simclr_pnr", "nt_xent", "cassle_simclr"):
        kwargs = dict(temperature=temperature)
    return args, kwargs
