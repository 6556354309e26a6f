"""Interleaved CPU timings of the native InfoNCE kernels against the reference and torch.compile.

    PYTHONPATH=$PWD python benchmarks/cpu_infonce_bench.py large   # native vs torch.compile, B = 1024, 2048
    PYTHONPATH=$PWD python benchmarks/cpu_infonce_bench.py small   # native vs reference, B = 256
    PYTHONPATH=$PWD python benchmarks/cpu_infonce_bench.py dtypes  # native fp32 vs bf16 vs fp16, B = 2048

Every case is one forward + backward (D = 128, fp32 unless stated). The candidates of a case run
interleaved (A, B, A, B, ...) after a warm-up, and the median of the repeats is printed together
with the load average, because the development machine is shared."""
import argparse
import os
import statistics
import time

import torch

from pnr_kernels import losses, reference
from pnr_kernels.bench import make_inputs

PUBLIC = {
    "simclr_pnr": losses.simclr_pnr_loss,
    "nt_xent": losses.nt_xent_loss,
    "moco": losses.moco_loss,
    "cassle_simclr": losses.cassle_simclr_regularizer,
    "moco_pnr": losses.moco_pnr_loss,
}


def step_fn(fn, args, kwargs):
    trainable = [a for a in args if a.requires_grad]

    def step():
        loss = fn(*args, **kwargs)
        torch.autograd.grad(loss, trainable)
    return step


def compare(title, candidates, repeats, warmup=2):
    for step in candidates.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, step in candidates.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    load = open("/proc/loadavg").read().split()[:3]
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    text = ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items())
    print(f"{title}: {text}  [median of {repeats}, load {' '.join(load)}]", flush=True)
    return medians


def native(loss):
    return lambda *a, **k: PUBLIC[loss](*a, **k, backend="native")


def ref(loss):
    return lambda *a, **k: PUBLIC[loss](*a, **k, backend="reference")


def large(repeats):
    for loss in ("simclr_pnr", "nt_xent"):
        compiled = torch.compile(reference.LOSSES[loss])
        for batch in (1024, 2048):
            args, kwargs = make_inputs(loss, batch, 128, torch.float32, requires_grad=True)
            m = compare(f"{loss} B={batch}", {"native": step_fn(native(loss), args, kwargs),
                                              "torch_compile": step_fn(compiled, args, kwargs)}, repeats)
            print(f"    torch_compile / native = {m['torch_compile'] / m['native']:.2f}")


def small(repeats):
    for loss in ("nt_xent", "cassle_simclr", "moco", "simclr_pnr"):
        args, kwargs = make_inputs(loss, 256, 128, torch.float32, requires_grad=True, queue_size=4096)
        m = compare(f"{loss} B=256" + (" K=4096" if loss == "moco" else ""),
                    {"native": step_fn(native(loss), args, kwargs),
                     "reference": step_fn(ref(loss), args, kwargs)}, repeats)
        print(f"    reference / native = {m['reference'] / m['native']:.2f}")


def dtypes(repeats):
    for loss in ("simclr_pnr", "nt_xent"):
        cands = {}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            args, kwargs = make_inputs(loss, 2048, 128, dtype, requires_grad=True)
            cands[str(dtype).split(".")[1]] = step_fn(native(loss), args, kwargs)
        compare(f"{loss} B=2048 native", cands, repeats)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["large", "small", "dtypes"], nargs="+")
    parser.add_argument("--repeats", type=int, default=7)
    opts = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"PNR_KERNELS_CPU_PRODUCTS={os.environ.get('PNR_KERNELS_CPU_PRODUCTS', '(unset)')}")
    for what in opts.what:
        globals()[what](opts.repeats)
