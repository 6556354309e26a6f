"""``pnr-bench``: forward, backward and full-step time, peak extra memory and distance to the
machine's measured limit of every loss x backend (and third-party peer) x size x dtype.

    pnr-bench --device cpu|cuda [--quick] [--sweep] [--interleave] [--losses ...] [--backends ...]
              [--json PATH] [--csv PATH] [--plot DIR]
    pnr-bench report --csv PATH [--docs MD] [--readme MD] [--plot DIR]
    pnr-bench limits [--remeasure] [--cache PATH]

Backends are the library's (reference, native, triton: those usable on the device) and peers
(:mod:`pnr_kernels.bench.peers`), extra ``backend`` values measured in the same run:
``torch_compile`` (the loss's reference under ``torch.compile``, default inductor; compilation
happens in the warm-up, outside the timings),
``pml`` (pytorch-metric-learning's NTXentLoss, for nt_xent) and ``infcl`` (Inf-CL's
``cal_inf_loss`` for nt_xent, on CUDA when ``inf_cl`` is importable).

Time: per repeat, after warm-up, one forward and then one backward (from no gradients, as after
``zero_grad(set_to_none=True)``), each timed (CPU: ``time.perf_counter``; CUDA: CUDA events
around each phase, synchronised once per repeat); reported as p20/p50/p80 over the repeats of the
forward, the backward and the full step (forward + backward of the same repeat). ``fwd_bwd_ms``
is the full step's median. Peak extra memory is what one forward + backward allocates beyond its
inputs: on CUDA ``max_memory_allocated`` minus the allocation before the step; on CPU the rise of
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over its resident set
before the step, measured in a fresh subprocess per case (with glibc returning every allocation of
64 KiB or more to the system when freed) so that no earlier allocation hides it.

``--interleave`` measures the candidates of one size (every backend and peer of one loss, dtype,
B, D, K) in one process (:func:`measure_interleaved`; on CPU one subprocess per size): each set
up, run once and its memory measured in turn, then timed taking turns, one step of each per
round in a new order each round (A, B, C, C, A, B, ...), so that machine noise hits all alike and
no candidate always runs in the caches one other left; each record lists the
candidates (``interleaved``) and the load average at the end of the rounds.

Throughput is reported where the loss's registry entry has a work model: GFLOP/s of the products
no exact kernel of the loss can avoid (``ops.infonce.infonce_flops``: each logit used once, a
symmetric block's pairs once, one product per gradient, no recomputation), GB/s for BYOL/VICReg-PNR (reading
p1, p2, f1, f2 and writing two gradients once). ``percent_of_peak`` divides it by the machine's
limit (:mod:`pnr_kernels.bench.limits`, ``pnr-bench limits``): on CPU, for a FLOP model, the
highest of the multiply-add loop's rate on all threads and torch.mm, measured once per machine
and cached; for a bytes model, the highest of a STREAM copy, triad and read: over a footprint
beyond the last-level cache, timed over it in the record's own rounds (each kernel one more turn
per round beside the candidates, the median of the rounds: the same statistic at the same
moments as the steps; ``limit_in_rounds``), or the cached STREAM limit where a record passes
that; over a footprint the cache holds, the cached (warm) limit. Peers are credited with the same work
model (the work the loss needs, not what they happen to do), so no record exceeds 100 % unless
the limit was measured on a busier machine than the record (then it is measured again). A CPU
record also carries the machine's step floor (``step_floor_ms``, measured and cached with the
limits): the full step of a loss that does no work, the framework's cost that no loss avoids,
which the report's Targets add to the time of the work at the limit.

``--sweep`` doubles the batch from 256 (quick: 256, 512, 1024; full: up to 16384 on CPU, 65536
on CUDA). A backend that runs out of memory or time at one size is stopped for the larger ones,
and so is one whose projection from its last sizes exceeds the memory or time budget; each such
case still gets a record saying so (``status``, ``error``).

Every option of every mode is checked before the first case (pnr_kernels/_cli.py): a bad value
is one line naming it and exit status 2; ``--json``/``--csv`` must be creatable (their missing
folders are created). A run in which every case failed exits with status 1.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _cli, backends, native
from ..registry import CONTRASTIVE, LOSSES, QUEUE, REGULARIZER, make_inputs
from .dtypes import DTYPES
from .limits import (MIN_STREAM_BYTES, StreamRounds, last_level_cache_bytes, machine_peak, raise_limit,
                     step_floor, timed_step)
from . import peers
from .peers import PEER_MAX_BATCH, PEERS

QUANTILES = (20, 50, 80)
SWEEP_START = 256
CPU_GRID_BATCHES = (256, 512, 1024, 2048, 4096)
SWEEP_MAX = {"cpu": 16384, "cuda": 65536}
PHASES = ("forward", "backward", "full")
OK, OOM, TIMEOUT, FAILED, SKIPPED = "ok", "out of memory", "timeout", "failed", "skipped"


@dataclasses.dataclass(frozen=True)
class Case:
    loss: str
    backend: str
    dtype: str
    batch_size: int
    dim: int
    queue_size: Optional[int] = None


def work_model(case: Case):
    """(throughput unit, amount) of one forward + backward from the loss's registry entry, or
    None: GFLOP/s for the fused contrastive op's FLOPs, GB/s for bytes moved."""
    spec = LOSSES[case.loss]
    if spec.work is None:
        return None
    itemsize = torch.empty((), dtype=DTYPES[case.dtype]).element_size()
    amount = spec.work(case.batch_size, case.dim, case.queue_size, itemsize)
    return {"FLOP": "GFLOP/s", "byte": "GB/s"}[spec.work_unit], amount


def percentiles(values: Sequence[float], quantiles: Sequence[int] = QUANTILES) -> Dict[str, float]:
    """``{"p20": ..., "p50": ..., "p80": ...}``: linear interpolation between the sorted values
    (numpy's default method); one value gives itself for every quantile."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentiles of no values")
    result = {}
    for q in quantiles:
        position = (len(xs) - 1) * q / 100
        low = math.floor(position)
        high = min(low + 1, len(xs) - 1)
        result[f"p{q}"] = xs[low] + (xs[high] - xs[low]) * (position - low)
    return result


# ---------------------------------------------------------------------------------------------
# The grid: which cases run


def _sizes(device: str, quick: bool):
    """(loss, batch, dim, queue, dtypes) grid per device; quick covers every loss once, small. The
    full CPU grid: the contrastive losses at B = 256 to 4096 (D = 128; MoCo's K = 16384 and, at
    B = 256, the paper's 65536), the regularisers at B = 256 and 4096 with D = 2048 and 128."""
    if device == "cpu":
        dtypes = ["float32"]
        if quick:
            contrastive = [(256, 128)]
            moco = [(128, 128, 4096)]
            regularizer = [(256, 512)]
        else:  # the committed table (issue 20): B = 256 to 4096, MoCo also at the paper's K = 65536
            contrastive = [(b, 128) for b in CPU_GRID_BATCHES]
            moco = [(b, 128, 16384) for b in CPU_GRID_BATCHES] + [(256, 128, 65536)]
            regularizer = [(b, d) for d in (2048, 128) for b in (256, 4096)]
    else:
        dtypes = ["bfloat16", "float32"]
        if quick:
            contrastive = [(1024, 256)]
            moco = [(256, 256, 16384)]
            regularizer = [(2048, 2048)]
        else:
            contrastive = [(1024, 256), (4096, 256), (32768, 256)]
            moco = [(256, 256, 65536)]
            regularizer = [(8192, 2048)]
    grid = []
    for loss, spec in LOSSES.items():
        if spec.kind == QUEUE:
            grid += [(loss, b, d, k, dtypes) for b, d, k in moco]
        elif spec.kind == CONTRASTIVE:
            grid += [(loss, b, d, None, dtypes) for b, d in contrastive]
        else:
            grid += [(loss, b, d, None, dtypes) for b, d in regularizer]
    return grid


def sweep_batches(device: str, quick: bool) -> List[int]:
    """Batch sizes of ``--sweep``: doubling from 256, three sizes when quick, else up to the
    device's maximum."""
    last = 4 * SWEEP_START if quick else SWEEP_MAX[device]
    sizes, b = [], SWEEP_START
    while b <= last:
        sizes.append(b)
        b *= 2
    return sizes


def _sweep_sizes(device: str, quick: bool):
    """The grid of ``--sweep``: each loss at the D (and K) of its first grid size, over the
    sweep's batch sizes."""
    grid, seen = [], set()
    for loss, _, d, k, dtypes in _sizes(device, quick):
        if loss in seen:
            continue
        seen.add(loss)
        grid += [(loss, b, d, k, dtypes) for b in sweep_batches(device, quick)]
    return grid


def make_cases(device: str, quick: bool, losses=None, backend_names=None, *, sweep: bool = False,
               notes: Optional[List[str]] = None, dtypes: Optional[Sequence[str]] = None) -> List[Case]:
    """The cases to run, smallest batch first within each loss; ``dtypes`` replaces the device's
    default dtypes; ``notes`` (when given) collects why a backend or peer is left out."""
    dev = torch.device(device)
    cases = []
    said = set()

    def note(text):
        if notes is not None and text not in said:
            said.add(text)
            notes.append(text)

    for loss, b, d, k, grid_dtypes in (_sweep_sizes if sweep else _sizes)(device, quick):
        if losses and loss not in losses:
            continue
        for dtype in dtypes or grid_dtypes:
            names = []
            for name in backends.BACKENDS:
                reason = backends.unavailable_reason(name, loss, dev, DTYPES[dtype])
                if reason is None:
                    names.append(name)
                elif not backend_names or name in backend_names:
                    note(f"{name} skipped for {loss} ({dtype}): {reason}")
            for peer in PEERS:
                reason = peers.unavailable_reason(peer, loss, device)
                if reason is not None:
                    if PEERS[peer] is not None and loss in PEERS[peer] and (not backend_names or peer in backend_names):
                        note(f"{peer} skipped for {loss}: {reason}")
                    continue
                # pml's NTXentLoss masks (positive pairs) x (negative pairs): O(N^3) memory, 2 GB at
                # N = 512 already; the sweep stops it by its memory projection instead
                if peer == "pml" and not sweep and b > PEER_MAX_BATCH:
                    continue
                names.append(peer)
            cases += [Case(loss, name, dtype, b, d, k) for name in names
                      if not backend_names or name in backend_names]
    return cases


# ---------------------------------------------------------------------------------------------
# One case, measured


def _forward_fn(case: Case, device: str):
    """A closure computing the case's loss (a scalar that requires a gradient), and the inputs
    it holds."""
    spec = LOSSES[case.loss]
    args, kwargs = make_inputs(case.loss, case.batch_size, case.dim, DTYPES[case.dtype], device=device,
                               requires_grad=True, queue_size=case.queue_size or 5)
    if case.backend in PEERS:
        return peers.forward_fn(case.backend, case.loss, args, kwargs, device), args
    fn = spec.function
    return (lambda: fn(*args, **kwargs, backend=case.backend)), args


def _step_fn(case: Case, device: str):
    """A closure running one forward + backward of the case (from no gradients, as after
    ``zero_grad(set_to_none=True)``), and the inputs it holds."""
    forward, args = _forward_fn(case, device)

    def step():
        for a in args:
            a.grad = None
        forward().backward()
    return step, args


# On the CPU fast steps get more rounds: the warm-up lasts at least MIN_WARMUP_S and the timed
# rounds at least MIN_TIMED_S (at most MAX_REPEATS of them), so that a 0.2 ms step's median is
# taken over hundreds of repeats, not ten that a single hiccup of a shared machine can move. A
# full (not --quick) run's rounds last at least FULL_MIN_TIMED_S: a size whose reference takes
# 0.1-0.5 s a step would otherwise time its fused candidates 10 times (VICReg-PNR at B = 4096,
# D = 2048, reference 0.33 s: 7 ms fused steps, now 23 rounds; BYOL-PNR there, reference 1 s a
# step, still gets the 10 repeats).
# (CUDA: the repeats asked for, so that a GPU check's time budget stays what it planned.)
MIN_WARMUP_S, MIN_TIMED_S, FULL_MIN_TIMED_S, MAX_REPEATS = 0.2, 1.0, 10.0, 500


def time_interleaved(candidates: Sequence[Tuple[Callable, Sequence[torch.Tensor]]], device: str, repeats: int,
                     warmup: int, min_warmup_s: Optional[float] = None, min_timed_s: Optional[float] = None,
                     max_repeats: int = MAX_REPEATS,
                     probes: Sequence[Callable[[], Dict[str, float]]] = ()) -> List[object]:
    """Milliseconds of the forward, the backward and the full step of each timed repeat, per
    candidate ``(forward, inputs)``, the candidates taking turns: ``warmup`` rounds of one step
    each (more until ``min_warmup_s`` has passed), then ``repeats`` rounds of one step each (more
    until ``min_timed_s`` has passed, ``max(repeats, max_repeats)`` at most) so that what the
    machine does meanwhile falls on all of them alike. Each round takes the candidates in a new
    order (a shuffle, seeded): a step finds the caches as the step before it left them, and in a
    fixed order every candidate would always follow the same one (the reference's temporaries
    evicting the next candidate's inputs: a 2-12 MiB memory-bound step 1.4x slower in the slot
    after it than in the slot after a fused kernel). The minimum times default to MIN_WARMUP_S and
    MIN_TIMED_S on the CPU, 0 elsewhere. Per candidate: its ``{phase: [ms, ...]}``, or the
    exception that stopped it (it leaves the later rounds; the others go on). ``probes`` (such as
    ``limits.StreamRounds``: a limit measured under the same moments of the machine) take their
    turns in the same shuffled order; each call returns ``{kind: ms}``, and their results follow
    the candidates' as ``{kind: [ms, ...]}``. The rounds stop when no candidate is left."""
    cpu = device == "cpu"
    min_warmup_s = (MIN_WARMUP_S if cpu else 0.0) if min_warmup_s is None else min_warmup_s
    min_timed_s = (MIN_TIMED_S if cpu else 0.0) if min_timed_s is None else min_timed_s
    results: List[object] = [{phase: [] for phase in PHASES} for _ in candidates]
    probed: List[Dict[str, List[float]]] = [defaultdict(list) for _ in probes]

    order = list(range(len(candidates) + len(probes)))
    shuffle = random.Random(0).shuffle

    def one_round(timed: bool) -> None:
        shuffle(order)
        for i in order:
            if i >= len(candidates):
                times = probes[i - len(candidates)]()
                if timed:
                    for kind, ms in times.items():
                        probed[i - len(candidates)][kind].append(ms)
                continue
            forward, inputs = candidates[i]
            if isinstance(results[i], BaseException):
                continue
            try:
                fwd, full = timed_step(forward, inputs, device)
            except Exception as error:  # noqa: BLE001  (one candidate failing is its record)
                results[i] = error
                continue
            if timed:
                results[i]["forward"].append(fwd)
                results[i]["backward"].append(full - fwd)
                results[i]["full"].append(full)

    def running() -> bool:
        return any(not isinstance(r, BaseException) for r in results)

    start, rounds = time.perf_counter(), 0
    while running() and (rounds < warmup or time.perf_counter() - start < min_warmup_s):
        one_round(False)
        rounds += 1
    start, rounds = time.perf_counter(), 0
    while running() and (rounds < repeats or (time.perf_counter() - start < min_timed_s
                                              and rounds < max(repeats, max_repeats))):
        one_round(True)
        rounds += 1
    return results + [dict(p) for p in probed]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_extra_mb(step) -> float:
    """Rise of the peak resident set during one step over the resident set before it. The native
    kernels' output pool is emptied first: blocks it kept from the previous step are resident
    already, and the step's gradients taken from them would not count."""
    native.release_cpu_output_pool()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    step()
    return max(0, _status_kb("VmHWM") - before) / 1024


def _keep_freed_memory() -> None:
    """After the memory measurement, let glibc keep freed blocks of up to 32 MiB for reuse, as a
    long-running training process ends up doing: the worker starts with every allocation of 64 KiB
    or more mmapped and unmapped when freed, which is what the peak-memory measurement needs but
    charges every step's large allocations with page faults (a 10x slower step for kernels that
    allocate per call). glibc's own adaptation raises the mmap threshold to the largest block
    freed so far (at most 32 MiB) and the trim threshold to twice that; both are set here, since
    an mmap threshold alone leaves the trim threshold at 128 KiB, and a large block freed at the
    top of the heap is then handed back to the kernel and faulted in again by the next step
    (NT-Xent at B = 1024, native: 16.8 ms a step instead of 11.9). No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2 ** 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 2 ** 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(error)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def base_record(case: Case, device: str) -> dict:
    record = dataclasses.asdict(case)
    record["device"] = device
    record["device_name"] = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    record["loadavg"] = list(os.getloadavg())
    record["threads"] = torch.get_num_threads()
    return record


def failed_record(case: Case, device: str, status: str, error: str, **extra) -> dict:
    """The record of a case that did not complete (or was not run): it says why instead of
    disappearing."""
    record = base_record(case, device)
    record.update(status=status, error=error, fwd_bwd_ms=None, peak_memory_mb=None, **extra)
    return record


def _record_failure(record: dict, case: Case, device: str, error: BaseException) -> dict:
    status = OOM if _is_oom(error) else FAILED
    if case.backend == "torch_compile" and status == FAILED:
        error_text = f"compile or run failed: {_first_line(error)}"
    else:
        error_text = status if status == OOM else _first_line(error)
    record.update(status=status, error=error_text, fwd_bwd_ms=None, peak_memory_mb=None)
    return record


def measure(case: Case, device: str, repeats: int, warmup: int, **timing) -> dict:
    """One record for one case, measured in this process (``timing``: time_interleaved's minimum
    times)."""
    return measure_interleaved([case], device, repeats, warmup, **timing)[0]


def measure_interleaved(cases: Sequence[Case], device: str, repeats: int, warmup: int, **timing) -> List[dict]:
    """One record per case, measured together in this process (``--interleave``: the candidates
    of one size). Each case is set up, run once (one-time work: compilation, autotuning, thread
    pools) and its peak extra memory measured, one after the other; then all are timed taking
    turns (:func:`time_interleaved`, ``warmup - 1`` more warm-up rounds). A case that fails gets
    a failed record and leaves the rounds. With more than one case, every record lists the
    ``interleaved`` backends and the load average at the end of the rounds."""
    records, prepared = [base_record(case, device) for case in cases], []
    for record, case in zip(records, cases):
        try:
            forward, inputs = _forward_fn(case, device)

            def step(forward=forward, inputs=inputs):
                for a in inputs:
                    a.grad = None
                forward().backward()

            step()  # one-time work outside the measurements
            for a in inputs:  # the step's own gradients count as its memory, the last step's do not
                a.grad = None
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                record["peak_memory_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            else:
                record["peak_memory_mb"] = _cpu_peak_extra_mb(step)
            prepared.append((record, case, forward, inputs))
        except Exception as error:  # noqa: BLE001  (a failed case is a record, not a crash)
            forward = inputs = step = None
            if device == "cuda":  # what the failed step held goes back before the next case
                torch.cuda.empty_cache()
            _record_failure(record, case, device, error)
    if device == "cpu":
        _keep_freed_memory()
    stream = _stream_rounds(cases) if device == "cpu" and prepared else None
    probes = stream.probes() if stream is not None else []
    results = time_interleaved([(f, i) for _, _, f, i in prepared], device, repeats, max(0, warmup - 1), **timing,
                               probes=probes)
    probed = {kind: ms for times in results[len(prepared):] for kind, ms in times.items()}
    del results[len(prepared):]
    bandwidth = stream.limit(probed) if probed else None  # none without a timed round
    load = list(os.getloadavg())
    for (record, case, _, _), times in zip(prepared, results):
        if len(cases) > 1:
            record["interleaved"] = [c.backend for c in cases]
            record["loadavg"] = load
        if isinstance(times, BaseException):
            _record_failure(record, case, device, times)
            continue
        record["status"] = OK
        record["repeats"] = len(times["full"])
        for phase in PHASES:
            record[f"{phase}_ms"] = percentiles(times[phase])
        record["fwd_bwd_ms"] = record["full_ms"]["p50"]
        model = work_model(case)
        if model is not None:
            unit, amount = model
            record["throughput_unit"] = unit
            record["work"] = amount
            record["throughput"] = amount / (record["fwd_bwd_ms"] * 1e-3) / 1e9
            if unit == "GB/s" and bandwidth is not None:
                record["limit_in_rounds"] = bandwidth
    return records


def _stream_rounds(cases: Sequence[Case]) -> Optional[StreamRounds]:
    """The STREAM kernels to time in the rounds of ``cases`` (one size's candidates) when their
    work model counts bytes beyond the last-level cache (``limits.last_level_cache_bytes``; any
    footprint where it is unknown): over the record's footprint, so that the memory bandwidth a
    percentage divides by is measured at the same moments as the steps. None for a FLOP model, for
    a footprint that fits the cache (held to the cached limit: the cache's bandwidth, measured
    warm), or when the buffer cannot be allocated (the cached limit serves)."""
    models = {work_model(case) for case in cases}
    footprint = max((amount for unit, amount in filter(None, models) if unit == "GB/s"), default=None)
    cache = last_level_cache_bytes()
    if footprint is None or (cache is not None and footprint <= cache):
        return None
    try:
        return StreamRounds(max(MIN_STREAM_BYTES, int(footprint)))
    except RuntimeError:  # out of memory under the run's budget
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def _limit_data(budget_mb: Optional[float]):
    """Cap this process's data segment (where glibc's mmapped blocks count) at its current size
    plus ``budget_mb``, so that a case past the budget fails with an allocation error, recorded
    as out of memory, instead of taking the shared machine's memory."""
    if not budget_mb:
        return
    import resource

    limit = _status_kb("VmData") * 1024 + int(budget_mb * 2 ** 20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def _measure_in_subprocess(case: Case, repeats: int, warmup: int, timeout_s: Optional[float] = None,
                           memory_budget_mb: Optional[float] = None) -> dict:
    return _measure_group_in_subprocess([case], repeats, warmup, timeout_s, memory_budget_mb)[0]


def _measure_group_in_subprocess(cases: Sequence[Case], repeats: int, warmup: int, timeout_s: Optional[float] = None,
                                 memory_budget_mb: Optional[float] = None,
                                 min_timed_s: Optional[float] = None) -> List[dict]:
    """The records of ``cases`` measured together (:func:`measure_interleaved`) in a fresh
    process; ``timeout_s`` is per case (the process gets their sum), the memory budget the
    process's, ``min_timed_s`` the rounds' (default MIN_TIMED_S)."""
    payload = json.dumps(dict(cases=[dataclasses.asdict(c) for c in cases], repeats=repeats, warmup=warmup,
                              memory_budget_mb=memory_budget_mb, min_timed_s=min_timed_s))
    # Allocations of 64 KiB and more are mmapped and unmapped when freed, so the resident set
    # follows what is live instead of what glibc keeps cached from the warm-up step.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    total_s = timeout_s * len(cases) if timeout_s else None
    try:
        out = subprocess.run([sys.executable, "-m", "pnr_kernels.bench", "--worker", payload],
                             capture_output=True, text=True, env=env, timeout=total_s)
    except subprocess.TimeoutExpired:
        what = "the case" if len(cases) == 1 else f"the {len(cases)} interleaved cases"
        return [failed_record(c, "cpu", TIMEOUT, f"timeout: {what} took more than {total_s:g} s") for c in cases]
    if out.returncode != 0:
        tail = " | ".join(out.stderr.strip().splitlines()[-3:])[-400:]
        status = OOM if out.returncode in (-9, 137) or "can't allocate memory" in out.stderr else FAILED
        return [failed_record(c, "cpu", status, f"worker exited with {out.returncode}: {tail}") for c in cases]
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The machine's own limit


def add_percent_of_peak(record: dict, peak: Callable[..., Dict[str, object]] = machine_peak,
                        raise_peak: Optional[Callable[..., Dict[str, object]]] = raise_limit,
                        floor: Callable[[str], Optional[Dict[str, object]]] = step_floor) -> dict:
    """Adds ``peak_throughput``, ``peak_how`` and ``percent_of_peak`` to a record that has a
    throughput: its throughput over the machine's limit. That is the bandwidth measured in the
    record's own rounds (``limit_in_rounds``, :class:`limits.StreamRounds`) where the record has
    one, else, and where the record's throughput passes it (the machine moved more bytes than the
    STREAM median showed), the cached limit (``limits.machine_peak``; for a bytes model, at the
    record's footprint), the higher of the two. A record above the cached limit has it measured
    again (``raise_peak``, ``limits.raise_limit``: it was measured at a busier moment) before it
    is divided by; one still above says the work model counts more than the kernel must do. On CPU
    also ``step_floor_ms`` and ``step_floor_how``: the machine's least full-step time of any loss
    (``floor``, ``limits.step_floor``), which the report's Targets add to the work at the limit."""
    if record.get("throughput") is None:
        return record
    measured_floor = floor(record["device"])
    if measured_floor is not None:
        record["step_floor_ms"] = measured_floor["value"]
        record["step_floor_how"] = measured_floor["how"]
    key = (record["device"], record["dtype"], record["throughput_unit"],
           record.get("work", 0) if record["throughput_unit"] == "GB/s" else 0)
    ref = record.get("limit_in_rounds")
    if ref is None or record["throughput"] > ref["value"]:
        cached = peak(*key)
        if record["throughput"] > cached["value"] and raise_peak is not None:
            cached = raise_peak(*key)
        ref = cached if ref is None else max(ref, cached, key=lambda limit: limit["value"])
    record["peak_throughput"] = ref["value"]
    record["peak_how"] = ref["how"]
    record["percent_of_peak"] = 100 * record["throughput"] / ref["value"]
    return record


# ---------------------------------------------------------------------------------------------
# The run: cases in order, a backend stopped at its limit


@dataclasses.dataclass
class Budget:
    """Per-case limits: wall time of one case (its process, compilation included) and the
    memory a case may take beyond its inputs."""
    case_timeout_s: Optional[float] = None
    memory_mb: Optional[float] = None


def _series(case: Case):
    return (case.loss, case.backend, case.dtype, case.dim, case.queue_size)


def _project(history: List[Tuple[int, float]], batch: int, floor_exponent: float, first_exponent: float) -> float:
    """Value at ``batch`` extrapolated from (batch, value) points as a power law: the exponent
    of the last two points (at least ``floor_exponent``), or ``first_exponent`` from one."""
    (b1, v1) = history[-1]
    exponent = first_exponent
    if len(history) >= 2:
        b0, v0 = history[-2]
        exponent = floor_exponent
        if v0 > 0 and v1 > 0 and b1 != b0:
            exponent = max(floor_exponent, math.log(v1 / v0) / math.log(b1 / b0))
    return v1 * (batch / b1) ** exponent


def _growth(loss: str) -> Tuple[float, float, float, float]:
    """How a loss's (memory, time) may grow with the batch, for the projections: (memory's least
    exponent, memory's exponent from a single size, time's least exponent, time's from one size).
    The contrastive losses' baselines materialise N x N logits (memory from one size assumed
    cubic, to be safe); the regularisers' work and memory are linear in B (Barlow's D x D terms
    do not grow with it)."""
    if LOSSES[loss].kind == REGULARIZER:
        return 1, 1, 1, 1
    return 2, 3, 2, 2


def run_cases(cases: Sequence[Case], measure_case: Callable[[Case], dict], *, device: str, budget: Budget,
              repeats: int, warmup: int, on_record: Callable[[dict], None] = lambda r: None) -> List[dict]:
    """Measures ``cases`` in order with ``measure_case``. A series (loss, backend, dtype, D, K)
    that failed (out of memory, timeout, error) is not run at larger batches, nor is one whose
    projection from its last sizes (time and memory as power laws of the batch, see
    :func:`_growth`) exceeds the budget: those cases get a ``skipped`` record saying why."""
    return run_groups([[case] for case in cases], lambda group: [measure_case(group[0])], device=device,
                      budget=budget, repeats=repeats, warmup=warmup, on_record=on_record)


def interleave_groups(cases: Sequence[Case]) -> List[List[Case]]:
    """``cases`` in order, consecutive cases of one size (loss, dtype, B, D, K) grouped: the
    candidates ``--interleave`` times together."""
    groups: List[List[Case]] = []
    for case in cases:
        size = (case.loss, case.dtype, case.batch_size, case.dim, case.queue_size)
        last = groups[-1][0] if groups else None
        if last is not None and (last.loss, last.dtype, last.batch_size, last.dim, last.queue_size) == size:
            groups[-1].append(case)
        else:
            groups.append([case])
    return groups


def run_groups(groups: Sequence[Sequence[Case]], measure_group: Callable[[List[Case]], List[dict]], *, device: str,
               budget: Budget, repeats: int, warmup: int,
               on_record: Callable[[dict], None] = lambda r: None) -> List[dict]:
    """:func:`run_cases` for groups of cases measured together (``measure_group`` gives one
    record per case it is given): a case whose series is stopped or projected past the budget is
    left out of its group's measurement with a ``skipped`` record."""
    records = []
    stopped: Dict[tuple, str] = {}
    history: Dict[tuple, List[Tuple[int, float, float]]] = {}

    def stop_reason(case):
        key = _series(case)
        reason = stopped.get(key)
        points = history.get(key)
        if reason is None and points:
            memory_floor, memory_first, time_floor, time_first = _growth(case.loss)
            if budget.memory_mb:
                mb = _project([(b, m) for b, _, m in points], case.batch_size, memory_floor, memory_first)
                if mb > budget.memory_mb:
                    reason = (f"projected peak memory {mb:.0f} MB at batch {case.batch_size} exceeds the "
                              f"budget of {budget.memory_mb:.0f} MB")
            if reason is None and budget.case_timeout_s:
                ms = _project([(b, t) for b, t, _ in points], case.batch_size, time_floor, time_first)
                seconds = ms * (repeats + warmup + 2) / 1e3
                if seconds > budget.case_timeout_s:
                    reason = (f"projected {seconds:.0f} s for batch {case.batch_size} exceeds the "
                              f"per-case time budget of {budget.case_timeout_s:g} s")
            if reason is not None:
                stopped[key] = reason
        return reason

    for group in groups:
        reasons = [stop_reason(case) for case in group]
        run = [case for case, reason in zip(group, reasons) if reason is None]
        measured = iter(measure_group(run) if run else [])
        for case, reason in zip(group, reasons):
            if reason is not None:
                record = failed_record(case, device, SKIPPED, f"skipped: {reason}")
            else:
                record = next(measured)
                key = _series(case)
                if record.get("status", OK) != OK:
                    stopped[key] = f"{case.backend} stopped after batch {case.batch_size}: {record['error']}"
                elif record.get("fwd_bwd_ms") is not None:
                    history.setdefault(key, []).append(
                        (case.batch_size, record["fwd_bwd_ms"], max(record.get("peak_memory_mb") or 0.0, 1.0)))
            records.append(record)
            on_record(record)
    return records


# ---------------------------------------------------------------------------------------------
# Output


def _fmt_ms(r: dict, phase: str) -> str:
    value = r.get(f"{phase}_ms")
    return f"{value['p50']:.2f}" if isinstance(value, dict) else "-"


def format_table(records: List[dict]) -> str:
    header = ["loss", "backend", "dtype", "B", "D", "K", "fwd ms", "bwd ms", "fwd+bwd ms", "p20-p80 ms",
              "peak MB", "throughput", "% of peak", "status"]
    rows = []
    for r in records:
        if r.get("error") or r.get("fwd_bwd_ms") is None:
            cells = ["-"] * 7 + [(r.get("error") or r.get("status") or "failed")[:120]]
        else:
            spread = r.get("full_ms")
            spread = f"{spread['p20']:.2f}-{spread['p80']:.2f}" if isinstance(spread, dict) else "-"
            tp = f"{r['throughput']:.1f} {r['throughput_unit']}" if "throughput" in r else "-"
            pct = f"{r['percent_of_peak']:.0f} %" if "percent_of_peak" in r else "-"
            cells = [_fmt_ms(r, "forward"), _fmt_ms(r, "backward"), f"{r['fwd_bwd_ms']:.2f}", spread,
                     f"{r['peak_memory_mb']:.1f}", tp, pct, OK]
        rows.append([r["loss"], r["backend"], r["dtype"], str(r["batch_size"]), str(r["dim"]),
                     str(r["queue_size"] or "-"), *cells])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _cli.ArgumentParser(
        prog="pnr-bench", description=__doc__.split("\n\n")[0],
        epilog="percent_of_peak divides each record's throughput (its work model: the products or bytes no "
               "exact kernel avoids) by the machine's limit, measured by the bench (CPU: cached per machine): "
               "the vector multiply-add rate on all the bench's threads (fma_peak.c, built with $CC or cc; "
               "without one, torch.mm alone, saying why) or torch.mm, whichever is higher, for FLOP models; "
               "for byte models, STREAM-style copy/triad/read bandwidth over the record's footprint (CPU, "
               "beyond the last-level cache: timed in the record's own rounds beside the candidates, the median "
               "of the rounds), else cached; a "
               "cached limit that a record goes past is measured again, the higher kept. CPU records also carry the step "
               "floor: the median full step of a loss doing no work (Python, autograd, the backward engine), "
               "which no loss beats and the report's Targets add to the work at the limit. "
               "pnr-bench limits --help: measure or remeasure them; "
               "pnr-bench report --help: regenerate the docs tables and figures from a CSV")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="one small size per loss (a few minutes on 2 CPU cores, peers' compilation included); "
                             "with --sweep, 3 sizes")
    parser.add_argument("--sweep", action="store_true",
                        help="batch sizes doubling from 256 (quick: 3 sizes; else up to 16384 on CPU, 65536 on CUDA)")
    parser.add_argument("--losses", nargs="+", choices=sorted(LOSSES), help="losses to run (default: all)")
    parser.add_argument("--backends", nargs="+", choices=[*backends.BACKENDS, *PEERS],
                        help=f"backends and peers to run (default: every usable one; peers: {', '.join(PEERS)})")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        help="input dtypes (default: float32 on CPU; bfloat16 and float32 on CUDA)")
    parser.add_argument("--repeats", type=_cli.positive_int, default=None,
                        help="timed repeats per case, at least (default 5 quick, 10 full; on the CPU a fast step "
                             "gets more, until its timed rounds last 1 s with --quick, 10 s without, at most 500)")
    parser.add_argument("--case-timeout", type=_cli.positive_float, default=600.0, metavar="S",
                        help="wall-clock budget of one case in seconds (CPU: its process is killed), and "
                             "the projected time past which a sweep stops a backend (default 600)")
    parser.add_argument("--max-memory-gb", type=_cli.positive_float, default=None, metavar="GB",
                        help="memory budget of one case (default: 40%% of MemAvailable on CPU, of free "
                             "memory on CUDA); a sweep stops a backend projected past it, and a CPU case "
                             "past it fails as out of memory")
    parser.add_argument("--json", metavar="PATH", type=_cli.output_file,
                        help="write the records as a JSON list to PATH (after every case; missing folders are "
                             "created, and PATH is checked to be writable before the first case)")
    parser.add_argument("--csv", metavar="PATH", type=_cli.output_file,
                        help="upsert the results as rows into this CSV (e.g. benchmarks/data/cpu.csv)")
    parser.add_argument("--plot", metavar="DIR", type=_cli.output_dir,
                        help="write PNG figures of this run's records to DIR (needs matplotlib)")
    parser.add_argument("--interleave", action="store_true",
                        help="time the candidates of each size (every backend and peer of one loss, dtype, B, D, "
                             "K) side by side in one process: each is set up, compiled and its memory measured, "
                             "then, after the warm-up, one step of each per round, in a new order each round "
                             "(A, B, C, C, A, B, ...), so that machine noise hits all alike and no candidate "
                             "always runs in the caches one other left; every record lists the candidates and the "
                             "load average at the end (CPU: one process per size, its time budget "
                             "--case-timeout per candidate)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def _default_memory_mb(device: str) -> float:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return 0.4 * free / 2 ** 20
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return 0.4 * int(line.split()[1]) / 1024
    return 4096.0


def _worker(payload: str) -> int:
    """CPU cases (one, or one size's candidates interleaved) in a fresh process; prints their
    records as a JSON list."""
    job = json.loads(payload)
    torch.manual_seed(0)
    _limit_data(job.get("memory_budget_mb"))
    cases = [Case(**c) for c in job["cases"]]
    print(json.dumps(measure_interleaved(cases, "cpu", job["repeats"], job["warmup"],
                                         min_timed_s=job.get("min_timed_s"))))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from . import report

        return report.main(argv[1:])
    if argv[:1] == ["limits"]:
        from . import limits

        return limits.main(argv[1:])
    if any(a.split("=")[0] == "--world-size" for a in argv):
        from . import distributed  # the data-parallel gather's cost (pnr_kernels/bench/distributed.py)

        return distributed.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and a CUDA build of torch")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install matplotlib)")
    repeats = args.repeats or (5 if args.quick else 10)
    warmup = 2
    notes: List[str] = []
    cases = make_cases(args.device, args.quick, args.losses, args.backends, sweep=args.sweep, notes=notes,
                       dtypes=args.dtypes)
    if not cases:
        parser.error("no case matches the requested losses and backends on this device")
    memory_mb = args.max_memory_gb * 1024 if args.max_memory_gb else _default_memory_mb(args.device)
    budget = Budget(case_timeout_s=args.case_timeout, memory_mb=memory_mb)
    for text in notes:
        print(f"note: {text}", file=sys.stderr, flush=True)

    if args.device == "cpu":
        min_timed_s = MIN_TIMED_S if args.quick else FULL_MIN_TIMED_S

        def measure_group(group):
            return _measure_group_in_subprocess(group, repeats, warmup, budget.case_timeout_s, budget.memory_mb,
                                                min_timed_s)
    else:
        def measure_group(group):
            torch.manual_seed(0)
            return measure_interleaved(group, "cuda", repeats, warmup)

    done = []

    def on_record(record):
        add_percent_of_peak(record)
        done.append(record)
        what = record.get("error") or f"{record['fwd_bwd_ms']:.2f} ms"
        print(f"  {len(done)}/{len(cases)} {record['loss']} {record['backend']} {record['dtype']} "
              f"B={record['batch_size']}: {what}", file=sys.stderr, flush=True)
        if args.json:  # rewritten after every case, so a run cut short keeps what it measured
            with open(_cli.make_parents(args.json), "w") as f:
                json.dump(done, f, indent=1)

    groups = interleave_groups(cases) if args.interleave else [[case] for case in cases]
    records = run_groups(groups, measure_group, device=args.device, budget=budget, repeats=repeats,
                         warmup=warmup, on_record=on_record)
    for record in records:  # every record against the final limits (one may have been raised meanwhile)
        add_percent_of_peak(record, raise_peak=None)
    if args.json:
        with open(_cli.make_parents(args.json), "w") as f:
            json.dump(records, f, indent=1)
    load = os.getloadavg()
    how = "each size's candidates interleaved in one process" if args.interleave else "one process per case"
    print(f"device: {records[0]['device_name']}; torch {torch.__version__}; p50 of at least {repeats} repeats "
          f"(p20-p80 shown) after {warmup} warm-up steps, {how}; load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}")
    print(f"budget per case: {budget.case_timeout_s:g} s, {budget.memory_mb:.0f} MB")
    for how in sorted({r["peak_how"] for r in records if "peak_how" in r}):
        print(f"percent_of_peak against: {how}")
    for ms, how in sorted({(r["step_floor_ms"], r["step_floor_how"]) for r in records if "step_floor_ms" in r}):
        print(f"step floor: {ms * 1e3:.1f} us, the {how}")
    for text in notes:
        print(f"note: {text}")
    print(format_table(records))
    if all(r.get("status", OK) != OK for r in records):
        first = next((r.get("error") for r in records if r.get("error")), None) or records[0].get("status")
        return _cli.fail("pnr-bench", f"every case failed; the first: {first}")
    if args.csv:
        from . import report

        rows = report.upsert_csv(args.csv, report.records_to_rows(records, repeats=repeats))
        print(f"upserted {rows} rows into {args.csv}")
    if args.plot:
        from . import report

        for path in report.plot_rows(report.records_to_rows(records, repeats=repeats), args.plot):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
