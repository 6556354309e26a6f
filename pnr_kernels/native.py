"""The native backend: the compiled extension in csrc/, built on first use and cached.

Build contract (what every csrc/ file can rely on; other op families add files, not rules):

* Every ``csrc/*.cpp`` is compiled by the C++ compiler (``$CXX``, else ``c++``/``g++``) against
  torch's core headers (``torch/library.h``, ``ATen/core/Tensor.h``, ``ATen/ops/*.h``; not
  ``torch/extension.h``), with ``-std=c++20 -O3 -fopenmp -fPIC`` and ``-I csrc``.
* Every ``csrc/*.cu`` is compiled by nvcc, when one is found (``$CUDA_HOME/bin/nvcc``, ``nvcc`` on
  the PATH, ``/usr/local/cuda/bin/nvcc``; ``PNR_KERNELS_CUDA=0`` skips it), for the archs of
  ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0+PTX``, i.e. sm_80 and sm_90). ``.cu`` files include
  only the CUDA toolkit and csrc/ headers (torch's CUDA headers are absent from CPU wheels) and
  expose plain launchers: raw pointers, sizes, strides, a ``void*`` stream, and an error string
  (``nullptr`` on success) as the return value.
* All objects are linked into ONE shared library (``-lc10 -ltorch_cpu``, plus ``-lcudart`` when
  the CUDA part is built) and loaded with ``torch.ops.load_library``.
* Each op family lives in its own files and registers its ops with
  ``TORCH_LIBRARY_FRAGMENT(pnr_kernels, m)`` and ``TORCH_LIBRARY_IMPL(pnr_kernels, CPU|CUDA, m)``;
  CUDA registrations sit inside ``#ifdef PNR_KERNELS_WITH_CUDA``, which is defined for the .cpp
  files exactly when the CUDA part is built.
* CPU kernels parallelise with ``at::parallel_for`` (``-fopenmp`` makes it parallel). Dispatch
  state is per thread: a kernel that calls ATen ops on tensors that require grad must hold an
  ``at::AutoDispatchBelowADInplaceOrView`` guard inside the parallel body as well as outside.
* Shared helpers: ``csrc/common.h`` (binding side: input checks, dtype dispatch, the current
  stream, launch error checks), ``csrc/launch.h`` (types shared by bindings and launchers),
  ``csrc/cuda_common.cuh`` (kernel side: dtype conversion, launch helpers).

Sources: ``pnr_kernels/csrc`` is a symlink to the checkout's csrc/, so that the wheel ships the
sources as package data (pyproject.toml) and an installed package builds from its own copy.

Cache: ``$PNR_KERNELS_CACHE`` or ``$XDG_CACHE_HOME/pnr_kernels`` (default ``~/.cache/pnr_kernels``),
one folder per build key, the hash of the csrc/ sources, the torch version, the compilers'
versions and every flag. A file lock serialises concurrent builds; a finished build is moved into
place atomically, so other processes reuse it. ``python -m pnr_kernels.native build`` (or the
``pnr-kernels build`` console script) prebuilds and prints what it built and why any part was
skipped.

Ops: ``pnr_kernels::infonce_lse_forward`` / ``infonce_lse_backward`` (csrc/infonce_*) and the
regulariser kernels (csrc/regularizers_*), handed to the backend-neutral autograd glue of
``pnr_kernels.ops`` through :func:`kernels`, this backend's one hookup.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

LIBRARY_NAME = "libpnr_kernels_native.so"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def source_dir() -> Path:
    """csrc/: packaged next to this module in an installed wheel, at the checkout root otherwise."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the csrc/ sources are neither in {here} nor in {here.parent}")


def cache_root() -> Path:
    if os.environ.get("PNR_KERNELS_CACHE"):
        return Path(os.environ["PNR_KERNELS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pnr_kernels"


def _find_cxx() -> Tuple[Optional[str], Optional[str]]:
    """(compiler path, None) or (None, why not)."""
    if os.environ.get("CXX"):
        found = shutil.which(os.environ["CXX"])
        return (found, None) if found else (None, f"the C++ compiler CXX={os.environ['CXX']!r} was not found")
    for name in ("c++", "g++"):
        if shutil.which(name):
            return shutil.which(name), None
    return None, "no C++ compiler found (install g++ or set CXX)"


def _find_nvcc() -> Tuple[Optional[str], Optional[str]]:
    if os.environ.get("PNR_KERNELS_CUDA", "1") == "0":
        return None, "PNR_KERNELS_CUDA=0"
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate, None
    return None, "nvcc not found (set CUDA_HOME or put nvcc on the PATH)"


def _cuda_lib_dir(nvcc: str) -> Path:
    """The folder holding libcudart of nvcc's toolkit (nvcc may be a wrapper script elsewhere)."""
    dryrun = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True, check=False)
    tops = [line.split("TOP=", 1)[1] for line in dryrun.stderr.splitlines() if "TOP=" in line]
    top = Path(tops[0].strip()).resolve() if tops else Path(nvcc).resolve().parent.parent
    return top / "lib64"


def _version(compiler: str) -> str:
    result = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip()


def cuda_gencode_flags(arch_list: str) -> List[str]:
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST such as ``8.0;9.0+PTX`` (``;`` or spaces)."""
    flags = []
    for arch in arch_list.replace(";", " ").split():
        ptx = arch.endswith("+PTX")
        number = arch.removesuffix("+PTX").replace(".", "")
        if not number.isdigit():
            raise ValueError(f"TORCH_CUDA_ARCH_LIST entry {arch!r} is not like 8.0 or 9.0+PTX")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
    return flags


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Everything a build depends on; ``key`` hashes all of it."""
    sources: Tuple[Path, ...]
    cxx: str
    cxx_flags: Tuple[str, ...]
    link_flags: Tuple[str, ...]
    nvcc: Optional[str]
    nvcc_flags: Tuple[str, ...]
    cuda_skipped: Optional[str]
    key: str

    @property
    def directory(self) -> Path:
        return cache_root() / f"torch{torch.__version__.replace('+', '_')}-{self.key[:20]}"

    @property
    def library(self) -> Path:
        return self.directory / LIBRARY_NAME

    def compile_commands(self, out: Path) -> List[Tuple[Path, List[str]]]:
        commands = []
        for source in self.sources:
            obj = out / (source.name + ".o")
            if source.suffix == ".cpp":
                commands.append((obj, [self.cxx, *self.cxx_flags, "-c", str(source), "-o", str(obj)]))
            elif source.suffix == ".cu" and self.nvcc:
                commands.append((obj, [self.nvcc, *self.nvcc_flags, "-c", str(source), "-o", str(obj)]))
        return commands


def make_plan() -> Tuple[Optional[BuildPlan], Optional[str]]:
    """(plan, None), or (None, why nothing can be built)."""
    cxx, why_not = _find_cxx()
    if cxx is None:
        return None, why_not
    csrc = source_dir()
    sources = tuple(sorted(p for p in csrc.iterdir() if p.suffix in _SOURCE_SUFFIXES))
    nvcc, cuda_skipped = _find_nvcc()
    if nvcc and not any(p.suffix == ".cu" for p in sources):
        nvcc, cuda_skipped = None, "csrc/ has no .cu sources"
    torch_dir = Path(torch.__file__).resolve().parent
    include = torch_dir / "include"
    cxx_flags = [
        "-std=c++20", "-O3", "-fPIC", "-fopenmp", "-fvisibility=hidden",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{csrc}", f"-isystem{include}", f"-isystem{include / 'torch' / 'csrc' / 'api' / 'include'}",
    ]
    link_flags = ["-shared", "-fopenmp", f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
                  f"-Wl,-rpath,{torch_dir / 'lib'}"]
    nvcc_flags: List[str] = []
    if nvcc:
        cuda_lib = _cuda_lib_dir(nvcc)
        cxx_flags.append("-DPNR_KERNELS_WITH_CUDA")
        link_flags += [f"-L{cuda_lib}", "-lcudart", f"-Wl,-rpath,{cuda_lib}"]
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
        nvcc_flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", f"-I{csrc}", "--expt-relaxed-constexpr",
                      *cuda_gencode_flags(archs)]
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    for part in (torch.__version__, _version(cxx), nvcc and _version(nvcc), *cxx_flags, *link_flags,
                 *nvcc_flags):
        digest.update(str(part).encode() + b"\0")
    return BuildPlan(sources, cxx, tuple(cxx_flags), tuple(link_flags), nvcc, tuple(nvcc_flags),
                     cuda_skipped, digest.hexdigest()), None


class BuildError(RuntimeError):
    """A compiler or linker command failed; the message holds the command and its output."""


def _run(command: Sequence[str]) -> None:
    result = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise BuildError(f"`{' '.join(command)}` failed:\n{output[-4000:]}")


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclasses.dataclass(frozen=True)
class BuildResult:
    library: Path
    built: bool  # False when reused from the cache
    cuda: bool
    cuda_skipped: Optional[str]
    manifest: Dict


def build(plan: Optional[BuildPlan] = None, *, force: bool = False) -> BuildResult:
    """Build the extension of ``plan`` (default: this environment's) unless it is cached."""
    if plan is None:
        plan, why_not = make_plan()
        if plan is None:
            raise BuildError(why_not)
    with _lock(plan.directory.parent / (plan.directory.name + ".lock")):
        manifest_path = plan.directory / "manifest.json"
        if plan.library.exists() and manifest_path.exists() and not force:
            manifest = json.loads(manifest_path.read_text())
            return BuildResult(plan.library, False, manifest["cuda"], manifest["cuda_skipped"], manifest)
        staging = Path(tempfile.mkdtemp(prefix=plan.directory.name + ".", dir=plan.directory.parent))
        try:
            commands = plan.compile_commands(staging)
            with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
                list(pool.map(lambda job: _run(job[1]), commands))
            objects = [str(obj) for obj, _ in commands]
            _run([plan.cxx, *objects, *plan.link_flags, "-o", str(staging / LIBRARY_NAME)])
            manifest = {
                "key": plan.key,
                "torch": torch.__version__,
                "cuda": plan.nvcc is not None,
                "cuda_skipped": plan.cuda_skipped,
                "commands": [command for _, command in commands],
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
            for obj in objects:
                os.remove(obj)
            if plan.directory.exists():
                shutil.rmtree(plan.directory)
            os.replace(staging, plan.directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(plan.library, True, manifest["cuda"], manifest["cuda_skipped"], manifest)


@functools.lru_cache(maxsize=None)
def load() -> Tuple[Optional[BuildResult], Optional[str]]:
    """Build (or reuse) and load the extension once per process: (result, None) or (None, why not)."""
    try:
        result = build()
    except (BuildError, OSError) as exc:
        return None, f"the native extension could not be built: {exc}"
    try:
        torch.ops.load_library(str(result.library))
    except OSError as exc:
        return None, f"the native extension {result.library} could not be loaded: {exc}"
    return result, None


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type not in ("cpu", "cuda"):
        return f"it runs on CPU and CUDA tensors, got a {device.type} tensor"
    result, why_not = load()
    if result is None:
        return why_not
    if device.type == "cuda":
        if not result.cuda:
            return f"its CUDA part was not built ({result.cuda_skipped})"
        if dtype not in CUDA_DTYPES:
            return f"its CUDA kernels take float32, bfloat16 and float16, got {dtype}; use backend='reference'"
    elif dtype not in CPU_DTYPES:
        return f"its CPU kernels take float64, float32, bfloat16 and float16, got {dtype}"
    return None


@functools.lru_cache(maxsize=None)
def kernels() -> dict:
    """This backend's one hookup: its kernel set per op family (see ``pnr_kernels.ops``), the
    extension's ops ``torch.ops.pnr_kernels.*`` (csrc/infonce_*, csrc/regularizers_*). Builds and
    loads the extension if that has not happened yet."""
    from .ops.infonce import InfoNCEKernels
    from .ops.regularizers import RegularizerKernels

    if load()[0] is None:
        raise RuntimeError(load()[1])
    ops = torch.ops.pnr_kernels
    return {
        "infonce": InfoNCEKernels(ops.infonce_lse_forward, ops.infonce_lse_backward),
        "regularizers": RegularizerKernels(
            ops.paired_terms_forward, ops.paired_terms_backward, ops.barlow_gram_forward,
            ops.barlow_gram_backward, ops.barlow_correlation_loss_forward, ops.barlow_correlation_loss_backward),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pnr-kernels", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build (or find in the cache) the native extension")
    build_parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    plan, why_not = make_plan()
    if plan is None:
        print(f"nothing built: {why_not}", file=sys.stderr)
        return 1
    try:
        result = build(plan, force=args.force)
    except BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{'built' if result.built else 'cached'}: {result.library}")
    print(f"C++ part: {', '.join(p.name for p in plan.sources if p.suffix == '.cpp')} ({plan.cxx})")
    if result.cuda:
        print(f"CUDA part: {', '.join(p.name for p in plan.sources if p.suffix == '.cu')} "
              f"({plan.nvcc}; {' '.join(f for f in plan.nvcc_flags if f.startswith('-gencode'))})")
    else:
        print(f"CUDA part skipped: {result.cuda_skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
