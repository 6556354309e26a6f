"""The bench's work model against counted operations, and its measured machine limits
(pnr_kernels/bench/limits.py): built, cached per machine, and above what a kernel reaches."""
import json
import shutil
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pnr_kernels.bench import limits
from pnr_kernels.bench import report as bench_report
from pnr_kernels.bench import runner as bench
from pnr_kernels.registry import LOSSES, make_inputs

FLOP_LOSSES = sorted(name for name, spec in LOSSES.items() if spec.work_unit == "FLOP" and spec.work)
BYTE_LOSSES = sorted(name for name, spec in LOSSES.items() if spec.work_unit == "byte" and spec.work)
NEG_INF = float("-inf")

# ---------------------------------------------------------------------------------------------
# The FLOP model against an independent minimal formulation of each loss: explicit matrix
# products of exactly the logits the loss uses (a row's own key left out where the loss masks it,
# a symmetric block's pairs once, a logit two terms share once), the rest elementwise. The
# formulation must give the reference's loss and gradients, and FlopCounterMode's count of its
# forward + backward must be the model's number.


def _all(rows, keys):
    """Every logit rows . keys (one product)."""
    return rows @ keys.T


def _off_diagonal(rows, keys):
    """rows[i] . keys[j] for j != i, -inf at (i, i): each row against the other keys only."""
    m, mk = rows.shape[0], keys.shape[0]
    vals, where = [], []
    for i in range(m):
        others = [j for j in range(mk) if j != i]
        vals.append((rows[i:i + 1] @ keys[others].T)[0])
        where += [(i, j) for j in others]
    index = torch.tensor(where).T
    return torch.full((m, mk), NEG_INF, dtype=rows.dtype).index_put((index[0], index[1]), torch.cat(vals))


def _symmetric(z):
    """z[i] . z[j] for i != j, each pair computed once (z[i] against z[i+1:]), -inf on the diagonal."""
    m = z.shape[0]
    vals = torch.cat([(z[i:i + 1] @ z[i + 1:].T)[0] for i in range(m - 1)])
    i, j = torch.triu_indices(m, m, 1)
    full = torch.full((m, m), NEG_INF, dtype=z.dtype)
    return full.index_put((i, j), vals).index_put((j, i), vals)


def _unit(*xs):
    return torch.nn.functional.normalize(torch.cat(xs) if len(xs) > 1 else xs[0], dim=1)


def _dot(a, b):
    return (a * b).sum(1)


def _simclr_pnr(z1, z2, p1, p2, f1, f2, *, temperature):
    b, t = z1.shape[0], temperature
    z, p, f = _unit(z1, z2), _unit(p1, p2), _unit(f1, f2)
    zz, pz = _symmetric(z), _off_diagonal(p, z)
    zf, pf = _off_diagonal(z, f), _off_diagonal(p, f)
    main = torch.logsumexp(torch.cat([zz, zf], 1) / t, 1) - _dot(z, z.roll(b, 0)) / t
    reg = torch.logsumexp(torch.cat([pf, pz], 1) / t, 1) - _dot(p, f) / t
    return main.mean() + reg.mean()


def _nt_xent(z1, z2, *, temperature):
    b, t = z1.shape[0], temperature
    z = _unit(z1, z2)
    return (torch.logsumexp(_symmetric(z) / t, 1) - _dot(z, z.roll(b, 0)) / t).mean()


def _queue_ce(anchor, positive, queues, t):
    pos = _dot(anchor, positive) / t
    return (torch.logsumexp(torch.cat([pos[:, None]] + [_all(anchor, q) / t for q in queues], 1), 1) - pos).mean()


def _moco(q1, q2, k1, k2, key_queue, *, temperature):
    q1, q2, k1, k2 = (_unit(x) for x in (q1, q2, k1, k2))
    t = temperature
    return (_queue_ce(q1, k2, [key_queue[1]], t) + _queue_ce(q2, k1, [key_queue[0]], t)) / 2


def _moco_pnr(q1, q2, k1, k2, p1, p2, f1, f2, key_queue, prev_queue, *, temperature, distill_temperature):
    q1, q2, k1, k2, p1, p2, f1, f2 = (_unit(x) for x in (q1, q2, k1, k2, p1, p2, f1, f2))
    t, td = temperature, distill_temperature
    view1, view0 = [key_queue[1], prev_queue[1]], [key_queue[0], prev_queue[0]]
    return (_queue_ce(q1, k2, view1, t) + _queue_ce(p1, f1, view1, td)
            + _queue_ce(q2, k1, view0, t) + _queue_ce(p2, f2, view0, td)) / 2


def _cassle_simclr(p1, p2, f1, f2, *, temperature):
    p, f, t = _unit(p1, p2), _unit(f1, f2), temperature
    logits = _all(p, f) / t  # d(F, P)'s logits are these, transposed
    pos = _dot(p, f) / t
    return ((torch.logsumexp(logits, 1) - pos).mean() + (torch.logsumexp(logits.T, 1) - pos).mean()) / 2


def _standardised(x):
    return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)


def _barlow_term(p, f, l, s):
    """s (sum_i (C_ii - 1)^2 + l sum_{i != j} C_ij^2), C = p^T f^ / B, in the cheaper form: C itself
    (one product, one for d p^), or sum C_ij^2 = tr(p^T G_f p^) / B^2 with G_f = f^ f^T."""
    b, d = p.shape
    ps, fs = _standardised(p), _standardised(f.detach())
    diagonal = (ps * fs).sum(0) / b  # C_ii, elementwise
    if 4 * b * d * d <= 6 * b * b * d:
        squares = ((ps.T @ fs / b) ** 2).sum()
    else:
        squares = (ps * ((fs @ fs.T) @ ps)).sum() / b ** 2
    return s * (((diagonal - 1) ** 2).sum() + l * (squares - (diagonal ** 2).sum()))


def _barlow_pnr(p1, p2, f1, f2, *, distill_weight, negative_weight, off_diagonal_weight, scale):
    def cos(p, f):
        return (_dot(p, f) / (p.norm(dim=1) * f.norm(dim=1))).mean()

    pos = _barlow_term(p1, f1, off_diagonal_weight, scale) + _barlow_term(p2, f2, off_diagonal_weight, scale)
    return distill_weight * pos / 2 + negative_weight * (cos(p1, f2) + cos(p2, f1)) / 2


MINIMAL = {"simclr_pnr": _simclr_pnr, "nt_xent": _nt_xent, "moco": _moco, "moco_pnr": _moco_pnr,
           "cassle_simclr": _cassle_simclr, "barlow_pnr": _barlow_pnr}


@pytest.mark.parametrize("b, d, k", [(3, 4, 5), (4, 3, 7), (2, 9, 3)])
@pytest.mark.parametrize("loss", FLOP_LOSSES)
def test_flop_model_is_the_counted_products_of_a_minimal_formulation(loss, b, d, k):
    args, kwargs = make_inputs(loss, b, d, torch.float64, requires_grad=True, queue_size=k)
    trainable = [a for a in args if a.requires_grad]
    want = LOSSES[loss].reference(*args, **kwargs)
    want_grads = torch.autograd.grad(want, trainable)
    with FlopCounterMode(display=False) as counter:
        got = MINIMAL[loss](*args, **kwargs)  # KeyError: a new FLOP-model loss needs its formulation here
        got.backward()
    # the formulation is the loss: same value and gradients as the fp64 reference
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, g in zip(trainable, want_grads):
        torch.testing.assert_close(a.grad, g, rtol=1e-10, atol=1e-12)
    assert counter.get_total_flops() > 0
    assert LOSSES[loss].work(b, d, k, 8) == counter.get_total_flops()


def test_the_reference_counts_more_than_the_model():
    """The reference computes every block in full (both sides of z . z, the masked diagonals, CaSSLe's
    logits twice): 20 N^2 D for SimCLR-PNR against the model's 17 N (N - 1) D."""
    b, d = 3, 4
    n = 2 * b
    args, kwargs = make_inputs("simclr_pnr", b, d, torch.float64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        LOSSES["simclr_pnr"].reference(*args, **kwargs).backward()
    assert counter.get_total_flops() == 20 * n * n * d
    assert LOSSES["simclr_pnr"].work(b, d, None, 8) == 17 * n * (n - 1) * d


@pytest.mark.parametrize("loss", BYTE_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_byte_model_is_one_read_of_each_input_and_one_write_of_each_gradient(loss, dtype):
    b, d = 6, 10
    args, _ = make_inputs(loss, b, d, dtype, requires_grad=True)
    moved = sum(a.nbytes for a in args) + sum(a.nbytes for a in args if a.requires_grad)
    assert LOSSES[loss].work(b, d, None, dtype.itemsize) == moved


def test_a_symmetric_block_is_its_own_key_block_with_both_gradients_and_no_diagonal():
    from pnr_kernels.ops.infonce import infonce_flops

    with pytest.raises(ValueError, match="block \\(0, 0\\) is symmetric only"):
        infonce_flops([4], [4], 2, [True], [False], [True], symmetric=[(0, 0)])
    with pytest.raises(ValueError, match="block \\(0, 0\\) is symmetric only"):
        infonce_flops([4], [4], 2, [True], [True], symmetric=[(0, 0)])
    with pytest.raises(ValueError, match="exclude_diagonal has 2 flags for 1 key blocks"):
        infonce_flops([4], [4], 2, [True], [True], [True, False])


def test_stream_footprint_rounds_down_to_a_power_of_two():
    assert limits.stream_bytes(3 * 2 ** 20) == 2 ** 21
    assert limits.stream_bytes(10) == limits.MIN_STREAM_BYTES


def test_stream_kernels_move_the_bytes_they_say_over_one_buffer():
    """Copy, triad and read over one float32 buffer of the footprint, each array on a cache line;
    each kernel's bytes are what it reads plus writes."""
    kernels = limits.stream_kernels(3 * 2 ** 20 + 100)
    assert set(kernels) == {"copy", "triad", "read"}
    copy, triad, read = (kernels[k][1] for k in ("copy", "triad", "read"))
    assert read == 3 * 2 ** 20 + 100
    assert 0 <= read - copy < 2 * 4 * limits.STREAM_ALIGN and 0 <= read - triad < 3 * 4 * limits.STREAM_ALIGN
    assert copy % (2 * 4 * limits.STREAM_ALIGN) == 0 and triad % (3 * 4 * limits.STREAM_ALIGN) == 0
    for kernel, _ in kernels.values():
        kernel()
    assert kernels["read"][0]().item() == 0  # zeros stay zeros: no overflow however many rounds
    assert set(limits.measure_stream(2 ** 20)) == {"copy", "triad", "read"}


def test_the_bandwidth_in_the_rounds_is_the_best_kernel_at_its_median_time():
    stream = limits.StreamRounds(2 ** 20)
    turns = [probe() for probe in stream.probes()]  # each kernel its own turn
    assert [list(t) for t in turns] == [["copy"], ["triad"], ["read"]] and all(t[k] > 0 for t in turns for k in t)
    nbytes = {kind: n for kind, (_, n) in stream.kernels.items()}
    times = {"copy": [1.0, 9.0, 2.0], "triad": [1.0, 1.5, 8.0], "read": [4.0, 0.1, 5.0]}
    limit = stream.limit(times)
    rates = {"copy": nbytes["copy"] / 2e-3 / 1e9, "triad": nbytes["triad"] / 1.5e-3 / 1e9,
             "read": nbytes["read"] / 4e-3 / 1e9}
    assert limit["value"] == pytest.approx(max(rates.values())) and limit["unit"] == "GB/s"
    best = max(rates, key=rates.get)
    assert limit["how"].startswith(f"STREAM {best} over 1 MiB") and "median of 3 rounds" in limit["how"]
    # the report tells these limits from the cached ones by their how
    assert bench_report._in_rounds_footprint(limit["how"]) == "1 MiB"
    cached = limits.stream_limit({"copy": 2.0}, 2 ** 20, "", ", 2 threads; measured now, load 0.00")
    assert cached["how"] == "STREAM copy over 1 MiB float32 (copy 2.0 GB/s, 2 threads; measured now, load 0.00)"
    assert bench_report._in_rounds_footprint(cached["how"]) is None


def test_the_last_level_cache_is_read_from_sysfs():
    cache = limits.last_level_cache_bytes()
    assert cache is None or cache >= 2 ** 15


def test_a_bytes_record_beyond_the_cache_divides_by_the_bandwidth_of_its_own_rounds(monkeypatch):
    """A bytes-model case whose footprint exceeds the last-level cache times the STREAM kernels
    over its footprint in its rounds and divides by them; one the cache holds, or a FLOP-model
    case, does not."""
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 2 ** 15)
    byol = bench.Case("byol_pnr", "native", "float32", 64, 32)
    record = bench.measure_interleaved([byol, bench.Case("byol_pnr", "reference", "float32", 64, 32)], "cpu",
                                       repeats=3, warmup=1, min_warmup_s=0, min_timed_s=0)[0]
    limit = record["limit_in_rounds"]
    assert limit["unit"] == "GB/s" and limit["value"] > 0
    assert "over 1 MiB float32 timed in the record's interleaved rounds" in limit["how"]
    assert "median of 3 rounds" in limit["how"]
    nt_xent = bench.measure(bench.Case("nt_xent", "native", "float32", 8, 4), "cpu", repeats=2, warmup=1,
                            min_warmup_s=0, min_timed_s=0)
    assert "limit_in_rounds" not in nt_xent
    assert bench._stream_rounds([byol]).total_bytes == limits.MIN_STREAM_BYTES
    big = bench.Case("byol_pnr", "native", "float32", 4096, 128)
    assert bench._stream_rounds([big]).total_bytes == bench.work_model(big)[1]
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: bench.work_model(big)[1])
    assert bench._stream_rounds([big]) is None  # the cache holds it: the cached (warm) limit
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: None)  # unknown: timed in the rounds
    assert bench._stream_rounds([big]).total_bytes == bench.work_model(big)[1]


def test_the_bandwidth_of_the_rounds_yields_to_the_cached_limit_only_where_a_record_passes_it(monkeypatch):
    cached, raised = [], []

    def peak(*key):
        cached.append(key)
        return {"value": 40.0, "unit": "GB/s", "how": "cached"}

    def raise_peak(*key):
        raised.append(key)
        return {"value": 50.0, "unit": "GB/s", "how": "raised"}

    in_rounds = {"value": 30.0, "unit": "GB/s", "how": "rounds"}
    record = {"device": "cuda", "dtype": "float32", "throughput_unit": "GB/s", "work": 8, "throughput": 24.0,
              "limit_in_rounds": in_rounds}
    bench.add_percent_of_peak(record, peak=peak, raise_peak=raise_peak)
    assert record["peak_how"] == "rounds" and record["percent_of_peak"] == pytest.approx(80.0) and not cached
    record = {**record, "throughput": 36.0}  # past the rounds' median: the cached limit, higher, serves
    bench.add_percent_of_peak(record, peak=peak, raise_peak=raise_peak)
    assert record["peak_how"] == "cached" and record["percent_of_peak"] == pytest.approx(90.0) and not raised
    record = {**record, "throughput": 45.0}  # past both: the cached one is measured again
    bench.add_percent_of_peak(record, peak=peak, raise_peak=raise_peak)
    assert record["peak_how"] == "raised" and record["percent_of_peak"] == pytest.approx(90.0)
    assert cached == [("cuda", "float32", "GB/s", 8)] * 2 and raised == [("cuda", "float32", "GB/s", 8)]
    record = {**record, "throughput": 20.0, "limit_in_rounds": {**in_rounds, "value": 10.0}}
    bench.add_percent_of_peak(record, peak=lambda *key: {"value": 5.0, "unit": "GB/s", "how": "lower"}, raise_peak=None)
    assert record["peak_how"] == "rounds" and record["percent_of_peak"] == pytest.approx(200.0)


def test_the_multiply_add_loop_builds_and_measures(monkeypatch, tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("PNR_KERNELS_CACHE", str(tmp_path))
    rates = limits.measure_fma(2, steps=20000)
    if not rates:
        pytest.skip("neither AVX2+FMA nor AVX-512 on this CPU")
    assert rates["threads"] == 2 and rates["float32"] > 0 and rates["float64"] > 0
    assert limits.fma_binary().parent == tmp_path / "bench"


def _stub_measurements(monkeypatch, calls):
    monkeypatch.setattr(limits, "measure_fma", lambda threads, steps: calls.append(("fma", threads)) or
                        {"float32": 100.0 * threads, "bfloat16": 20.0 * threads})
    monkeypatch.setattr(limits, "measure_mm", lambda dtype: calls.append(("mm", dtype)) or 150.0)
    monkeypatch.setattr(limits, "measure_stream", lambda total: calls.append(("stream", total)) or
                        {"copy": 8.0, "triad": 9.0})
    monkeypatch.setattr(limits, "measure_step_floor", lambda: calls.append(("floor",)) or 0.05)


def test_limits_are_measured_once_and_cached_per_machine(monkeypatch, tmp_path):
    calls = []
    _stub_measurements(monkeypatch, calls)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    path = tmp_path / "limits.json"
    first = limits.CpuLimits(path)
    flop = first.flop_limit("float32")
    assert flop["value"] == 200.0 and flop["how"].startswith("multiply-add loop float32, 2 threads")
    # bfloat16: float32's multiply-adds count too (its products may run in float32); torch.mm wins here
    assert first.flop_limit("bfloat16")["value"] == 200.0
    byte = first.byte_limit(3 * 2 ** 20)
    assert byte["value"] == 9.0 and "triad over 2 MiB" in byte["how"]
    measured = list(calls)
    assert ("fma", 1) in measured and ("fma", 2) in measured and ("stream", 2 ** 21) in measured
    again = limits.CpuLimits(path)
    assert again.flop_limit("float32") == flop and again.byte_limit(3 * 2 ** 20) == byte
    assert calls == measured  # read back from the file, nothing measured again
    limits.CpuLimits(path, remeasure=True).flop_limit("float32")
    assert len(calls) > len(measured)
    # another machine (here: another CPU model) does not reuse them
    real_info = limits._cpu_info
    monkeypatch.setattr(limits, "_cpu_info", lambda: {**real_info(), "cpu": "another CPU"})
    count = len(calls)
    limits.CpuLimits(path).flop_limit("float32")
    assert len(calls) > count
    assert limits.machine_key() != limits.machine_key(real_info())


def test_torch_mm_is_the_limit_where_it_beats_the_loop(monkeypatch, tmp_path):
    calls = []
    _stub_measurements(monkeypatch, calls)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    got = limits.CpuLimits(tmp_path / "limits.json").flop_limit("float32")
    assert got["value"] == 150.0 and got["how"].startswith("torch.mm float32")


def test_a_measured_record_is_within_the_machines_limit(monkeypatch, tmp_path):
    """A native contrastive step, credited with the model, does not exceed the measured limit."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("PNR_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(limits, "_cpu_limits", lambda: limits.CpuLimits(tmp_path / "limits.json"))
    limits.machine_peak.cache_clear()
    try:
        record = bench.measure(bench.Case("nt_xent", "native", "float32", 512, 128), "cpu", repeats=5, warmup=2)
        assert record["status"] == bench.OK, record.get("error")
        bench.add_percent_of_peak(record)
        assert 0 < record["percent_of_peak"] <= 100, record["peak_how"]
    finally:
        limits.machine_peak.cache_clear()


def test_without_a_c_compiler_the_limit_is_torch_mm_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("PNR_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(limits, "measure_mm", lambda dtype: 150.0)
    path = tmp_path / "limits.json"
    got = limits.CpuLimits(path, fma_steps=1000).flop_limit("float32")
    assert got["value"] == 150.0 and got["how"].startswith("torch.mm float32")
    assert "multiply-add loop not measured (cannot run the C compiler" in got["how"]
    # the failure is not cached: with a compiler, the next run measures the loop
    monkeypatch.setattr(limits, "measure_fma", lambda threads, steps: {"float32": 400.0})
    assert limits.CpuLimits(path).flop_limit("float32")["value"] == 400.0


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"machine": 3}', "\udcff"])
def test_an_unusable_cache_file_is_measured_again(monkeypatch, tmp_path, capsys, text):
    calls = []
    _stub_measurements(monkeypatch, calls)
    path = tmp_path / "limits.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert limits.CpuLimits(path).byte_limit(2 ** 20)["value"] == 9.0
    assert f"the limits cache {path}" in capsys.readouterr().err and calls == [("stream", 2 ** 20)]
    assert limits.CpuLimits(path).byte_limit(2 ** 20)["value"] == 9.0 and len(calls) == 1  # replaced


def test_pnr_bench_limits_prints_and_caches(monkeypatch, tmp_path, capsys):
    calls = []
    _stub_measurements(monkeypatch, calls)
    path = tmp_path / "sub" / "limits.json"
    assert bench.main(["limits", "--cache", str(path)]) == 0
    out = capsys.readouterr().out
    assert "FLOP limit float32:" in out and "byte limit at 256 MiB: STREAM triad" in out and str(path) in out
    assert "step floor: 50.0 us, the median of 200 full steps of a loss doing no work" in out
    assert path.exists() and json.loads(path.read_text())["floor"]["step"]["ms"] == 0.05


def test_every_loss_has_a_work_model():
    """Every loss's bench record has a distance to the machine's limit: the contrastive losses and
    Barlow-PNR (its D x D or B x B products) in FLOPs, BYOL/VICReg-PNR in bytes."""
    from pnr_kernels.registry import CONTRASTIVE, QUEUE

    contrastive = {name for name, spec in LOSSES.items() if spec.kind in (CONTRASTIVE, QUEUE)}
    assert set(FLOP_LOSSES) == contrastive | {"barlow_pnr"}
    assert set(FLOP_LOSSES) | set(BYTE_LOSSES) == set(LOSSES)


def test_a_limit_measured_on_a_busier_machine_is_measured_again_and_the_higher_kept(monkeypatch, tmp_path):
    rates = iter([5.0, 9.0, 7.0])
    monkeypatch.setattr(limits, "measure_mm", lambda dtype: next(rates))
    load = [3.0]
    monkeypatch.setattr(limits.os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    path = tmp_path / "limits.json"
    assert limits.CpuLimits(path).mm("float32")["gflops"] == 5.0  # measured at load 3
    assert limits.CpuLimits(path).mm("float32")["gflops"] == 5.0  # same load: cached
    load[0] = 1.0
    assert limits.CpuLimits(path).mm("float32")["gflops"] == 9.0  # quieter: measured again, higher
    load[0] = 0.0
    entry = limits.CpuLimits(path).mm("float32")  # quieter still, measured lower: the higher stays
    assert entry["gflops"] == 9.0 and entry["loadavg"][0] == 0.0
    assert limits.CpuLimits(path).mm("float32")["gflops"] == 9.0  # and is not measured a fourth time


def test_a_record_past_the_limit_has_the_limit_measured_again_and_the_higher_kept(monkeypatch, tmp_path):
    """A rate above the limit shows it was measured at a busier moment: it is measured again."""
    rates = iter([100.0, 300.0, 50.0])  # the all-threads loop: measured low, then high, then low again
    monkeypatch.setattr(limits, "measure_fma", lambda threads, steps: {"float32": next(rates) if threads == 2 else 1.0})
    monkeypatch.setattr(limits, "measure_mm", lambda dtype: 10.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    cpu = limits.CpuLimits(tmp_path / "limits.json")
    monkeypatch.setattr(limits, "_cpu_limits", lambda: cpu)
    limits.machine_peak.cache_clear()
    try:
        record = {"device": "cpu", "dtype": "float32", "throughput_unit": "GFLOP/s", "throughput": 150.0}
        bench.add_percent_of_peak(record)
        assert record["peak_throughput"] == 300.0 and record["percent_of_peak"] == pytest.approx(50.0)
        # again past it (the third measurement is lower): the higher one is kept, and the record says > 100 %
        record = {**record, "throughput": 400.0}
        bench.add_percent_of_peak(record)
        assert record["peak_throughput"] == 300.0 and record["percent_of_peak"] == pytest.approx(400 / 3)
        # without raising, the limit as it stands
        low = {**record, "throughput": 30.0}
        assert bench.add_percent_of_peak(low, raise_peak=None)["percent_of_peak"] == pytest.approx(10.0)
    finally:
        limits.machine_peak.cache_clear()


# ---------------------------------------------------------------------------------------------
# The step floor: the full step of a loss doing no work


def test_the_step_floor_is_a_measured_no_work_step():
    ms = limits.measure_step_floor(repeats=50, warmup=5)
    assert 0 < ms < 10
    # the no-work loss: a 0-d loss, the preallocated gradients accumulated, the data not read
    p1, p2 = (torch.ones(3, 2, requires_grad=True) for _ in range(2))
    grads = (torch.full((3, 2), 2.0), torch.full((3, 2), 3.0))
    loss = limits._NoWork.apply(p1, p2, torch.ones(3, 2), torch.ones(3, 2), grads)
    assert loss.dim() == 0
    loss.backward()
    assert torch.equal(p1.grad, grads[0]) and torch.equal(p2.grad, grads[1])


def test_the_step_floor_is_timed_as_the_records_are(monkeypatch):
    timed = []
    real = limits.timed_step
    monkeypatch.setattr(limits, "timed_step", lambda *args: timed.append(args) or real(*args))
    limits.measure_step_floor(repeats=7, warmup=2)
    assert len(timed) == 9 and all(device == "cpu" for _, _, device in timed)
    forward, inputs, _ = timed[0]
    assert [tuple(a.shape) for a in inputs] == [(limits.FLOOR_B, limits.FLOOR_D)] * 2
    assert all(a.requires_grad for a in inputs)
    assert bench.timed_step is real  # the runner times every record with it


def test_the_step_floor_is_measured_once_and_cached(monkeypatch, tmp_path):
    calls = []
    _stub_measurements(monkeypatch, calls)
    path = tmp_path / "limits.json"
    floor = limits.CpuLimits(path).step_floor()
    assert floor["value"] == 0.05 and floor["unit"] == "ms" and "loss doing no work" in floor["how"]
    assert limits.CpuLimits(path).step_floor() == floor and calls == [("floor",)]  # read back
    limits.CpuLimits(path, remeasure=True).step_floor()
    assert calls == [("floor",)] * 2


def test_a_step_floor_measured_on_a_busier_machine_is_measured_again_and_the_lower_kept(monkeypatch, tmp_path):
    floors = iter([0.09, 0.05, 0.07])
    monkeypatch.setattr(limits, "measure_step_floor", lambda: next(floors))
    load = [3.0]
    monkeypatch.setattr(limits.os, "getloadavg", lambda: (load[0], 0.0, 0.0))
    path = tmp_path / "limits.json"
    assert limits.CpuLimits(path).step_floor()["value"] == 0.09  # measured at load 3
    assert limits.CpuLimits(path).step_floor()["value"] == 0.09  # same load: cached
    load[0] = 1.0
    assert limits.CpuLimits(path).step_floor()["value"] == 0.05  # quieter: measured again, lower
    load[0] = 0.0
    floor = limits.CpuLimits(path).step_floor()  # quieter still, measured higher: the lower stays
    assert floor["value"] == 0.05 and "load 0.00" in floor["how"]
    assert limits.CpuLimits(path).step_floor()["value"] == 0.05  # and is not measured a fourth time


def test_a_cache_file_without_the_step_floor_keeps_its_limits_and_gets_the_floor(monkeypatch, tmp_path, capsys):
    calls = []
    _stub_measurements(monkeypatch, calls)
    path = tmp_path / "limits.json"
    limits.CpuLimits(path).mm("float32")
    old = json.loads(path.read_text())
    del old["floor"]  # a file written before the step floor was measured
    path.write_text(json.dumps(old))
    cpu = limits.CpuLimits(path)
    assert cpu.mm("float32")["gflops"] == 150.0 and calls == [("mm", "float32")]  # not measured again
    assert cpu.step_floor()["value"] == 0.05 and calls[-1] == ("floor",)
    stored = json.loads(path.read_text())
    assert stored["floor"]["step"]["ms"] == 0.05 and stored["mm"] == old["mm"]
    assert "warning" not in capsys.readouterr().err


def test_the_step_floor_is_below_a_real_step_and_on_every_cpu_record(monkeypatch, tmp_path):
    """A record carries the floor, which a real loss's step (BYOL-PNR's reference, 8 x 8) takes more than."""
    monkeypatch.setattr(limits, "_cpu_limits", lambda: limits.CpuLimits(tmp_path / "limits.json"))
    monkeypatch.setattr(limits, "measure_stream", lambda total: {"copy": 8.0})
    limits.step_floor.cache_clear()
    try:
        record = bench.measure(bench.Case("byol_pnr", "reference", "float32", 8, 8), "cpu", repeats=20, warmup=5)
        bench.add_percent_of_peak(record, raise_peak=None)
        assert 0 < record["step_floor_ms"] < record["full_ms"]["p20"], record
        assert "loss doing no work" in record["step_floor_how"]
        assert limits.step_floor("cuda") is None  # not measured on CUDA
    finally:
        limits.step_floor.cache_clear()
        limits.machine_peak.cache_clear()


def test_torch_mm_limit_stops_growing_at_a_slow_product(monkeypatch):
    """A dtype whose product is slow (bfloat16 without hardware support: 30 s at 4096 x 512 x 4096
    on the AMD VM) is measured at the first size that takes MM_ENOUGH_S, not at MM_N."""
    sizes = []

    def slow_mm(a, b):
        sizes.append(a.shape[0])
        time.sleep(limits.MM_ENOUGH_S)
        return a

    monkeypatch.setattr(limits.torch, "mm", slow_mm)
    rate = limits.measure_mm("float32", runs=2)
    assert set(sizes) == {limits.MM_SMALLEST_N} and len(sizes) == 3  # the probe (the warm-up), 2 runs
    assert rate <= 2 * limits.MM_SMALLEST_N ** 2 * limits.MM_D / limits.MM_ENOUGH_S / 1e9


def test_torch_mm_limit_of_a_fast_product_is_taken_at_full_size(monkeypatch):
    sizes = []
    real = torch.mm
    monkeypatch.setattr(limits.torch, "mm", lambda a, b: sizes.append(a.shape[0]) or real(a, b))
    monkeypatch.setattr(limits, "MM_ENOUGH_S", 60.0)  # every product here is "fast"
    limits.measure_mm("float32", runs=1)
    assert sizes[:4] == [512, 1024, 2048, 4096] and sizes[-1] == limits.MM_N
