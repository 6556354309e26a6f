"""The native backend: the compiled extension in csrc/, built on first use and cached.

Build contract (what every csrc/ file can rely on; other op families add files, not rules):

* Every ``csrc/*.cpp`` is compiled by the C++ compiler (``$CXX``, else ``c++``/``g++``) against
  torch's core headers (``torch/library.h``, ``ATen/core/Tensor.h``, ``ATen/ops/*.h``; not
  ``torch/extension.h``), with ``-std=c++20 -O3 -fopenmp -fPIC`` and ``-I csrc``.
* Every ``csrc/*.cu`` is compiled by nvcc, when one is found (``$CUDA_HOME/bin/nvcc``, ``nvcc`` on
  the PATH, ``/usr/local/cuda/bin/nvcc``; ``PNR_KERNELS_CUDA=0`` skips it), for the archs of
  ``TORCH_CUDA_ARCH_LIST`` in every form torch accepts (``8.0``, ``8.6+PTX``, ``9.0a``, ``10.0f``,
  names such as ``Ampere``, ``native``); unset, the visible GPUs' archs, else ``8.0;9.0+PTX``.
  Entries this nvcc cannot build (``nvcc --list-gpu-code``) or cannot parse are skipped with a
  note (``pnr-kernels build`` prints them). The CPU part is never lost to the CUDA part: nvcc of
  another CUDA major version than torch's skips the CUDA part with the reason, and when the CUDA
  part fails to compile or link the CPU part is built alone and the reason recorded. On a torch
  without CUDA (``torch.version.cuda`` None) the CUDA part is still compiled, as a check only:
  CUDA tensors are refused there, as they are when a GPU's compute capability cannot run any
  built arch (a reason instead of "no kernel image" at launch). ``.cu`` files include
  only the CUDA toolkit and csrc/ headers (torch's CUDA headers are absent from CPU wheels) and
  expose plain launchers: raw pointers, sizes, strides, a ``void*`` stream, and an error string
  (``nullptr`` on success) as the return value.
* All objects are linked into ONE shared library (``-lc10 -ltorch_cpu -ldl``, plus ``-lcudart`` when
  the CUDA part is built) and loaded with ``torch.ops.load_library``.
* Each op family lives in its own files and registers its ops with
  ``TORCH_LIBRARY_FRAGMENT(pnr_kernels, m)`` and ``TORCH_LIBRARY_IMPL(pnr_kernels, CPU|CUDA, m)``;
  CUDA registrations sit inside ``#ifdef PNR_KERNELS_WITH_CUDA``, which is defined for the .cpp
  files exactly when the CUDA part is built.
* Kernels are immune to autocast: every op implementation holds a ``KernelGuard`` (common.h),
  which excludes the autocast dispatch keys, so ATen ops inside (``at::mm``) run in the dtype the
  kernel chose. CUDA implementations also hold a ``c10::DeviceGuard`` on their tensors' device.
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
place atomically, so other processes reuse it. ``load()`` is thread-safe: concurrent first calls
in one process share one build and one ``torch.ops.load_library``. ``python -m pnr_kernels.native build`` (or the
``pnr-kernels build`` console script) prebuilds and prints what it built and why any part was
skipped.

Ops: ``pnr_kernels::infonce_lse_forward`` / ``infonce_lse_backward`` and, CPU only, the cross pair
``infonce_cross_lse_forward`` / ``infonce_cross_lse_backward`` (csrc/infonce_*), the contrastive
losses' row normalisation ``unit_rows_forward`` / ``unit_rows_backward`` (CPU only,
csrc/unit_rows_cpu.cpp), SimCLR-PNR / NT-Xent of one process in one op with its own autograd node
``infonce_views_loss`` and its backward ``infonce_views_loss_backward`` (CPU only,
csrc/infonce_views_cpu.cpp) and the regulariser kernels (csrc/regularizers_*), handed to the backend-neutral autograd glue of
``pnr_kernels.ops`` through :func:`kernels`, this backend's one hookup.

Memory: CPU gradients of 32 MiB or more (the regularisers' ``(B, D)`` gradients at large sizes) come
from a small pool of blocks kept after their tensors are freed (csrc/output_pool_cpu.cpp: at most
4 blocks, 1 GiB), so that a training step does not fault them in page by page again;
``PNR_KERNELS_CPU_POOL=0`` turns it off and :func:`release_cpu_output_pool` empties it.
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
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import _cli

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


def nvcc_cuda_version(nvcc: str) -> Optional[str]:
    """The CUDA release of nvcc (``"13.0"``), from ``nvcc --version``; None if it does not say."""
    found = re.search(r"release (\d+)\.(\d+)", _version(nvcc))
    return f"{found.group(1)}.{found.group(2)}" if found else None


def nvcc_supported_codes(nvcc: str) -> Optional[frozenset]:
    """The real architectures nvcc can build (``{"sm_75", "sm_80", ...}``, from ``--list-gpu-code``);
    None when this nvcc cannot list them (then nothing is filtered out up front)."""
    result = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, check=False)
    codes = frozenset(re.findall(r"\bsm_\d+\b", result.stdout))
    return codes if result.returncode == 0 and codes else None


# TORCH_CUDA_ARCH_LIST names, expanded as torch.utils.cpp_extension does (combined names first).
NAMED_CUDA_ARCHS = (
    ("Kepler+Tesla", "3.7"), ("Kepler", "3.5+PTX"), ("Maxwell+Tegra", "5.3"), ("Maxwell", "5.0;5.2+PTX"),
    ("Pascal", "6.0;6.1+PTX"), ("Volta+Tegra", "7.2"), ("Volta", "7.0+PTX"), ("Turing", "7.5+PTX"),
    ("Ampere+Tegra", "8.7"), ("Ampere", "8.0;8.6+PTX"), ("Ada", "8.9+PTX"), ("Hopper", "9.0+PTX"),
    ("Blackwell+Tegra", "11.0"), ("Blackwell", "10.0;10.3;12.0;12.1+PTX"),
)
_ARCH_ENTRY = re.compile(r"(\d+)\.(\d)([af]?)(\+PTX)?")


@dataclasses.dataclass(frozen=True)
class CudaArch:
    """One TORCH_CUDA_ARCH_LIST entry: ``8.6`` (sm_86), ``8.6+PTX`` (and its PTX), ``9.0a``
    (arch-specific: runs on 9.0 only), ``10.0f`` (family-specific: runs on 10.x, x >= 0)."""
    major: int
    minor: int
    suffix: str = ""  # "", "a" or "f"
    ptx: bool = False

    @property
    def entry(self) -> str:
        return f"{self.major}.{self.minor}{self.suffix}{'+PTX' if self.ptx else ''}"

    @property
    def code(self) -> str:
        return f"sm_{self.major}{self.minor}"

    def gencode_flags(self) -> List[str]:
        number = f"{self.major}{self.minor}{self.suffix}"
        flags = [f"-gencode=arch=compute_{number},code=sm_{number}"]
        if self.ptx:
            flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
        return flags

    def runs_on(self, capability: Tuple[int, int]) -> bool:
        """Whether a device of this compute capability can run what this entry builds: the cubin
        runs on the same major version at an equal or higher minor (``a``: that exact version);
        plain PTX is JIT-compiled by the driver for any higher capability."""
        if self.suffix == "a":
            return tuple(capability) == (self.major, self.minor)
        if capability[0] == self.major and capability[1] >= self.minor:
            return True
        return self.ptx and not self.suffix and tuple(capability) >= (self.major, self.minor)


def parse_cuda_arch_list(arch_list: str, supported: Optional[frozenset] = None) -> Tuple[List[CudaArch], List[str]]:
    """The entries of a TORCH_CUDA_ARCH_LIST (``;`` or spaces; the forms torch.utils.cpp_extension
    accepts: ``8.0``, ``8.6+PTX``, ``9.0a``, names such as ``Ampere``, and ``10.0f``) that can be
    built, and a note for every entry that cannot: not an arch, or not in ``supported`` (nvcc's
    ``--list-gpu-code``). Never raises: the CPU part must not be lost over an arch list."""
    text = arch_list.replace(" ", ";")
    for name, expansion in NAMED_CUDA_ARCHS:
        text = text.replace(name, expansion)
    archs: List[CudaArch] = []
    notes: List[str] = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        found = _ARCH_ENTRY.fullmatch(entry)
        if found is None:
            notes.append(f"{entry!r} skipped: not an arch like 8.0, 8.6+PTX, 9.0a, 10.0f or a name such as Ampere")
            continue
        arch = CudaArch(int(found.group(1)), int(found.group(2)), found.group(3), bool(found.group(4)))
        if supported is not None and arch.code not in supported:
            notes.append(f"{entry} skipped: this nvcc cannot build {arch.code} "
                         f"(it builds {', '.join(sorted(supported, key=lambda c: int(c[3:])))})")
        elif arch not in archs:
            archs.append(arch)
    return archs, notes


def cuda_gencode_flags(arch_list: str, supported: Optional[frozenset] = None) -> Tuple[List[str], List[str]]:
    """(nvcc -gencode flags, notes on skipped entries) for a TORCH_CUDA_ARCH_LIST."""
    archs, notes = parse_cuda_arch_list(arch_list, supported)
    return [flag for arch in archs for flag in arch.gencode_flags()], notes


def _default_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST when unset: the visible GPUs' archs (the last one also as PTX), as
    torch.utils.cpp_extension does; DEFAULT_CUDA_ARCHS on a machine without a usable GPU."""
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            found = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            return ";".join(f"{major}.{minor}" for major, minor in found) + "+PTX"
    except RuntimeError:  # a broken driver: build the default list, unavailable_reason says the rest
        pass
    return DEFAULT_CUDA_ARCHS


def cuda_mismatch(nvcc_version: Optional[str], torch_cuda: Optional[str]) -> Optional[str]:
    """Why the CUDA part must not be built with this nvcc for this torch: a different CUDA major
    version would load a second CUDA runtime beside torch's. None when they agree, when nvcc's
    version is unknown, or on a torch without CUDA (the CUDA part is then built only as a compile
    check; unavailable_reason refuses CUDA tensors there)."""
    if nvcc_version is None or torch_cuda is None:
        return None
    if nvcc_version.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"nvcc is CUDA {nvcc_version} but this torch was built with CUDA {torch_cuda}; "
                f"set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit")
    return None


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Everything a build depends on; ``key`` hashes all of it. ``cpu_cxx_flags`` and
    ``cpu_link_flags`` build the CPU part alone, the fallback when the CUDA part fails to build."""
    sources: Tuple[Path, ...]
    cxx: str
    cxx_flags: Tuple[str, ...]
    link_flags: Tuple[str, ...]
    nvcc: Optional[str]
    nvcc_flags: Tuple[str, ...]
    cuda_skipped: Optional[str]
    key: str
    cuda_archs: Tuple[str, ...] = ()
    cuda_notes: Tuple[str, ...] = ()
    cpu_cxx_flags: Tuple[str, ...] = ()
    cpu_link_flags: Tuple[str, ...] = ()

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

    def without_cuda(self, why: str) -> "BuildPlan":
        """The same build of the CPU part alone (same key: the cache records why CUDA is missing)."""
        return dataclasses.replace(self, cxx_flags=self.cpu_cxx_flags or self.cxx_flags,
                                   link_flags=self.cpu_link_flags or self.link_flags, nvcc=None, nvcc_flags=(),
                                   cuda_skipped=why, cuda_archs=())


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
    link_flags = ["-shared", "-fopenmp", f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", "-ldl",
                  f"-Wl,-rpath,{torch_dir / 'lib'}"]
    cpu_cxx_flags, cpu_link_flags = tuple(cxx_flags), tuple(link_flags)
    nvcc_flags: List[str] = []
    archs: List[CudaArch] = []
    notes: List[str] = []
    if nvcc:
        cuda_skipped = cuda_mismatch(nvcc_cuda_version(nvcc), torch.version.cuda)
        if cuda_skipped is None:
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or _default_arch_list()
            if arch_list.strip() == "native":
                arch_list = _default_arch_list()
            archs, notes = parse_cuda_arch_list(arch_list, nvcc_supported_codes(nvcc))
            if not archs:
                cuda_skipped = f"no arch of TORCH_CUDA_ARCH_LIST={arch_list!r} can be built ({'; '.join(notes)})"
        if cuda_skipped is not None:
            nvcc = None
    if nvcc:
        cuda_lib = _cuda_lib_dir(nvcc)
        cxx_flags.append("-DPNR_KERNELS_WITH_CUDA")
        link_flags += [f"-L{cuda_lib}", "-lcudart", f"-Wl,-rpath,{cuda_lib}"]
        nvcc_flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC", f"-I{csrc}", "--expt-relaxed-constexpr",
                      *[flag for arch in archs for flag in arch.gencode_flags()]]
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    for part in (torch.__version__, _version(cxx), nvcc and _version(nvcc), *cxx_flags, *link_flags,
                 *nvcc_flags):
        digest.update(str(part).encode() + b"\0")
    return BuildPlan(sources, cxx, tuple(cxx_flags), tuple(link_flags), nvcc, tuple(nvcc_flags),
                     cuda_skipped, digest.hexdigest(), tuple(a.entry for a in archs), tuple(notes),
                     cpu_cxx_flags, cpu_link_flags), None


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

    @property
    def cuda_archs(self) -> List[CudaArch]:
        """The archs the CUDA part was built for (empty without a CUDA part)."""
        return parse_cuda_arch_list(";".join(self.manifest.get("cuda_archs", ())))[0] if self.cuda else []


def _compile_and_link(plan: BuildPlan, staging: Path) -> List[List[str]]:
    """Compiles and links ``plan`` in ``staging``; returns the compile commands. The CUDA sources
    go first, so that a failing nvcc costs no C++ compilation that the fallback would redo."""
    commands = plan.compile_commands(staging)
    for group in ([c for c in commands if c[0].name.endswith(".cu.o")],
                  [c for c in commands if not c[0].name.endswith(".cu.o")]):
        if group:
            with ThreadPoolExecutor(max_workers=max(1, min(len(group), os.cpu_count() or 1))) as pool:
                list(pool.map(lambda job: _run(job[1]), group))
    objects = [str(obj) for obj, _ in commands]
    _run([plan.cxx, *objects, *plan.link_flags, "-o", str(staging / LIBRARY_NAME)])
    for obj in objects:
        os.remove(obj)
    return [command for _, command in commands]


def build(plan: Optional[BuildPlan] = None, *, force: bool = False) -> BuildResult:
    """Build the extension of ``plan`` (default: this environment's) unless it is cached. When the
    CUDA part fails to compile or link, the CPU part is built alone and the reason recorded."""
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
            built = plan
            try:
                commands = _compile_and_link(plan, staging)
            except BuildError as exc:
                if plan.nvcc is None:
                    raise
                built = plan.without_cuda(f"the CUDA part failed to build, so the CPU part was built alone: {exc}")
                for leftover in staging.iterdir():
                    leftover.unlink()
                commands = _compile_and_link(built, staging)
            manifest = {
                "key": plan.key,
                "torch": torch.__version__,
                "cuda": built.nvcc is not None,
                "cuda_skipped": built.cuda_skipped,
                "cuda_archs": list(built.cuda_archs),
                "cuda_notes": list(plan.cuda_notes),
                "commands": commands,
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
            if plan.directory.exists():
                shutil.rmtree(plan.directory)
            os.replace(staging, plan.directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return BuildResult(plan.library, True, manifest["cuda"], manifest["cuda_skipped"], manifest)


_LOAD_LOCK = threading.Lock()
_LOADED: Optional[Tuple[Optional[BuildResult], Optional[str]]] = None


def load() -> Tuple[Optional[BuildResult], Optional[str]]:
    """Build (or reuse) and load the extension once per process: (result, None) or (None, why not).
    Thread-safe: the first callers wait for one build and one ``load_library``."""
    global _LOADED
    if _LOADED is None:
        with _LOAD_LOCK:
            if _LOADED is None:
                _LOADED = _load()
    return _LOADED


def _load() -> Tuple[Optional[BuildResult], Optional[str]]:
    try:
        result = build()
    except (BuildError, OSError, subprocess.SubprocessError) as exc:
        return None, f"the native extension could not be built: {exc}"
    try:
        torch.ops.load_library(str(result.library))
    except OSError as exc:
        return None, f"the native extension {result.library} could not be loaded: {exc}"
    return result, None


def torch_cuda_unavailable_reason() -> Optional[str]:
    """Why this torch cannot run CUDA tensors at all, or None."""
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU or no working driver)"
    return None


def _capability_reason(device: torch.device, result: BuildResult) -> Optional[str]:
    """Why the built archs cannot run on ``device`` (instead of 'no kernel image' at launch)."""
    capability = torch.cuda.get_device_capability(device)
    archs = result.cuda_archs
    if not archs or any(arch.runs_on(capability) for arch in archs):
        return None
    built = ";".join(arch.entry for arch in archs)
    wanted = f"{capability[0]}.{capability[1]}"
    return (f"its CUDA kernels were built for TORCH_CUDA_ARCH_LIST={built!r}, which cannot run on "
            f"{torch.cuda.get_device_name(device)} (compute capability {wanted}); set "
            f"TORCH_CUDA_ARCH_LIST to include {wanted} (the build is cached per arch list)")


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type not in ("cpu", "cuda"):
        return f"it runs on CPU and CUDA tensors, got a {device.type} tensor"
    if device.type == "cuda":
        reason = torch_cuda_unavailable_reason()
        if reason is not None:
            return reason
    result, why_not = load()
    if result is None:
        return why_not
    if device.type == "cuda":
        if not result.cuda:
            return f"its CUDA part was not built ({result.cuda_skipped})"
        if dtype not in CUDA_DTYPES:
            return f"its CUDA kernels take float32, bfloat16 and float16, got {dtype}; use backend='reference'"
        return _capability_reason(device, result)
    if dtype not in CPU_DTYPES:
        return f"its CPU kernels take float64, float32, bfloat16 and float16, got {dtype}"
    return None


@functools.lru_cache(maxsize=None)
def kernels() -> dict:
    """This backend's one hookup: its kernel set per op family (see ``pnr_kernels.ops``), the
    extension's ops ``torch.ops.pnr_kernels.*`` (csrc/infonce_*, csrc/regularizers_*). Builds and
    loads the extension if that has not happened yet."""
    from .ops.infonce import CrossKernels, InfoNCEKernels
    from .ops.regularizers import RegularizerKernels, compose_paired_loss

    if load()[0] is None:
        raise RuntimeError(load()[1])
    ops = torch.ops.pnr_kernels
    composed_paired_loss = compose_paired_loss(ops.paired_terms_forward, ops.paired_terms_backward)

    def paired_loss(p1, *args):  # fused on the CPU; the CUDA part composes its two paired kernels
        if p1.device.type == "cpu":
            return ops.paired_loss_forward(p1, *args)
        return composed_paired_loss(p1, *args)

    return {
        "infonce": InfoNCEKernels(
            ops.infonce_lse_forward, ops.infonce_lse_backward,
            cross=CrossKernels(ops.infonce_cross_lse_forward, ops.infonce_cross_lse_backward, ("cpu",)),
            unit_rows_forward=ops.unit_rows_forward, unit_rows_backward=ops.unit_rows_backward,
            views_loss=ops.infonce_views_loss, views_loss_backward=ops.infonce_views_loss_backward.default),
        "regularizers": RegularizerKernels(
            ops.paired_terms_forward, ops.paired_terms_backward, ops.barlow_gram_forward,
            ops.barlow_gram_backward, ops.barlow_correlation_loss_forward, ops.barlow_correlation_loss_backward,
            paired_loss, barlow_correlation_form=lambda device: device.type == "cpu",
            barlow_pnr_loss=ops.barlow_pnr_loss_forward, barlow_pnr_device_types=("cpu",),
            paired_loss_autograd=ops.paired_loss_autograd, barlow_pnr_loss_autograd=ops.barlow_pnr_loss_autograd,
            autograd_device_types=("cpu",)),
    }


def release_cpu_output_pool() -> int:
    """Give the blocks kept by the native CPU kernels' output pool back to the system (see the
    module's docstring, "Memory"); returns their bytes (0 when the extension is not loaded)."""
    if _LOADED is None or _LOADED[0] is None:
        return 0
    return torch.ops.pnr_kernels.release_cpu_output_pool()


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.ArgumentParser(prog="pnr-kernels", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_command = commands.add_parser("build", help="build (or find in the cache) the native extension")
    build_command.add_argument("--force", action="store_true", help="rebuild even when cached")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan, why_not = make_plan()
        if plan is None:
            return _cli.fail("pnr-kernels build", f"nothing built: {why_not}")
        result = build(plan, force=args.force)
    except BuildError as exc:  # the whole compiler output: what to fix is in it
        print(exc, file=sys.stderr)
        return 1
    except OSError as exc:  # an unusable cache folder, as the library reports it (BackendUnavailableError)
        return _cli.fail("pnr-kernels build", f"the native extension cannot be built: {exc} "
                         f"(the cache is {cache_root()}: set PNR_KERNELS_CACHE to a writable folder)")
    print(f"{'built' if result.built else 'cached'}: {result.library}")
    print(f"C++ part: {', '.join(p.name for p in plan.sources if p.suffix == '.cpp')} ({plan.cxx})")
    if result.cuda:
        print(f"CUDA part: {', '.join(p.name for p in plan.sources if p.suffix == '.cu')} "
              f"({plan.nvcc}; {' '.join(f for f in plan.nvcc_flags if f.startswith('-gencode'))})")
    else:
        print(f"CUDA part skipped: {result.cuda_skipped}")
    for note in result.manifest.get("cuda_notes", ()):
        print(f"TORCH_CUDA_ARCH_LIST entry {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
