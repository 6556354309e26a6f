"""The native extension's build system (pnr_kernels/native.py): the library registers its CPU and
CUDA kernels, every .cu is compiled for sm_80 and sm_90, builds are cached across processes and
serialised by a lock, and a missing compiler makes the backend unavailable with a reason."""
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from pnr_kernels import native

OPS = ("pnr_kernels::infonce_lse_forward", "pnr_kernels::infonce_lse_backward")


def _loaded():
    result, why_not = native.load()
    if result is None:
        pytest.skip(f"native backend unavailable: {why_not}")
    return result


def _run_python(code, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, check=False)


def test_library_registers_cpu_kernels():
    _loaded()
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


def test_library_registers_cuda_kernels_when_nvcc_is_present():
    result = _loaded()
    if not result.cuda:
        pytest.skip(f"CUDA part not built: {result.cuda_skipped}")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def test_every_cu_source_is_compiled_for_sm80_and_sm90():
    result = _loaded()
    if not result.cuda:
        pytest.skip(f"CUDA part not built: {result.cuda_skipped}")
    cu_sources = sorted(p.name for p in native.source_dir().glob("*.cu"))
    assert cu_sources
    compiled = {}
    for command in result.manifest["commands"]:
        source = next((arg for arg in command if arg.endswith(".cu")), None)
        if source is not None:
            compiled[os.path.basename(source)] = command
    assert sorted(compiled) == cu_sources
    for name, command in compiled.items():
        for arch in ("sm_80", "sm_90"):
            assert any(flag.endswith(f"code={arch}") for flag in command), f"{name} not compiled for {arch}"


def test_gencode_flags_follow_torch_cuda_arch_list():
    assert native.cuda_gencode_flags("8.0 9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        native.cuda_gencode_flags("sm_80")


def test_build_is_reused_across_processes():
    """This process built (or found) the library; the prebuild command of another finds it."""
    result = _loaded()
    out = subprocess.run([sys.executable, "-m", "pnr_kernels.native", "build"], capture_output=True,
                         text=True, check=True).stdout
    assert f"cached: {result.library}" in out
    assert ("CUDA part: " in out) == result.cuda


def test_concurrent_builds_share_one_build(tmp_path, monkeypatch):
    """Two builders racing on an empty cache: one compiles, the other waits for the lock and reuses it."""
    _loaded()
    monkeypatch.setenv("PNR_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("PNR_KERNELS_CUDA", "0")  # the C++ part is enough to exercise the lock
    plan, why_not = native.make_plan()
    assert why_not is None and plan.cuda_skipped == "PNR_KERNELS_CUDA=0"
    results = []
    threads = [threading.Thread(target=lambda: results.append(native.build(plan))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.built for r in results) == [False, True]
    assert all(r.library == plan.library and r.library.exists() for r in results)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [plan.directory.name]  # no staging left
    # The prebuild command of another process reuses it and says why the CUDA part is missing.
    out = subprocess.run([sys.executable, "-m", "pnr_kernels.native", "build"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PNR_KERNELS_CACHE": str(tmp_path), "PNR_KERNELS_CUDA": "0"})
    assert out.stdout.splitlines()[0] == f"cached: {plan.library}"
    assert "CUDA part skipped: PNR_KERNELS_CUDA=0" in out.stdout


def test_missing_compiler_makes_the_backend_unavailable_with_a_reason(tmp_path):
    out = _run_python("""
        import torch
        from pnr_kernels import backends, losses, native
        print(native.unavailable_reason(torch.device("cpu"), torch.float32))
        print(backends.available_backends("cpu"))
        z = torch.randn(4, 3)
        try:
            losses.nt_xent_loss(z, z, backend="native")
        except backends.BackendUnavailableError as exc:
            print(exc)
        print(losses.nt_xent_loss(z, z).item())  # auto falls back to the reference
    """, CXX="/nonexistent/c++", PNR_KERNELS_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "the native extension could not be built: the C++ compiler CXX='/nonexistent/c++' was not found"
    assert lines[1] == "['reference']"
    assert "backend 'native' cannot run nt_xent" in lines[2] and "CXX='/nonexistent/c++'" in lines[2]
    float(lines[3])


def test_unsupported_devices_and_dtypes_are_refused_with_a_reason():
    _loaded()
    assert "CPU and CUDA tensors" in native.unavailable_reason(torch.device("meta"), torch.float32)
    assert "float64" in native.unavailable_reason(torch.device("cuda"), torch.float64)
    assert native.unavailable_reason(torch.device("cpu"), torch.float64) is None
