"""Compile every Triton kernel, under every GPU autotune config, for real GPUs (sm_80, sm_86, sm_89,
sm_90: the shared-memory classes of A100, consumer/L4/L40, H100/H200).

The interpreter (TRITON_INTERPRET=1, how the other tests run the kernels on CPU) lets through what
only the GPU compiler rejects: tl.dot shape limits, shared-memory overflow, layout errors. Triton
compiles for a GPU target without a GPU, so CI catches those here.

Convention (data-driven): every module of ``pnr_kernels.triton`` that defines ``compile_cases()``,
returning a list of :class:`pnr_kernels.triton.common.CompileCase` (built on call, not at import),
is compiled here for each architecture in a case's ``archs``, and its shared memory is checked
against that GPU's per-block limit (the driver would only refuse it at launch). A new kernel module
only has to define that function; build the cases with
:func:`pnr_kernels.triton.common.compile_case`, one case per kernel x autotune config x
specialisation that launches (dtype; for contiguous, aligned inputs the ``unit`` and
``divisible_by_16`` specialisations, which use more shared memory), as
``pnr_kernels.triton.infonce.compile_cases`` does. Case names must be unique.

The compilation runs in one subprocess with TRITON_INTERPRET=0 (interpreted kernels cannot be
compiled), spread over the CPU cores; each case and architecture is then reported as its own
test. About a minute on 2 cores with an empty Triton cache; seconds with a warm one.
"""
import functools
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

import pnr_kernels.triton as triton_backend
from pnr_kernels.triton.common import SHARED_MEMORY_LIMIT

ROOT = Path(__file__).resolve().parents[1]


def _case_modules():
    """{module name: its compile cases} of every pnr_kernels.triton module that lists cases."""
    found = {}
    for info in pkgutil.iter_modules(triton_backend.__path__):
        module = importlib.import_module(f"{triton_backend.__name__}.{info.name}")
        if hasattr(module, "compile_cases"):
            found[module.__name__] = module.compile_cases()
    return found


@functools.lru_cache(maxsize=None)
def _cases(module):
    return importlib.import_module(module).compile_cases()


def _compile_one(job):
    """Compile case ``index`` of ``module`` for ``arch``; None on success, else the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, index, arch = job
    case = _cases(module)[index]
    try:
        compiled = triton.compile(ASTSource(case.kernel, case.signature, case.constexprs, case.attrs),
                                  target=GPUTarget("cuda", arch, 32), options=case.options)
    except Exception as exc:  # the test reports the compiler's message
        return f"{type(exc).__name__}: {exc}"
    if compiled.metadata.shared > SHARED_MEMORY_LIMIT[arch]:
        return f"needs {compiled.metadata.shared} bytes of shared memory, sm_{arch} has {SHARED_MEMORY_LIMIT[arch]}"
    return None


def compile_all() -> dict:
    """{"<case name>@sm_<arch>": error or None} for every case; run with TRITON_INTERPRET=0."""
    jobs, names = [], []
    for module, cases in _case_modules().items():
        for index, case in enumerate(cases):
            for arch in case.archs:
                jobs.append((module, index, arch))
                names.append(f"{case.name}@sm_{arch}")
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return dict(zip(names, pool.map(_compile_one, jobs)))


CASE_IDS = [f"{case.name}@sm_{arch}" for cases in _case_modules().values() for case in cases for arch in case.archs]


@pytest.fixture(scope="module")
def compile_results():
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = "import json; from tests.test_compile_triton import compile_all; print(json.dumps(compile_all()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_module_lists_cases():
    assert {"pnr_kernels.triton.infonce", "pnr_kernels.triton.regularizers"} <= set(_case_modules())
    assert len(CASE_IDS) == len(set(CASE_IDS)), "compile case names must be unique"


def test_every_gpu_gets_every_infonce_kernel_and_config_at_its_widest_blocking():
    """Each GPU's shared-memory class (sm_80, sm_86, sm_89, sm_90) compiles every kernel under
    every autotune config at the widest resident D its blocking launches, contiguous (the most
    shared memory), for bf16 and fp32."""
    from pnr_kernels.triton import infonce

    configs = {"fwd": infonce.FWD_CONFIGS, "drow": infonce.DROW_CONFIGS, "dkey": infonce.DKEY_CONFIGS}
    for arch, limit in SHARED_MEMORY_LIMIT.items():
        for dtype, element_size in (("bf16", 2), ("fp32", 4)):
            width = infonce.resident_d(element_size, limit, arch)
            for kind, table in configs.items():
                for bm, bn, warps, stages in table:
                    case_id = f"infonce_{kind}_{dtype}_resident_contiguous_d{width}_m{bm}n{bn}w{warps}s{stages}@sm_{arch}"
                    assert case_id in CASE_IDS


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_compiles_for_gpu(compile_results, case_id):
    error = compile_results[case_id]
    assert error is None, error


def test_gpu_check_script_parses():
    """benchmarks/gpu_check.sh only runs on a GPU machine; here at least its syntax is checked."""
    script = ROOT / "benchmarks" / "gpu_check.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK), "gpu_check.sh must be executable"
