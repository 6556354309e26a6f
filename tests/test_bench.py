"""The benchmark runner: its records, its memory measurement and its CLI."""
import json
import subprocess
import sys

import pytest
import torch

from pnr_kernels import bench
from pnr_kernels.registry import LOSSES


def test_cpu_peak_memory_sees_a_step_allocation():
    def step():
        x = torch.ones(16 * 2 ** 20)  # 64 MiB, touched
        assert x.sum() > 0

    assert 60 <= bench._cpu_peak_extra_mb(step) < 200


def test_quick_grid_covers_every_loss_on_both_devices():
    for device in ("cpu", "cuda"):
        assert {case[0] for case in bench._sizes(device, quick=True)} == set(LOSSES)


def test_work_model_simclr_pnr_is_28_n2_d():
    case = bench.Case("simclr_pnr", "reference", "float32", batch_size=64, dim=32)
    assert bench.work_model(case) == ("GFLOP/s", 28 * 128 ** 2 * 32)


def test_cli_writes_records(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "pnr_kernels.bench", "--device", "cpu", "--quick", "--losses", "nt_xent", "byol_pnr",
         "--backends", "reference", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, check=True)
    records = json.loads(out.read_text())
    assert {r["loss"] for r in records} == {"nt_xent", "byol_pnr"}
    for r in records:
        for key in ("loss", "backend", "device", "dtype", "batch_size", "dim", "fwd_bwd_ms", "peak_memory_mb"):
            assert key in r
        assert r["fwd_bwd_ms"] > 0 and r["peak_memory_mb"] >= 0
    assert "| nt_xent" in run.stdout and "GFLOP/s" in run.stdout


def test_cli_rejects_an_empty_selection():
    run = subprocess.run([sys.executable, "-m", "pnr_kernels.bench", "--backends", "nonexistent"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "no case matches" in run.stderr


@pytest.mark.skipif(not bench._peer_available("pml"), reason="pytorch-metric-learning not installed")
def test_pml_peer_computes_the_same_nt_xent():
    from pytorch_metric_learning.losses import NTXentLoss

    (z1, z2), kwargs = bench.make_inputs("nt_xent", 5, 4, torch.float64)
    ours = LOSSES["nt_xent"].function(z1, z2, **kwargs, backend="reference")
    theirs = NTXentLoss(temperature=kwargs["temperature"])(torch.cat([z1, z2]), torch.arange(5).repeat(2))
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=1e-6)
