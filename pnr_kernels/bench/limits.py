"""The machine's limits that ``percent_of_peak`` divides by: measured on the machine, not assumed.

    pnr-bench limits [--remeasure] [--cache PATH]

CPU, FLOP/s: the vector multiply-add throughput of the cores (``fma_peak.c`` beside this file,
compiled with the system C compiler, ``$CC`` or ``cc``, on first use): float32 and float64
``vfmadd231ps/pd`` and, with AVX512-BF16, ``vdpbf16ps``, on 1 thread (per core) and on
``torch.get_num_threads()`` threads (all cores the bench uses), each the best of 3 rounds; and
``torch.mm`` of (4096 x 512)·(512 x 4096) in the dtype (smaller where one product takes 50 ms or more:
a dtype the CPU has no units for), the best of 5 (the BLAS may use units the
loop does not, such as AMX tiles). The FLOP limit of a dtype is the highest of: the all-threads
rate of its instruction (bfloat16 and float16 also float32's, since their products may be
computed in float32) and its torch.mm rate; without a C compiler (or on a CPU with neither
AVX2+FMA nor AVX-512) it is torch.mm's alone, and the limit's ``how`` says why. CPU, GB/s:
STREAM-style copy (y = x), triad (a = b + s c) and read (a sum of x), float32, with torch's
threads over arrays holding together the record's bytes (rounded down to a power of two, at
least 1 MiB, so that a case whose data stay in cache is held to the cache's bandwidth), bytes
read plus written, the best of 5 (20 below 64 MiB); the limit is the highest of the three (a
kernel that reads more than it writes can pass a copy's rate, not the read's). A record of
``pnr-bench`` whose footprint exceeds the last-level cache divides instead by the same kernels
timed over its own footprint in its own rounds (:class:`StreamRounds`, the median of the
rounds), and by the cached limit only where it passes that: the memory bandwidth of the 2-core
development VM moves by a fifth within minutes. A footprint that fits the cache is held to the
cached (warm) limit, the cache's bandwidth.

CPU, the step floor (ms): the least time a loss's full step takes in PyTorch whatever its
kernels, measured as the median of 200 steps (after 20 warm-up steps) of a loss that does no
work, each timed as the bench times every record (:func:`timed_step`: ``time.perf_counter``
around the forward and ``.backward()``, the gradients set to None before): a
``torch.autograd.Function`` over the regularisers' inputs, four 8 x 8 float32 tensors of which
two require a gradient, whose forward returns a new 0-d tensor without reading them and whose
backward returns two preallocated gradients. It is the framework's cost of a step (the Python
call, the autograd graph, the backward engine, the gradients' accumulation), the same at every
size; the Targets of ``pnr-bench report`` add it to the time of the work at the limit.

The CPU measurements are cached in ``<cache>/bench/limits-<machine>.json`` (``<cache>`` is the
native extension's cache, ``$PNR_KERNELS_CACHE`` or ``~/.cache/pnr_kernels``; ``<machine>`` a hash
of the host name, CPU model, core count, instruction sets, torch's threads and torch's version),
each entry with the load average when it was measured: a measurement taken on a busy machine is
too low (the step floor: too high), so an entry measured at a 1-minute load more than 0.5 above
the current one is measured again (the higher of the two kept; the step floor: the lower), and so
is the limit a record went past (:func:`raise_limit`); ``--remeasure`` replaces them all. A cache
file that cannot be read is measured again and replaced (with a warning), one without a step
floor (written before it was measured) gets it added; a loop that could not be built is not
cached. CUDA (not cached): ``torch.mm`` at N = 16384 and a copy of 256 MiB, as
``triton.testing.do_bench``'s minimum (the GPU's FMA rate is not measured separately); no step
floor.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _cli
from ..native import cache_root
from .dtypes import DTYPES

SOURCE = Path(__file__).with_name("fma_peak.c")
FMA_STEPS = 10_000_000  # iterations of the multiply-add loop per thread and round (about 40 ms of a core)
MM_N, MM_D = 4096, 512
MIN_STREAM_BYTES = 2 ** 20
FLOOR_B, FLOOR_D = 8, 8  # the step floor's inputs (its cost does not depend on their size)
FLOOR_WARMUP, FLOOR_REPEATS = 20, 200
SECTIONS = ("fma", "mm", "stream")  # in every cache file
ADDED_SECTIONS = ("floor",)  # missing from a cache file written before they were measured
BUSIER = 0.5  # a cached limit measured at a load average this much above the current one is remeasured
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_tile")


def _cpu_info() -> Dict[str, object]:
    name, flags = platform.processor() or "cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"host": platform.node(), "cpu": name, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "isa": sorted(f for f in _FLAGS if f in flags), "torch": torch.__version__}


def machine_key(info: Optional[Dict[str, object]] = None) -> str:
    """A hash of what the limits depend on (see :func:`_cpu_info`)."""
    text = json.dumps(info or _cpu_info(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_cache_path() -> Path:
    return cache_root() / "bench" / f"limits-{machine_key()}.json"


def _stamp() -> Dict[str, object]:
    return {"measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


# ---------------------------------------------------------------------------------------------
# Measurements


def fma_binary() -> Path:
    """fma_peak.c compiled into the cache (keyed by the source's hash); RuntimeError naming the
    compiler's message when it cannot be built."""
    source = SOURCE.read_bytes()
    target = cache_root() / "bench" / f"fma_peak-{hashlib.sha256(source).hexdigest()[:16]}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / "fma_peak"
        try:
            run = subprocess.run([compiler, "-O2", "-pthread", "-Wno-psabi", "-o", str(out), str(SOURCE)],
                                 capture_output=True, text=True)
        except OSError as error:
            raise RuntimeError(f"cannot run the C compiler {compiler!r} (set CC): {error}") from None
        if run.returncode != 0:
            raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {run.stderr.strip()[-400:]}")
        os.replace(out, target)
    return target


def measure_fma(threads: int, steps: int = FMA_STEPS) -> Dict[str, float]:
    """GFLOP/s per dtype of the multiply-add loop on ``threads`` threads ({} on a CPU without
    AVX2+FMA or AVX-512)."""
    run = subprocess.run([str(fma_binary()), str(threads), str(steps)], capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def _best_s(fn: Callable[[], object], runs: int, warmed_up: bool = False) -> float:
    """The shortest of ``runs`` timed calls of ``fn``, after one untimed call unless ``warmed_up``."""
    if not warmed_up:
        fn()
    best = math.inf
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


MM_SMALLEST_N, MM_ENOUGH_S = 512, 0.05


def measure_mm(dtype: str, runs: int = 5) -> float:
    """GFLOP/s of torch.mm (n x MM_D)·(MM_D x n) in ``dtype`` on the CPU: n = MM_N, or the first of
    512, 1024, ... whose product takes MM_ENOUGH_S or more (a dtype without hardware support, such
    as bfloat16 on a CPU without AVX512-BF16, runs at well under 1 GFLOP/s: 30 s a product at
    MM_N on the 2-core AMD VM)."""
    g = torch.Generator().manual_seed(0)
    n = MM_SMALLEST_N
    while True:
        a = torch.randn(n, MM_D, generator=g).to(DTYPES[dtype])
        b = torch.randn(MM_D, n, generator=g).to(DTYPES[dtype])
        start = time.perf_counter()
        torch.mm(a, b)
        if n >= MM_N or time.perf_counter() - start >= MM_ENOUGH_S:  # that product was the warm-up
            return 2 * n * n * MM_D / _best_s(lambda: torch.mm(a, b), runs, warmed_up=True) / 1e9
        n *= 2


def timed_step(forward: Callable, inputs: Sequence[torch.Tensor], device: str) -> Tuple[float, float]:
    """(forward ms, full step ms) of one forward + backward from no gradients (the ``inputs``'
    gradients set to None first): CPU, ``time.perf_counter`` around the forward and the
    ``.backward()``; CUDA, CUDA events, synchronised after the step. How the bench times every
    record, and the step floor."""
    for a in inputs:
        a.grad = None
    if device == "cuda":
        start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        loss = forward()
        middle.record()
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(middle), start.elapsed_time(end)
    start = time.perf_counter()
    loss = forward()
    middle = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    return (middle - start) * 1e3, (end - start) * 1e3


class _NoWork(torch.autograd.Function):
    """The cheapest loss of the regularisers' inputs (p1, p2, f1, f2): its forward returns a new
    0-d tensor without reading them, its backward the preallocated gradients ``grads`` of p1, p2."""

    @staticmethod
    def forward(ctx, p1, p2, f1, f2, grads):
        ctx.grads = grads
        return p1.new_zeros(())

    @staticmethod
    def backward(ctx, grad):
        return (*ctx.grads, None, None, None)


def measure_step_floor(repeats: int = FLOOR_REPEATS, warmup: int = FLOOR_WARMUP) -> float:
    """The step floor in ms: the median over ``repeats`` steps (after ``warmup``) of the full step
    (:func:`timed_step`) of :class:`_NoWork` over four FLOOR_B x FLOOR_D float32 tensors, the
    first two requiring a gradient."""
    p1, p2 = (torch.zeros(FLOOR_B, FLOOR_D, requires_grad=True) for _ in range(2))
    f1, f2, g1, g2 = (torch.zeros(FLOOR_B, FLOOR_D) for _ in range(4))
    steps = [timed_step(lambda: _NoWork.apply(p1, p2, f1, f2, (g1, g2)), (p1, p2), "cpu")[1]
             for _ in range(warmup + repeats)]
    return statistics.median(steps[warmup:])


def stream_bytes(nbytes: float) -> int:
    """The STREAM footprint for a record moving ``nbytes``: rounded down to a power of two, at
    least MIN_STREAM_BYTES."""
    return max(MIN_STREAM_BYTES, 2 ** int(math.floor(math.log2(max(nbytes, 1)))))


STREAM_ALIGN = 16  # float32 elements (64 bytes): each STREAM array starts on a cache line


def stream_kernels(total_bytes: int) -> Dict[str, Tuple[Callable[[], object], int]]:
    """The STREAM kernels over one float32 buffer of ``total_bytes`` (zeros, written once so that
    every page is backed), torch's threads: per kind, (the kernel, the bytes it reads plus writes).
    Copy: the buffer's first half into its second; triad: a = b + 3 c over its thirds; read: a
    sum of all of it."""
    buffer = torch.empty(max(total_bytes // 4, 3 * STREAM_ALIGN)).fill_(0)
    half = buffer.numel() // 2 // STREAM_ALIGN * STREAM_ALIGN
    third = buffer.numel() // 3 // STREAM_ALIGN * STREAM_ALIGN
    x, y = buffer[:half], buffer[half:2 * half]
    a, b, c = buffer[:third], buffer[third:2 * third], buffer[2 * third:3 * third]
    return {"copy": (lambda: y.copy_(x), 2 * x.nbytes),
            "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3 * a.nbytes),
            "read": (buffer.sum, buffer.nbytes)}


def measure_stream(total_bytes: int) -> Dict[str, float]:
    """GB/s (bytes read plus written) of each of :func:`stream_kernels`, the best of 5 runs (20
    below 64 MiB)."""
    runs = 20 if total_bytes < 64 * 2 ** 20 else 5
    return {kind: nbytes / _best_s(kernel, runs) / 1e9 for kind, (kernel, nbytes) in stream_kernels(total_bytes).items()}


def last_level_cache_bytes() -> Optional[int]:
    """The largest cache of CPU 0 in bytes (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            match = re.fullmatch(r"(\d+)([KMG]?)", (index / "size").read_text().strip())
        except OSError:
            continue
        if match:
            sizes.append(int(match.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[match.group(2)])
    return max(sizes) if sizes else None


IN_ROUNDS = "timed in the record's interleaved rounds"  # a StreamRounds how; report._in_rounds_footprint reads it


def stream_limit(gbs: Dict[str, float], total_bytes: int, where: str, detail: str) -> Dict[str, object]:
    """{"value", "unit", "how"}: the highest of the STREAM rates ``gbs`` (GB/s per kind) over
    ``total_bytes``, the how naming it, ``where`` it was measured, every rate and ``detail``."""
    kind = max(gbs, key=gbs.get)
    rates = ", ".join(f"{k} {v:.1f}" for k, v in gbs.items())
    how = f"STREAM {kind} over {total_bytes / 2 ** 20:g} MiB float32{where} ({rates} GB/s{detail})"
    return {"value": gbs[kind], "unit": "GB/s", "how": how}


class StreamRounds:
    """The bandwidth limit measured in the bench's own rounds (``pnr-bench``'s timing of a
    bytes-model loss whose footprint exceeds the last-level cache): each of :meth:`probes` runs
    one of :func:`stream_kernels` over ``total_bytes`` and returns its time in ms, so that the
    bench can time it as one more candidate of the interleaved rounds (each kernel its own turn:
    one kernel run right after another would find its buffer cached by it); :meth:`limit` is the
    highest of the kernels' GB/s at the median of their times over the rounds. The same statistic
    as a record's throughput (its median step), at the same moments of the machine: on a machine
    whose memory bandwidth drifts by a fifth within minutes (docs/benchmarks.md), a limit measured
    once, at another moment, moves a record's percentage by as much."""

    def __init__(self, total_bytes: int):
        self.total_bytes = total_bytes
        self.kernels = stream_kernels(total_bytes)

    def _time(self, kind: str) -> Dict[str, float]:
        kernel = self.kernels[kind][0]
        start = time.perf_counter()
        kernel()
        return {kind: (time.perf_counter() - start) * 1e3}

    def probes(self) -> List[Callable[[], Dict[str, float]]]:
        """One callable per kernel, for ``runner.time_interleaved``'s ``probes``."""
        return [functools.partial(self._time, kind) for kind in self.kernels]

    def limit(self, times: Dict[str, Sequence[float]]) -> Dict[str, object]:
        """{"value", "unit", "how"} from the rounds' ``times`` (ms per kind, as the probes
        returned them)."""
        gbs = {kind: nbytes / (statistics.median(times[kind]) * 1e-3) / 1e9
               for kind, (_, nbytes) in self.kernels.items()}
        rounds = len(next(iter(times.values())))
        return stream_limit(gbs, self.total_bytes, f" {IN_ROUNDS}",
                            f" at the median of {rounds} rounds, {torch.get_num_threads()} threads")


# ---------------------------------------------------------------------------------------------
# The cache


def _best(value) -> float:
    """The highest rate of a measurement (a number, or a dict of rates by kind)."""
    if isinstance(value, dict):
        return max((v for k, v in value.items() if k != "threads" and isinstance(v, (int, float))), default=0.0)
    return float(value)


class CpuLimits:
    """The CPU limits of this machine, measured on first use and kept in a JSON file."""

    def __init__(self, path: Optional[Path] = None, remeasure: bool = False, fma_steps: int = FMA_STEPS):
        self.path = Path(path) if path else default_cache_path()
        self.fma_steps = fma_steps
        self.failed: Dict[str, dict] = {}  # multiply-add loops that could not run, kept out of the file
        self.data = {"machine": _cpu_info(), **{section: {} for section in SECTIONS + ADDED_SECTIONS}}
        if not remeasure and self.path.exists():
            stored = self._load()
            if stored is not None and stored.get("machine") == self.data["machine"]:
                self.data = stored

    def _load(self) -> Optional[dict]:
        """The cache file's contents, or None (after a warning: its limits are measured again and
        the file replaced) when it cannot be read or is not a cache of limits."""
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            problem = f"cannot be read ({type(error).__name__}: {error})"
        else:
            if isinstance(stored, dict) and all(isinstance(stored.get(k), dict) for k in ("machine", *SECTIONS)):
                for section in ADDED_SECTIONS:
                    if not isinstance(stored.get(section), dict):
                        stored[section] = {}
                return stored
            problem = "is not a cache of limits (a JSON object with machine, fma, mm and stream)"
        print(f"pnr-bench: warning: the limits cache {self.path} {problem}; measuring the limits again",
              file=sys.stderr)
        return None

    def _save(self):
        """Writes the cache; when its folder cannot be written, a warning, and the limits stay in
        memory for this run."""
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)
        except OSError as error:
            print(f"pnr-bench: warning: cannot write the limits cache {self.path} ({error}); "
                  f"they will be measured again next run", file=sys.stderr)

    def _cached(self, section: str, key: str, field: str, measure: Callable[[], object],
                again: bool = False, lowest: bool = False) -> Dict[str, object]:
        """The cached entry, measured when missing, when it was measured on a busier machine
        than now (a 1-minute load average more than BUSIER above the current one) or when
        ``again``; a rate measured on a busy machine can only be too low, so of two the higher is
        kept, and a time (``lowest``) only too high, so of two the lower."""
        entry = self.data[section].get(key)
        try:
            if not again and entry["loadavg"][0] <= os.getloadavg()[0] + BUSIER and _best(entry[field]) >= 0:
                return entry
        except (TypeError, KeyError, IndexError, ValueError):  # missing, or not an entry of this file
            entry = None
        fresh = {field: measure(), **_stamp()}
        sign = -1 if lowest else 1
        if entry is None or sign * _best(fresh[field]) >= sign * _best(entry[field]):
            entry = fresh
        else:  # keep the better value, stamped now so that it is not measured again at this load
            entry = {**entry, "loadavg": fresh["loadavg"]}
        self.data[section][key] = entry
        self._save()
        return entry

    def fma(self, threads: int, again: bool = False) -> Dict[str, object]:
        key = str(threads)
        if key in self.failed:
            return self.failed[key]
        try:
            return self._cached("fma", key, "gflops", lambda: measure_fma(threads, self.fma_steps), again)
        except (RuntimeError, OSError, subprocess.CalledProcessError, ValueError) as error:
            # not cached: with a compiler installed later, the next run measures the loop
            text = getattr(error, "stderr", None) or str(error)
            self.failed[key] = {"gflops": {}, "error": " ".join(str(text).split())[:400], **_stamp()}
            return self.failed[key]

    def mm(self, dtype: str, again: bool = False) -> Dict[str, object]:
        return self._cached("mm", dtype, "gflops", lambda: measure_mm(dtype), again)

    def stream(self, total_bytes: int, again: bool = False) -> Dict[str, object]:
        return self._cached("stream", str(total_bytes), "gbs", lambda: measure_stream(total_bytes), again)

    def step_floor(self) -> Dict[str, object]:
        """{"value", "unit", "how"}: the step floor in ms (see :func:`measure_step_floor`)."""
        entry = self._cached("floor", "step", "ms", measure_step_floor, lowest=True)
        how = (f"median of {FLOOR_REPEATS} full steps of a loss doing no work (an autograd.Function over four "
               f"{FLOOR_B}x{FLOOR_D} float32 inputs, two with gradients; measured {entry['measured_at']}, "
               f"load {entry['loadavg'][0]:.2f})")
        return {"value": entry["ms"], "unit": "ms", "how": how}

    def measure_again(self, unit: str, dtype: str = "float32", nbytes: float = 0) -> None:
        """Measures the entries of one limit again (the higher of old and new kept): the FLOP
        limit's multiply-add loop on all threads and torch.mm, or the bandwidth at the footprint
        of ``nbytes``."""
        if unit == "GFLOP/s":
            self.fma(torch.get_num_threads(), again=True)
            self.mm(dtype, again=True)
        else:
            self.stream(stream_bytes(nbytes), again=True)

    def flop_limit(self, dtype: str) -> Dict[str, object]:
        """{"value", "unit", "how"}: the highest of the all-threads multiply-add rate (of the
        dtype's instruction; bfloat16/float16 also float32's) and torch.mm in the dtype."""
        threads = torch.get_num_threads()
        fma, single, mm = self.fma(threads), self.fma(1), self.mm(dtype)
        own = {"float32": ("float32",), "float64": ("float64",), "bfloat16": ("bfloat16", "float32"),
               "float16": ("float32",)}[dtype]
        candidates = {f"multiply-add loop {d}, {threads} threads": fma["gflops"][d] for d in own if d in fma["gflops"]}
        candidates[f"torch.mm {dtype} (up to {MM_N}x{MM_D})·({MM_D}x{MM_N})"] = mm["gflops"]
        best = max(candidates, key=candidates.get)
        per_core = ", ".join(f"{d} {v:.0f}" for d, v in single["gflops"].items() if d != "isa" and d != "threads")
        all_cores = ", ".join(f"{d} {v:.0f}" for d, v in fma["gflops"].items() if d != "isa" and d != "threads")
        if fma.get("error"):  # no C compiler, or the loop could not run: torch.mm alone, saying why
            loop = f"multiply-add loop not measured ({fma['error']})"
        else:
            loop = (f"multiply-add loop GFLOP/s per core [{per_core or 'none: neither AVX2+FMA nor AVX-512'}], "
                    f"on {threads} threads [{all_cores or 'none'}]")
        how = (f"{best}: {candidates[best]:.0f} GFLOP/s, the highest of: {loop}; "
               f"torch.mm {mm['gflops']:.0f} (measured {mm['measured_at']}, load {mm['loadavg'][0]:.2f})")
        return {"value": candidates[best], "unit": "GFLOP/s", "how": how}

    def byte_limit(self, nbytes: float) -> Dict[str, object]:
        """{"value", "unit", "how"}: the highest of the STREAM kernels over arrays of the
        record's footprint (see :func:`stream_bytes`)."""
        total = stream_bytes(nbytes)
        entry = self.stream(total)
        return stream_limit(entry["gbs"], total, "", f", {torch.get_num_threads()} threads; measured "
                            f"{entry['measured_at']}, load {entry['loadavg'][0]:.2f}")


@functools.lru_cache(maxsize=None)
def _cpu_limits() -> CpuLimits:
    return CpuLimits()


def raise_limit(device: str, dtype: str, unit: str, nbytes: float = 0) -> Dict[str, object]:
    """The limit after measuring it again, for a record that went past it: with a work model
    that counts no more than a kernel must do, a rate above the limit shows that the limit was
    measured at a busier moment (the load average lags behind a neighbour's burst), so the CPU's
    entries are measured again, the higher kept (CUDA: unchanged)."""
    if device == "cpu":
        _cpu_limits().measure_again(unit, dtype, nbytes)
        machine_peak.cache_clear()
    return machine_peak(device, dtype, unit, nbytes)


@functools.lru_cache(maxsize=None)
def step_floor(device: str) -> Optional[Dict[str, object]]:
    """The least full-step time of any loss on ``device``, ``{"value" (ms), "unit", "how"}``: CPU,
    :meth:`CpuLimits.step_floor` (cached per machine); None on CUDA (not measured)."""
    return _cpu_limits().step_floor() if device == "cpu" else None


@functools.lru_cache(maxsize=None)
def machine_peak(device: str, dtype: str, unit: str, nbytes: float = 0) -> Dict[str, object]:
    """The limit a record's throughput is divided by: ``{"value", "unit", "how"}``, per (device,
    dtype, unit, and for GB/s the record's bytes). CPU: :class:`CpuLimits` (cached per machine);
    CUDA: measured in this run (see the module's docstring)."""
    if device == "cpu":
        limits = _cpu_limits()
        return limits.flop_limit(dtype) if unit == "GFLOP/s" else limits.byte_limit(nbytes)
    from triton.testing import do_bench

    torch_dtype = DTYPES[dtype]
    generator = torch.Generator(device="cpu").manual_seed(0)
    if unit == "GB/s":
        x = torch.randn(2 ** 28 // torch.empty((), dtype=torch_dtype).element_size(), generator=generator)
        x = x.to(device, torch_dtype)
        y = torch.empty_like(x)
        ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="min")
        return {"value": 2 * x.nbytes / (ms * 1e-3) / 1e9, "unit": unit,
                "how": (f"minimum of triton.testing.do_bench, copy of {x.nbytes / 2 ** 20:.0f} MiB {dtype} "
                        f"(read + written)")}
    n, d = 16384, 256
    a = torch.randn(n, d, generator=generator).to(device, torch_dtype)
    b = torch.randn(d, n, generator=generator).to(device, torch_dtype)
    ms = do_bench(lambda: torch.mm(a, b), warmup=25, rep=200, return_mode="min")
    return {"value": 2 * n * n * d / (ms * 1e-3) / 1e9, "unit": unit,
            "how": f"minimum of triton.testing.do_bench, torch.mm {dtype} ({n}x{d})·({d}x{n})"}


# ---------------------------------------------------------------------------------------------
# pnr-bench limits


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.ArgumentParser(prog="pnr-bench limits", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--remeasure", action="store_true",
                        help="measure again and replace the cached limits (after a run on a busy machine)")
    parser.add_argument("--cache", metavar="PATH", type=_cli.output_file,
                        help="the cache file (default: <cache>/bench/limits-<machine>.json, see below)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["float32"],
                        help="dtypes whose FLOP limit to measure (default float32)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    limits = CpuLimits(args.cache, remeasure=args.remeasure)
    for dtype in args.dtypes:
        print(f"FLOP limit {dtype}: {limits.flop_limit(dtype)['how']}")
    for nbytes in (2 ** 24, 2 ** 28):
        print(f"byte limit at {nbytes / 2 ** 20:g} MiB: {limits.byte_limit(nbytes)['how']}")
    floor = limits.step_floor()
    print(f"step floor: {floor['value'] * 1e3:.1f} us, the {floor['how']}")
    print(f"cached in {limits.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
