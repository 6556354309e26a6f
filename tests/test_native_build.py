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


NVCC13_CODES = frozenset(f"sm_{n}" for n in (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121))


def test_gencode_flags_follow_torch_cuda_arch_list():
    assert native.cuda_gencode_flags("8.0 9.0+PTX") == ([
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ], [])


def test_every_arch_form_torch_accepts_is_parsed():
    """8.6+PTX, 9.0a, 10.0f, 12.0a and names (TORCH_CUDA_ARCH_LIST="9.0a" used to raise ValueError
    out of unavailable_reason, even for CPU tensors)."""
    flags, notes = native.cuda_gencode_flags("8.6+PTX;9.0a 10.0f;12.0a", NVCC13_CODES)
    assert notes == []
    assert flags == [
        "-gencode=arch=compute_86,code=sm_86", "-gencode=arch=compute_86,code=compute_86",
        "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_100f,code=sm_100f",
        "-gencode=arch=compute_120a,code=sm_120a",
    ]
    archs, notes = native.parse_cuda_arch_list("Ampere;Hopper", NVCC13_CODES)
    assert [a.entry for a in archs] == ["8.0", "8.6+PTX", "9.0+PTX"] and notes == []


def test_archs_nvcc_cannot_build_or_parse_are_skipped_with_a_reason():
    """7.0 (common in NGC-style lists) is refused by nvcc 13; it used to fail the whole build."""
    archs, notes = native.parse_cuda_arch_list("7.0;8.0;sm_90;Volta", NVCC13_CODES)
    assert [a.entry for a in archs] == ["8.0"]
    assert notes[0].startswith("7.0 skipped: this nvcc cannot build sm_70 (it builds sm_75, sm_80")
    assert notes[1].startswith("'sm_90' skipped: not an arch like 8.0")
    assert notes[2].startswith("7.0+PTX skipped: this nvcc cannot build sm_70")


def test_which_devices_run_which_archs():
    arch = lambda entry: native.parse_cuda_arch_list(entry)[0][0]  # noqa: E731
    assert arch("8.0").runs_on((8, 6)) and not arch("8.0").runs_on((9, 0)) and not arch("8.6").runs_on((8, 0))
    assert arch("8.0+PTX").runs_on((9, 0)) and arch("9.0+PTX").runs_on((12, 0))
    assert arch("9.0a").runs_on((9, 0)) and not arch("9.0a+PTX").runs_on((10, 0))
    assert arch("10.0f").runs_on((10, 3)) and not arch("10.0f").runs_on((12, 0))


def test_cuda_version_mismatch_is_a_reason():
    assert native.cuda_mismatch("13.0", "12.8") == (
        "nvcc is CUDA 13.0 but this torch was built with CUDA 12.8; set CUDA_HOME to a CUDA 12.x toolkit")
    assert native.cuda_mismatch("13.0", "13.1") is None
    assert native.cuda_mismatch("13.0", None) is None  # CPU torch: compiled as a check only


def _nvcc_plan(monkeypatch, arch_list):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    plan, why_not = native.make_plan()
    assert why_not is None
    if native._find_nvcc()[0] is None:
        pytest.skip("no nvcc")
    return plan


def test_plans_for_arch_lists_never_raise_and_keep_the_cpu_part(monkeypatch):
    plan = _nvcc_plan(monkeypatch, "9.0a")
    assert plan.nvcc and "-gencode=arch=compute_90a,code=sm_90a" in plan.nvcc_flags
    plan = _nvcc_plan(monkeypatch, "7.0;8.0")
    assert plan.cuda_archs == ("8.0",) and plan.cuda_notes[0].startswith("7.0 skipped")
    plan = _nvcc_plan(monkeypatch, "7.0;bogus")
    assert plan.nvcc is None and "-DPNR_KERNELS_WITH_CUDA" not in plan.cxx_flags
    assert plan.cuda_skipped.startswith("no arch of TORCH_CUDA_ARCH_LIST='7.0;bogus' can be built")


def test_nvcc_of_another_cuda_major_skips_the_cuda_part(monkeypatch):
    """A CUDA 12 torch with nvcc 13 would load a second CUDA runtime: the plan builds the CPU part
    alone and says why (unavailable_reason for CUDA tensors then quotes it)."""
    monkeypatch.delenv("PNR_KERNELS_CUDA", raising=False)
    nvcc, _ = native._find_nvcc()
    if nvcc is None or native.nvcc_cuda_version(nvcc) is None:
        pytest.skip("no nvcc")
    major = int(native.nvcc_cuda_version(nvcc).split(".")[0])
    monkeypatch.setattr(torch.version, "cuda", f"{major - 1}.8")
    plan, why_not = native.make_plan()
    assert why_not is None and plan.nvcc is None and "-DPNR_KERNELS_WITH_CUDA" not in plan.cxx_flags
    assert plan.cuda_skipped == native.cuda_mismatch(native.nvcc_cuda_version(nvcc), f"{major - 1}.8")


def _fake_cuda(monkeypatch, capability, name="Fake GPU"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_cuda_reasons_on_a_torch_with_cuda(monkeypatch):
    """With the real library (built for the default 8.0;9.0+PTX here) and a faked CUDA torch: a
    device below the built archs is refused with a reason instead of "no kernel image" at launch."""
    result = _loaded()
    if not result.cuda:
        pytest.skip(f"CUDA part not built: {result.cuda_skipped}")
    cuda = torch.device("cuda")
    _fake_cuda(monkeypatch, (7, 5), "Tesla T4")
    reason = native.unavailable_reason(cuda, torch.float32)
    assert "cannot run on Tesla T4 (compute capability 7.5)" in reason and "TORCH_CUDA_ARCH_LIST" in reason
    assert "float64" in native.unavailable_reason(cuda, torch.float64)
    for capability in ((8, 0), (8, 9), (9, 0), (12, 0)):
        _fake_cuda(monkeypatch, capability)
        assert native.unavailable_reason(cuda, torch.float32) is None, capability


def test_build_is_reused_across_processes():
    """This process built (or found) the library; the prebuild command of another finds it."""
    result = _loaded()
    out = subprocess.run([sys.executable, "-m", "pnr_kernels.native", "build"], capture_output=True,
                         text=True, check=True).stdout
    assert f"cached: {result.library}" in out
    assert ("CUDA part: " in out) == result.cuda


FAILING_NVCC = """#!/bin/sh
case " $* " in *" --dryrun "*|*" --version "*|*" --list-gpu-code "*) exec {real} "$@";; esac
echo "fake nvcc: cannot compile" >&2
exit 1
"""


def test_concurrent_builds_share_one_build_and_a_failing_cuda_part_keeps_the_cpu_part(tmp_path, monkeypatch):
    """Two builders racing on an empty cache: one compiles, the other waits for the lock and reuses
    it. Their nvcc fails to compile: the CPU part is built alone, the reason recorded, and another
    process loads it and runs its CPU kernels (a failing nvcc used to fail the whole build)."""
    _loaded()
    real_nvcc, _ = native._find_nvcc()
    if real_nvcc is None:
        pytest.skip("no nvcc")
    fake = tmp_path / "cuda" / "bin" / "nvcc"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAILING_NVCC.format(real=real_nvcc))
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    env = {"PNR_KERNELS_CACHE": str(cache), "CUDA_HOME": str(tmp_path / "cuda")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PNR_KERNELS_CUDA", raising=False)
    plan, why_not = native.make_plan()
    assert why_not is None and plan.nvcc == str(fake)
    results = []
    threads = [threading.Thread(target=lambda: results.append(native.build(plan))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.built for r in results) == [False, True]
    assert all(r.library == plan.library and r.library.exists() and not r.cuda for r in results)
    skipped = results[0].cuda_skipped
    assert skipped.startswith("the CUDA part failed to build, so the CPU part was built alone: `")
    assert "fake nvcc: cannot compile" in skipped
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [plan.directory.name]  # no staging left
    # The prebuild command of another process reuses it and says why the CUDA part is missing ...
    out = subprocess.run([sys.executable, "-m", "pnr_kernels.native", "build"], capture_output=True, text=True,
                         check=True, env={**os.environ, **env})
    assert out.stdout.splitlines()[0] == f"cached: {plan.library}"
    assert "CUDA part skipped: the CUDA part failed to build" in out.stdout
    # ... and the CPU kernels of that library run.
    run = _run_python("""
        import torch
        from pnr_kernels import losses, native
        z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
        got = losses.nt_xent_loss(z1, z2, backend="native")
        print(native.load()[0].library, torch.allclose(got, losses.nt_xent_loss(z1, z2, backend="reference")))
    """, **env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [str(plan.library), "True"]


def test_first_use_from_several_threads_builds_and_loads_once():
    """8 threads making the first native call at once (in a fresh process) share one build and one
    load_library; under functools.lru_cache each of them built and loaded. The build is slowed down
    to hold the race window open."""
    _loaded()
    out = _run_python("""
        import threading, time, torch
        from pnr_kernels import native
        builds, loads = [], []
        real_build, real_load = native.build, torch.ops.load_library
        def slow_build(*args, **kwargs):
            builds.append(1)
            time.sleep(0.5)
            return real_build(*args, **kwargs)
        def counting_load(path):
            loads.append(path)
            return real_load(path)
        native.build, torch.ops.load_library = slow_build, counting_load
        barrier = threading.Barrier(8)
        results = []
        def first_use():
            barrier.wait()
            results.append(native.load())
        threads = [threading.Thread(target=first_use) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(len(builds), len(loads), len(results), len({id(r) for r in results}), results[0][1])
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "8", "1", "None"]


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
    assert native.unavailable_reason(torch.device("cpu"), torch.float64) is None
    assert "got torch.complex64" in native.unavailable_reason(torch.device("cpu"), torch.complex64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a torch without usable CUDA")
def test_cuda_is_refused_without_cuda_in_torch(tmp_path):
    """available_backends("cuda") listed native on a CPU-only torch. The reason comes from torch,
    before (and without) any build: here the compiler is missing and it is still not mentioned."""
    out = _run_python("""
        import torch
        from pnr_kernels import backends, native
        print(native.unavailable_reason(torch.device("cuda"), torch.float32))
        print("native" in backends.available_backends("cuda"))
    """, CXX="/nonexistent/c++", PNR_KERNELS_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    reason, listed = out.stdout.splitlines()
    if torch.version.cuda is None:
        assert reason == f"this torch build ({torch.__version__}) has no CUDA support (torch.version.cuda is None)"
    else:
        assert reason == "torch.cuda.is_available() is False (no GPU or no working driver)"
    assert listed == "False"
