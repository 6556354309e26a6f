"""What the Triton kernel modules share (pnr_kernels/triton/common.py): every launch runs under a
guard that makes the tensors' GPU the current device, whichever family launches it."""
import pytest
import torch
import triton

from pnr_kernels.triton import common, interpreting
from pnr_kernels.triton import infonce as triton_infonce
from pnr_kernels.triton import regularizers as triton_regularizers

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():  # pragma: no cover - misconfigured run
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)


def test_the_guard_selects_the_tensors_gpu():
    """A tensor on cuda:1 while cuda:0 is current: the guard is torch.cuda.device(1). (Constructed
    only: entering it needs that GPU.)"""
    guard = common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with common.device_guard(torch.device("cpu")):  # the interpreter's CPU tensors: nothing to do
        pass


class _GuardRecorder:
    """Stands in for common.device_guard: records the devices asked for and whether a guard is
    entered."""

    def __init__(self):
        self.devices, self.active, self.launches = [], False, 0

    def __call__(self, device):
        self.devices.append(device)
        return self

    def __enter__(self):
        self.active = True

    def __exit__(self, *exc):
        self.active = False


@pytest.fixture
def guard(monkeypatch):
    """Every kernel run (interpreted, or compiled on a GPU) must happen inside the recorder."""
    recorder = _GuardRecorder()
    monkeypatch.setattr(common, "device_guard", recorder)
    if interpreting():
        from triton.runtime.interpreter import InterpretedFunction as runner
    else:  # pragma: no cover - GPU runs
        runner = triton.runtime.JITFunction
    run = runner.run

    def guarded_run(self, *args, **kwargs):
        assert recorder.active, f"{self} launched outside the device guard"
        recorder.launches += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(runner, "run", guarded_run)
    return recorder


def _infonce(x):
    lse = triton_infonce.infonce_forward([x], [x, x], [True, False], [5.0])
    triton_infonce.infonce_backward(torch.ones_like(lse), lse, [x], [x, x], [True, False], [5.0], [True], [True, True])


def _regularizers(x):
    for kind in ("cosine", "squared_distance"):
        terms, norms = triton_regularizers.paired_forward(x, x, x, x, kind)
        triton_regularizers.paired_backward(torch.ones_like(terms), terms, norms, x, x, x, x, kind, True, True)
    loss, stats, gram_b = triton_regularizers.barlow_forward(x, x, 5e-3, 0.1)
    triton_regularizers.barlow_backward(torch.ones_like(loss), x, x, stats, gram_b, 5e-3, 0.1)
    c = torch.randn(x.shape[1], x.shape[1], device=x.device)
    loss = triton_regularizers.correlation_loss_forward(c, 5e-3, 0.1)
    triton_regularizers.correlation_loss_backward(torch.ones_like(loss), c, 5e-3, 0.1)


@pytest.mark.parametrize("family", [_infonce, _regularizers], ids=["infonce", "regularizers"])
def test_every_launch_runs_under_the_tensors_device_guard(guard, family):
    x = torch.randn(6, 5, device=DEVICE)
    family(x)
    assert guard.launches > 0
    assert guard.devices == [x.device] * guard.launches  # one guard per launch, on x's device

