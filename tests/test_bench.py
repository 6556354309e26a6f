"""The benchmark runner: its records, its memory measurement and its CLI."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from pnr_kernels.bench import peers
from pnr_kernels.bench import report as bench_report
from pnr_kernels.bench import runner as bench
from pnr_kernels.registry import LOSSES


def test_cpu_peak_memory_sees_a_step_allocation():
    def step():
        x = torch.ones(16 * 2 ** 20)  # 64 MiB, touched
        assert x.sum() > 0

    assert 60 <= bench._cpu_peak_extra_mb(step) < 200


def test_quick_grid_covers_every_loss_on_both_devices():
    for device in ("cpu", "cuda"):
        assert {case[0] for case in bench._sizes(device, quick=True)} == set(LOSSES)


def test_the_full_cpu_grid_is_the_committed_table():
    grid = {(loss, b, d, k) for loss, b, d, k, _ in bench._sizes("cpu", quick=False)}
    batches = {256, 512, 1024, 2048, 4096}
    for loss in ("simclr_pnr", "nt_xent", "cassle_simclr"):
        assert {b for name, b, d, k in grid if name == loss} == batches
    for loss in ("moco", "moco_pnr"):
        assert {b for name, b, d, k in grid if name == loss and k == 16384} == batches
        assert (loss, 256, 128, 65536) in grid
    for loss in ("byol_pnr", "vicreg_pnr", "barlow_pnr"):
        assert {d for name, b, d, k in grid if name == loss} == {128, 2048}
    # --quick stays small: one size per loss, B <= 256
    quick = bench._sizes("cpu", quick=True)
    assert len(quick) == len(LOSSES) and max(b for _, b, *_ in quick) <= 256


def test_work_model_simclr_pnr_is_17_n_n_minus_1_d():
    case = bench.Case("simclr_pnr", "reference", "float32", batch_size=64, dim=32)
    assert bench.work_model(case) == ("GFLOP/s", 17 * 128 * 127 * 32)


def test_cli_writes_records(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "-m", "pnr_kernels.bench", "--device", "cpu", "--quick", "--losses", "nt_xent", "byol_pnr",
         "--backends", "reference", "--repeats", "1", "--json", str(out), "--csv", str(tmp_path / "cpu.csv")],
        capture_output=True, text=True, check=True)
    records = json.loads(out.read_text())
    rows = bench_report.read_csv(str(tmp_path / "cpu.csv"))
    assert {(r["loss"], r["metric"]) for r in rows} >= {("nt_xent", "time"), ("nt_xent", "percent_of_peak"),
                                                        ("byol_pnr", "memory")}
    assert "percent_of_peak against: " in run.stdout and "GFLOP/s, the highest of" in run.stdout
    assert {r["loss"] for r in records} == {"nt_xent", "byol_pnr"}
    for r in records:
        for key in ("loss", "backend", "device", "dtype", "batch_size", "dim", "fwd_bwd_ms", "peak_memory_mb",
                    "forward_ms", "backward_ms", "full_ms", "status", "loadavg"):
            assert key in r
        assert r["fwd_bwd_ms"] > 0 and r["peak_memory_mb"] >= 0
    assert "| nt_xent" in run.stdout and "GFLOP/s" in run.stdout


def test_cli_rejects_an_empty_selection():
    run = subprocess.run([sys.executable, "-m", "pnr_kernels.bench", "--losses", "byol_pnr", "--backends", "pml"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "no case matches" in run.stderr


@pytest.mark.skipif(not peers.available("pml"), reason="pytorch-metric-learning not installed")
def test_pml_peer_computes_the_same_nt_xent():
    from pytorch_metric_learning.losses import NTXentLoss

    (z1, z2), kwargs = bench.make_inputs("nt_xent", 5, 4, torch.float64)
    ours = LOSSES["nt_xent"].function(z1, z2, **kwargs, backend="reference")
    theirs = NTXentLoss(temperature=kwargs["temperature"])(torch.cat([z1, z2]), torch.arange(5).repeat(2))
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=1e-6)


# --- sweep, peers, percentiles, CSV, plots -------------------------------------------------------



def _record(backend="native", batch=256, ms=10.0, memory=4.0, loss="nt_xent", **extra):
    case = bench.Case(loss, backend, "float32", batch, 128)
    record = bench.base_record(case, "cpu")
    record.update(status="ok", repeats=5, peak_memory_mb=memory, fwd_bwd_ms=ms,
                  forward_ms={"p20": 0.3 * ms, "p50": 0.4 * ms, "p80": 0.5 * ms},
                  backward_ms={"p20": 0.5 * ms, "p50": 0.6 * ms, "p80": 0.7 * ms},
                  full_ms={"p20": 0.9 * ms, "p50": ms, "p80": 1.1 * ms}, **extra)
    unit, amount = bench.work_model(case)
    record.update(throughput_unit=unit, work=amount, throughput=amount / (ms * 1e-3) / 1e9)
    return record


def test_percentiles_interpolate_like_numpy():
    import numpy as np

    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    got = bench.percentiles(values)
    assert set(got) == {"p20", "p50", "p80"}
    for q in (20, 50, 80):
        assert got[f"p{q}"] == pytest.approx(np.percentile(values, q))
    assert bench.percentiles([7.0]) == {"p20": 7.0, "p50": 7.0, "p80": 7.0}
    with pytest.raises(ValueError):
        bench.percentiles([])


def test_sweep_batches_double_from_256():
    assert bench.sweep_batches("cpu", quick=True) == [256, 512, 1024]
    assert bench.sweep_batches("cpu", quick=False)[-1] == 16384
    assert bench.sweep_batches("cuda", quick=False)[-1] == 65536
    grid = bench._sweep_sizes("cpu", quick=True)
    assert {loss for loss, *_ in grid} == set(LOSSES)
    assert sorted(b for loss, b, *_ in grid if loss == "nt_xent") == [256, 512, 1024]


def test_sweep_cases_carry_the_peers():
    notes = []
    cases = bench.make_cases("cpu", True, ["nt_xent"], sweep=True, notes=notes)
    names = {c.backend for c in cases}
    assert {"reference", "torch_compile"} <= names
    assert {c.batch_size for c in cases if c.backend == "torch_compile"} == {256, 512, 1024}
    if peers.available("pml"):
        assert {c.batch_size for c in cases if c.backend == "pml"} == {256, 512, 1024}
    assert any(n.startswith("infcl skipped for nt_xent") for n in notes)  # CPU: stated, not silent
    # the grid without --sweep keeps pml to its small sizes
    assert all(c.batch_size <= peers.PEER_MAX_BATCH for c in bench.make_cases("cpu", False) if c.backend == "pml")
    assert {c.dtype for c in bench.make_cases("cpu", True, ["nt_xent"], sweep=True, dtypes=["bfloat16"])} == \
        {"bfloat16"}
    assert {c.backend for c in bench.make_cases("cpu", True, ["byol_pnr"], sweep=True)} >= {"torch_compile"}
    assert "pml" not in {c.backend for c in bench.make_cases("cpu", True, ["byol_pnr"], sweep=True)}


def _fake_measure(table):
    """measure_case answering from {(backend, batch): (ms, MB) or an error status}."""
    def measure_case(case):
        answer = table[(case.backend, case.batch_size)]
        if isinstance(answer, str):
            return bench.failed_record(case, "cpu", answer, answer)
        record = _record(case.backend, case.batch_size, *answer)
        return record
    return measure_case


def test_sweep_stops_a_backend_after_it_fails():
    cases = [bench.Case("nt_xent", name, "float32", b, 128) for b in (256, 512, 1024, 2048) for name in ("a", "b")]
    table = {("a", 256): (1.0, 1.0), ("a", 512): bench.OOM,
             **{("b", b): (1.0, 1.0) for b in (256, 512, 1024, 2048)}}
    seen = []
    records = bench.run_cases(cases, _fake_measure(table), device="cpu", budget=bench.Budget(), repeats=3,
                              warmup=1, on_record=seen.append)
    assert seen == records and len(records) == len(cases)  # every case has a record, in order
    a = [r for r in records if r["backend"] == "a"]
    assert [r["status"] for r in a] == ["ok", bench.OOM, bench.SKIPPED, bench.SKIPPED]
    assert "a stopped after batch 512: out of memory" in a[2]["error"]
    assert all(r["fwd_bwd_ms"] is None for r in a[1:])
    assert all(r["status"] == "ok" for r in records if r["backend"] == "b")


def test_sweep_stops_a_backend_projected_past_its_budget():
    cases = [bench.Case("nt_xent", "a", "float32", b, 128) for b in (256, 512, 1024, 2048)]
    # memory x4 per doubling: 100, 400 MB, then 1600 projected > 1000 MB
    table = {("a", 256): (1.0, 100.0), ("a", 512): (1.0, 400.0)}
    records = bench.run_cases(cases, _fake_measure(table), device="cpu", budget=bench.Budget(memory_mb=1000),
                              repeats=3, warmup=1)
    assert [r["status"] for r in records] == ["ok", "ok", bench.SKIPPED, bench.SKIPPED]
    assert "projected peak memory 1600 MB at batch 1024" in records[2]["error"]
    # time: 10 s per step x4 per doubling, (3 + 1 + 2) steps per case, a 100 s budget
    table = {("a", 256): (2500.0, 1.0), ("a", 512): (10000.0, 1.0)}
    records = bench.run_cases(cases, _fake_measure(table), device="cpu", budget=bench.Budget(case_timeout_s=100),
                              repeats=3, warmup=1)
    assert [r["status"] for r in records] == ["ok", "ok", bench.SKIPPED, bench.SKIPPED]
    assert "per-case time budget" in records[2]["error"]


def test_regularizers_project_linearly_in_the_batch():
    """A regulariser's memory and time grow linearly with B: from one size at B = 256 (4 MB,
    1 ms) its B = 4096 case is projected at 64 MB and 16 ms, inside these budgets (a cubic
    projection, the contrastive losses' assumption from one size, would give 16 GB and skip it)."""
    cases = [bench.Case("vicreg_pnr", "a", "float32", b, 2048) for b in (256, 4096)]
    table = {("a", 256): (1.0, 4.0), ("a", 4096): (16.0, 64.0)}
    budget = bench.Budget(memory_mb=100, case_timeout_s=1)
    records = bench.run_cases(cases, _fake_measure(table), device="cpu", budget=budget, repeats=3, warmup=1)
    assert [r["status"] for r in records] == ["ok", "ok"]
    cases = [bench.Case("nt_xent", "a", "float32", b, 128) for b in (256, 4096)]
    table = {("a", 256): (1.0, 4.0)}
    records = bench.run_cases(cases, _fake_measure(table), device="cpu", budget=budget, repeats=3, warmup=1)
    assert [r["status"] for r in records] == ["ok", bench.SKIPPED]


def test_a_case_past_its_time_is_a_timeout_record():
    case = bench.Case("nt_xent", "reference", "float32", 256, 128)
    record = bench._measure_in_subprocess(case, repeats=1, warmup=1, timeout_s=0.05)
    assert record["status"] == bench.TIMEOUT and record["fwd_bwd_ms"] is None and "0.05 s" in record["error"]


def test_a_case_past_its_memory_budget_is_an_out_of_memory_record():
    # the reference builds (2B)^2 logits: 256 MB at B = 4096, far past a 32 MB budget
    case = bench.Case("nt_xent", "reference", "float32", 4096, 16)
    record = bench._measure_in_subprocess(case, repeats=1, warmup=1, memory_budget_mb=32)
    assert record["status"] == bench.OOM, record
    assert record["peak_memory_mb"] is None and record["loss"] == "nt_xent" and record["batch_size"] == 4096


def test_a_torch_compile_failure_is_a_record(monkeypatch):
    def broken_compile(fn, *args, **kwargs):
        def run(*a, **k):
            raise RuntimeError("inductor exploded\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    record = bench.measure(bench.Case("nt_xent", "torch_compile", "float32", 8, 4), "cpu", repeats=1, warmup=1)
    assert record["status"] == bench.FAILED
    assert record["error"] == "compile or run failed: RuntimeError: inductor exploded"
    assert record["fwd_bwd_ms"] is None and "| nt_xent" in bench.format_table([record])


def test_fast_steps_get_more_rounds_and_slow_ones_the_repeats_asked_for():
    """time_interleaved runs at least ``repeats`` timed rounds, more while they last less than
    ``min_timed_s`` (at most ``max_repeats``), and warm-up rounds for at least ``min_warmup_s``."""
    calls = []
    x = torch.zeros(2, requires_grad=True)

    def forward():
        calls.append(1)
        return x.sum()

    def timed_rounds(**limits):
        calls.clear()
        result = bench.time_interleaved([(forward, [x])], "cpu", 3, 1, **limits)[0]
        return len(result["full"]), len(calls)

    assert timed_rounds(min_warmup_s=0, min_timed_s=0) == (3, 4)
    timed, total = timed_rounds(min_warmup_s=0, min_timed_s=0.05, max_repeats=40)
    assert timed == 40 and total == 41
    timed, total = timed_rounds(min_warmup_s=0.05, min_timed_s=0, max_repeats=40)
    assert timed == 3 and total > 4


def test_a_measured_record_has_phase_percentiles():
    record = bench.measure(bench.Case("nt_xent", "reference", "float32", 8, 4), "cpu", repeats=3, warmup=1)
    # a step of well under a millisecond: more than the 3 repeats asked for, to fill MIN_TIMED_S
    assert record["status"] == "ok" and 3 < record["repeats"] <= bench.MAX_REPEATS
    for phase in ("forward", "backward", "full"):
        assert set(record[f"{phase}_ms"]) == {"p20", "p50", "p80"}
        assert 0 < record[f"{phase}_ms"]["p20"] <= record[f"{phase}_ms"]["p80"]
    assert record["fwd_bwd_ms"] == record["full_ms"]["p50"]
    assert len(record["loadavg"]) == 3


def test_percent_of_peak_divides_by_the_measured_peak():
    asked = []

    def peak(device, dtype, unit, dim):
        asked.append((device, dtype, unit, dim))
        return {"value": 2.0 * 42, "unit": unit, "how": "stub"}

    def floor(device):
        return {"value": 0.07, "unit": "ms", "how": "stub floor"} if device == "cpu" else None

    record = _record()
    record["throughput"] = 42.0
    bench.add_percent_of_peak(record, peak=peak, floor=floor)
    assert record["percent_of_peak"] == pytest.approx(50.0)
    assert record["peak_throughput"] == 84.0 and record["peak_how"] == "stub"
    assert record["step_floor_ms"] == 0.07 and record["step_floor_how"] == "stub floor"
    assert asked == [("cpu", "float32", "GFLOP/s", 0)]
    failed = bench.failed_record(bench.Case("nt_xent", "native", "float32", 256, 128), "cpu", bench.OOM,
                                 "out of memory")
    assert "percent_of_peak" not in bench.add_percent_of_peak(failed, peak=peak, floor=floor)
    on_cuda = bench.add_percent_of_peak({**_record(), "device": "cuda"}, peak=peak, floor=floor)
    assert "percent_of_peak" in on_cuda and "step_floor_ms" not in on_cuda


def test_machine_peak_is_measured_once_per_key(monkeypatch, tmp_path):
    from pnr_kernels.bench import limits

    calls = []
    monkeypatch.setattr(limits, "measure_fma",
                        lambda threads, steps: calls.append(threads) or {"float32": 10.0 * threads})
    monkeypatch.setattr(limits, "measure_mm", lambda dtype: 5.0)
    monkeypatch.setattr(limits, "_cpu_limits", lambda: limits.CpuLimits(tmp_path / "limits.json"))
    bench.machine_peak.cache_clear()
    try:
        first = bench.machine_peak("cpu", "float32", "GFLOP/s")
        assert first["value"] == 10.0 * limits.torch.get_num_threads() and "multiply-add loop float32" in first["how"]
        assert bench.machine_peak("cpu", "float32", "GFLOP/s") is first
        assert sorted(set(calls)) == sorted({1, limits.torch.get_num_threads()})
    finally:
        bench.machine_peak.cache_clear()


META = {"torch": "t", "triton": "", "pnr_kernels": "", "commit": "abc", "timestamp": "2026-01-01T00:00:00Z"}


def test_csv_upsert_replaces_rows_by_key(tmp_path):
    path = str(tmp_path / "data" / "cpu.csv")
    rows = bench_report.records_to_rows([_record("native", 256, 10.0), _record("reference", 256, 30.0)], meta=META)
    # time forward/backward/full, memory, throughput (no percent_of_peak: no peak in these records)
    assert {(r["mode"], r["metric"]) for r in rows if r["backend"] == "native"} == {
        ("forward", "time"), ("backward", "time"), ("full", "time"), ("full", "memory"), ("full", "throughput")}
    full = next(r for r in rows if r["backend"] == "native" and r["metric"] == "time" and r["mode"] == "full")
    assert (full["p20"], full["p50"], full["p80"], full["unit"], full["x_name"], full["x_value"]) == \
        ("9", "10", "11", "ms", "batch_size", "256")
    bench_report.upsert_csv(path, rows)
    assert len(bench_report.read_csv(path)) == 10
    again = bench_report.records_to_rows([_record("native", 256, 20.0), _record("native", 512, 40.0)], meta=META)
    bench_report.upsert_csv(path, again)
    stored = bench_report.read_csv(path)
    assert len(stored) == 15  # native 256 replaced, native 512 added, reference 256 kept
    full = [r for r in stored if r["backend"] == "native" and r["x_value"] == "256" and r["metric"] == "time"
            and r["mode"] == "full"]
    assert [r["p50"] for r in full] == ["20"]
    assert len({bench_report._key(r) for r in stored}) == len(stored)


def test_a_failed_record_keeps_its_rows_with_the_reason():
    failed = bench.failed_record(bench.Case("nt_xent", "reference", "float32", 1024, 128), "cpu",
                                 bench.TIMEOUT, "timeout: the case took more than 5 s")
    assert failed["fwd_bwd_ms"] is None and failed["status"] == bench.TIMEOUT
    rows = bench_report.records_to_rows([failed], meta=META)
    assert rows and all(r["status"] == "timeout: the case took more than 5 s" for r in rows)
    assert all(r["p50"] == "" for r in rows)
    assert {(r["mode"], r["metric"]) for r in rows} >= {("full", "time"), ("full", "memory")}


def _synthetic_rows():
    records = []
    for b, (ref, tc, nat) in zip((256, 512, 1024), ((10, 5, 4), (40, 20, 12), (160, 80, 40))):
        peak = dict(peak_throughput=200.0, peak_how="stub peak", percent_of_peak=None)
        for name, ms, mb in (("reference", ref, 0.02 * b), ("torch_compile", tc, 0.01 * b), ("native", nat, 0.001 * b)):
            record = _record(name, b, float(ms), mb, **peak)
            record["percent_of_peak"] = 100 * record["throughput"] / 200.0
            records.append(record)
    records.append(_record("pml", 256, 900.0, 2000.0))
    records.append(bench.failed_record(bench.Case("nt_xent", "pml", "float32", 512, 128), "cpu", bench.SKIPPED,
                                       "skipped: projected peak memory 16000 MB at batch 512 exceeds the budget"))
    return bench_report.records_to_rows(records, meta=META)


def test_target_verdicts():
    verdict = bench_report.target_verdict
    assert verdict(1.4, 1.3, 50.0, 70.0, False) == "met"
    assert verdict(1.2, 1.3, 50.0, 60.0, False) == "behind: 1.20x < 1.3x"
    # torch.compile at 90 % of the limit: 1.3x would need 117 %, more than any kernel can do
    assert verdict(1.05, 1.3, 90.0, 95.0, False) == "out of reach: 1.3x needs 117 % of the limit"
    assert verdict(2.0, 1.1, 10.0, 50.0, True) == "behind: 50 % < 80 % of the bandwidth"
    assert verdict(2.0, 1.1, 10.0, 85.0, True) == "met"
    assert verdict(None, 1.1, None, None, False) == "not measured"
    # a value that rounds to the target gets the decimals that show it short of it
    assert verdict(1.098, 1.1, 20.0, 30.0, False) == "behind: 1.098x < 1.1x"
    assert verdict(2.0, 1.1, 10.0, 79.62, True) == "behind: 79.6 % < 80 % of the bandwidth"
    assert verdict(1.29996, 1.3, 20.0, 30.0, False) == "behind: 1.3000x < 1.3x"  # 4 decimals at most


def test_target_verdicts_with_the_step_floor():
    """The best step is the floor + the work at the limit (torch.compile's time x its percent)."""
    verdict = bench_report.target_verdict
    # a bytes row of 6 us of traffic (torch.compile 0.3 ms at 2 %) under a 70 us floor: at most 7.89 %
    assert verdict(1.5, 1.1, 2.0, 3.0, True, peer_ms=0.3, floor_ms=0.07) == \
        "out of reach: at most 7.89 % of the bandwidth (step floor 70 us, 6.00 us of traffic)"
    # 4 ms of traffic (40 ms at 10 %): 98 % is reachable, so 50 % is behind and 85 % met
    assert verdict(2.0, 1.1, 10.0, 50.0, True, peer_ms=40.0, floor_ms=0.07) == \
        "behind: 50 % < 80 % of the bandwidth"
    assert verdict(2.0, 1.1, 10.0, 85.0, True, peer_ms=40.0, floor_ms=0.07) == "met"
    assert verdict(2.0, 1.1, 10.0, 80.0, True, peer_ms=40.0, floor_ms=0.07) == "met"
    # a FLOP row: torch.compile 0.2 ms at 50 % (0.1 ms of work) + 70 us: at most 1.18x, below 1.3x (the
    # limit alone would allow 2x)
    assert verdict(1.05, 1.3, 50.0, 52.0, False, peer_ms=0.2, floor_ms=0.07) == \
        "out of reach: at most 1.18x with a step floor of 70 us"
    assert verdict(1.05, 1.3, 50.0, 52.0, False) == "behind: 1.05x < 1.3x"
    assert verdict(1.2, 1.3, 50.0, 60.0, False, peer_ms=20.0, floor_ms=0.07) == "behind: 1.20x < 1.3x"
    assert verdict(1.4, 1.3, 50.0, 70.0, False, peer_ms=20.0, floor_ms=0.07) == "met"


def test_targets_table_from_rows():
    table = bench_report.targets_table(_synthetic_rows())
    body = [line.split(" | ") for line in table[2:]]
    # native 4, 12, 40 ms against torch_compile 5, 20, 80 ms: 1.25x (target 1.1x at B = 256), 1.67x, 2x
    assert [row[4] for row in body] == ["1.25x", "1.67x", "2.00x"]
    assert [row[5] for row in body] == ["1.1x", "1.3x", "1.3x"]
    assert all(row[-1] == "met |" for row in body)
    assert [row[8] for row in body] == ["-"] * 3  # no step floor in these rows
    assert [row[9] for row in body] == [f"{100 / (100 * tc / 200):.2f}x" for tc in (
        bench.work_model(bench.Case("nt_xent", "torch_compile", "float32", b, 128))[1] / (ms * 1e-3) / 1e9
        for b, ms in ((256, 5), (512, 20), (1024, 80)))]
    assert bench_report.targets_table([r for r in _synthetic_rows() if r["backend"] != "torch_compile"]) == []


def _byol_rows(floor_ms=0.07):
    """BYOL-PNR at B = 256, D = 128 (786,432 bytes, 5.24 us at 150 GB/s): native 0.213 ms,
    torch_compile 0.316 ms, with the step floor in the records (None: as before it was measured)."""
    records = []
    for name, ms in (("torch_compile", 0.316), ("native", 0.213)):
        record = _record(name, 256, ms, 1.0, loss="byol_pnr", peak_throughput=150.0, peak_how="stub bandwidth")
        record["percent_of_peak"] = 100 * record["throughput"] / 150.0
        if floor_ms is not None:
            record.update(step_floor_ms=floor_ms, step_floor_how="stub floor")
        records.append(record)
    return bench_report.records_to_rows(records, meta=META)


def test_the_step_floor_is_a_csv_row_and_in_the_conditions(tmp_path):
    rows = _byol_rows()
    floors = [r for r in rows if r["metric"] == "step_floor"]
    assert [(r["backend"], r["mode"], r["unit"], r["p50"], r["note"]) for r in floors] == \
        [("torch_compile", "full", "ms", "0.07", "stub floor"), ("native", "full", "ms", "0.07", "stub floor")]
    path = str(tmp_path / "cpu.csv")
    bench_report.upsert_csv(path, rows)
    assert bench_report.read_csv(path) == sorted(rows, key=bench_report._sort_key)
    assert "- machine step floor: 70 us (stub floor)" in bench_report._conditions(rows)
    assert not any("step floor" in line for line in bench_report._conditions(_byol_rows(None)))


def test_the_bandwidths_of_the_rounds_are_one_conditions_line_per_footprint():
    """Each size's own bandwidth (limits.StreamRounds) differs from the next size's: the
    conditions give their range per footprint, with the how of the highest, instead of a line each."""
    records = []
    for batch, gbs in ((256, 31.0), (512, 33.0), (1024, 40.0)):
        how = (f"STREAM triad over {192 if batch < 1024 else 12} MiB float32 timed in the record's interleaved "
               f"rounds (copy 1.0, triad {gbs}, read 2.0 GB/s at the median of 10 rounds, 2 threads)")
        record = _record("native", batch, 0.5, 1.0, loss="byol_pnr", peak_throughput=gbs, peak_how=how)
        record["percent_of_peak"] = 100 * record["throughput"] / gbs
        records.append(record)
    lines = [line for line in bench_report._conditions(bench_report.records_to_rows(records, meta=META))
             if "bandwidth" in line]
    assert len(lines) == 2
    assert lines[0].startswith("- machine bandwidth limit for float32: 40 GB/s (STREAM triad over 12 MiB")
    assert lines[1].startswith("- machine bandwidth limit for float32: 31 to 33 GB/s (STREAM triad over 192 MiB")
    assert "triad 33.0" in lines[1]


def test_targets_table_holds_a_bytes_row_to_the_step_floor():
    table = bench_report.targets_table(_byol_rows())
    assert table[0].split(" | ")[8:10] == ["step floor + work at limit", "reachable at 100 %"]
    row = table[2].split(" | ")
    # best step 70 + 5.24 us: torch_compile's 0.316 ms over it is 4.20x; 5.24 of 75.2 us is 6.97 %
    assert row[8:] == ["0.0700 + 0.00524 ms", "4.20x",
                       "out of reach: at most 6.97 % of the bandwidth (step floor 70 us, 5.24 us of traffic) |"]
    # a CSV written before the floor was measured: as before, 100 % over torch_compile's 1.66 %
    row = bench_report.targets_table(_byol_rows(None))[2].split(" | ")
    assert row[8:] == ["-", "60.27x", "behind: 2 % < 80 % of the bandwidth |"]


def test_report_writes_plots_and_docs_tables_from_a_csv(tmp_path):
    csv_path = tmp_path / "cpu.csv"
    bench_report.upsert_csv(str(csv_path), _synthetic_rows())
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text(f"# Title\n\nprose\n\n{bench_report.DOCS_BEGIN}\nold\n{bench_report.DOCS_END}\n\nafter\n")
    readme = tmp_path / "README.md"
    readme.write_text("# R\n")
    figures = tmp_path / "docs" / "figures"
    assert bench.main(["report", "--csv", str(csv_path), "--docs", str(docs), "--readme", str(readme),
                       "--plot", str(figures)]) == 0
    pngs = sorted(p.name for p in figures.iterdir())
    assert pngs == ["cpu_nt_xent_float32_d128.png", "cpu_speedup_float32.png"]
    assert all((figures / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    text = docs.read_text()
    assert text.startswith("# Title\n\nprose\n") and text.endswith("\nafter\n") and "\nold\n" not in text
    assert "native vs torch_compile" in text and "](figures/cpu_nt_xent_float32_d128.png)" in text
    assert "| 1024 | 160 ms, 20.5 MB | 80.0 ms, 10.2 MB | - | 40.0 ms, 1.02 MB | 2.00x | 4.00x | 20 % |" in text
    assert "over memory budget" in text and "machine FLOP limit for float32: 200 GFLOP/s (stub peak)" in text
    assert "best full step any kernel could have here is the machine's step floor" in text
    again = docs.read_text()
    bench.main(["report", "--csv", str(csv_path), "--docs", str(docs)])  # idempotent markers
    assert docs.read_text().count(bench_report.DOCS_BEGIN) == 1 and again.count(bench_report.DOCS_END) == 1
    assert "](docs/figures/cpu_nt_xent_float32_d128.png)" in readme.read_text()


def test_numbers_in_tables_have_no_exponent():
    assert [bench_report._fmt(v) for v in (0.01234, 1.234, 12.34, 123.4, 13614.5, 0)] == \
        ["0.0123", "1.23", "12.3", "123", "13,614", "0"]


def test_report_upserts_a_json_of_records_first(tmp_path):
    records = [_record("native", 256, 10.0), bench.failed_record(
        bench.Case("nt_xent", "reference", "float32", 512, 128), "cpu", bench.OOM, "out of memory")]
    (tmp_path / "run.json").write_text(json.dumps(records))
    csv_path = tmp_path / "cpu.csv"
    assert bench.main(["report", "--json", str(tmp_path / "run.json"), "--csv", str(csv_path)]) == 0
    rows = bench_report.read_csv(str(csv_path))
    assert {(r["backend"], r["x_value"], r["status"]) for r in rows} == {("native", "256", "ok"),
                                                                          ("reference", "512", "out of memory")}


# ---------------------------------------------------------------------------------------------
# --interleave: the candidates of one size timed in turns, in one process


def test_interleaved_timing_takes_turns_in_shuffled_rounds_and_drops_a_failing_candidate():
    order = []

    def candidate(name, fail_at=None):
        x = torch.ones(3, requires_grad=True)

        def forward():
            order.append(name)
            if fail_at is not None and order.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
            return (x * 2).sum()
        return forward, [x]

    results = bench.time_interleaved([candidate("A"), candidate("B", fail_at=3), candidate("C")], "cpu",
                                     repeats=7, warmup=1, min_warmup_s=0, min_timed_s=0)
    # a warm-up round, then one step of each per round; B fails in its third step and leaves the
    # later rounds
    rounds, i = [], 0
    while i < len(order):
        size = 3 if order[i:].count("B") else 2
        rounds.append(order[i:i + size])
        i += size
    assert len(rounds) == 8
    assert all(sorted(r) == ["A", "B", "C"] for r in rounds[:3]) and all(sorted(r) == ["A", "C"] for r in rounds[3:])
    # each round in a new order, so that no candidate always follows the same one (whose
    # temporaries would always evict its inputs first)
    assert len({tuple(r) for r in rounds[:3]}) > 1 or len({tuple(r) for r in rounds[3:]}) > 1
    assert {("A", "C"), ("C", "A")} <= set(zip(order, order[1:]))
    assert [len(r["full"]) for r in (results[0], results[2])] == [7, 7]
    assert isinstance(results[1], RuntimeError)
    assert all(f >= 0 and b >= 0 for f, b in zip(results[0]["forward"], results[0]["backward"]))


def test_probes_take_turns_in_the_rounds_and_return_their_timed_rounds_after_the_candidates():
    order = []
    x = torch.ones(3, requires_grad=True)

    def forward():
        order.append("A")
        return (x * 2).sum()

    def probe():
        order.append("P")
        return {"copy": 1.0 + len(order), "read": 2.0}

    results = bench.time_interleaved([(forward, [x])], "cpu", repeats=5, warmup=2, min_warmup_s=0, min_timed_s=0,
                                     probes=[probe])
    assert len(results) == 2 and len(results[0]["full"]) == 5
    assert order.count("P") == order.count("A") == 7  # warm-up rounds too, untimed
    assert {tuple(order[i:i + 2]) for i in range(0, len(order), 2)} == {("A", "P"), ("P", "A")}  # shuffled
    probed = results[1]
    assert set(probed) == {"copy", "read"} and len(probed["copy"]) == 5 and probed["read"] == [2.0] * 5
    assert probed["copy"] == sorted(probed["copy"]) and probed["copy"][0] > 1 + 4  # timed rounds only


def test_a_full_cpu_run_times_longer_rounds_than_a_quick_one(monkeypatch, tmp_path):
    """The CPU worker gets the rounds' minimum time: MIN_TIMED_S with --quick, FULL_MIN_TIMED_S
    without (a size whose reference is slow would time its fused candidates only ``repeats`` times)."""
    asked, in_subprocess = [], bench._measure_group_in_subprocess

    def measure_group(cases, repeats, warmup, timeout_s=None, memory_budget_mb=None, min_timed_s=None):
        asked.append(min_timed_s)
        return [bench.failed_record(case, "cpu", bench.FAILED, "not run") for case in cases]

    monkeypatch.setattr(bench, "_measure_group_in_subprocess", measure_group)
    for quick in (["--quick"], []):
        bench.main([*quick, "--losses", "byol_pnr", "--backends", "native", "--json", str(tmp_path / "r.json")])
    assert asked[0] == bench.MIN_TIMED_S and set(asked[1:]) == {bench.FULL_MIN_TIMED_S}
    assert bench.FULL_MIN_TIMED_S > bench.MIN_TIMED_S
    payload = {}
    monkeypatch.setattr(bench.subprocess, "run", lambda argv, **kwargs: payload.update(json.loads(argv[-1])) or
                        subprocess.CompletedProcess(argv, 0, "[]", ""))
    in_subprocess([], 3, 1, min_timed_s=7.0)
    assert payload["min_timed_s"] == 7.0


def test_interleave_groups_are_the_candidates_of_one_size():
    cases = bench.make_cases("cpu", True, ["nt_xent", "byol_pnr"], ["reference", "native"], sweep=True)
    groups = bench.interleave_groups(cases)
    assert [len(g) for g in groups] == [2] * len({(c.loss, c.batch_size) for c in cases})
    assert all(len({(c.loss, c.dtype, c.batch_size, c.dim, c.queue_size) for c in g}) == 1 for g in groups)
    assert [c for g in groups for c in g] == cases


def test_a_group_leaves_out_a_stopped_series():
    cases = [bench.Case("nt_xent", b, "float32", 256, 8) for b in ("reference", "native")]
    bigger = [dataclasses.replace(c, batch_size=512) for c in cases]
    given = []

    def measure_group(group):
        given.append([c.backend for c in group])
        return [bench.failed_record(c, "cpu", bench.OOM, "out of memory") if c.backend == "reference" and
                c.batch_size == 256 else dict(_record(c.backend, c.batch_size), interleaved=[x.backend for x in group])
                for c in group]

    records = bench.run_groups([cases, bigger], measure_group, device="cpu", budget=bench.Budget(), repeats=3,
                               warmup=1)
    assert given == [["reference", "native"], ["native"]]
    assert [r["status"] for r in records] == [bench.OOM, bench.OK, bench.SKIPPED, bench.OK]


def test_cli_interleave_times_the_candidates_in_one_process(tmp_path):
    out, csv_path = tmp_path / "r.json", tmp_path / "r.csv"
    run = subprocess.run([sys.executable, "-m", "pnr_kernels.bench", "--interleave", "--quick", "--losses", "nt_xent",
                          "--backends", "reference", "native", "--repeats", "2", "--json", str(out),
                          "--csv", str(csv_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    records = json.loads(out.read_text())
    assert [r["backend"] for r in records] == ["reference", "native"]
    assert all(r["status"] == "ok" and r["interleaved"] == ["reference", "native"] for r in records)
    assert records[0]["loadavg"] == records[1]["loadavg"] and len(records[0]["full_ms"]) == 3
    assert "candidates interleaved in one process" in run.stdout
    rows = bench_report.read_csv(str(csv_path))
    notes = {r["backend"]: r["note"] for r in rows if r["metric"] == "time" and r["mode"] == "full"}
    assert notes == {"reference": "interleaved with reference, native", "native": "interleaved with reference, native"}


def test_help_documents_the_limits_and_interleave():
    text = bench.build_parser().format_help()
    assert "--interleave" in text and "a new order each round" in " ".join(text.split())
    assert "multiply-add" in text and "STREAM" in text and "pnr-bench limits" in text
    assert "step floor: the median full step of a loss doing no work" in " ".join(text.split())
    from pnr_kernels.bench import limits

    text = " ".join(limits.build_parser().format_help().split())
    assert "CPU, the step floor (ms): the least time a loss's full step takes" in text
    assert "the step floor: the lower" in text


def test_the_docs_say_when_the_table_was_timed_interleaved():
    rows = _synthetic_rows()
    timed = [r for r in rows if r["metric"] == "time" and r["mode"] == "full" and r["status"] == "ok"]
    assert timed and not any("interleaved" in line for line in bench_report._conditions(rows))
    for r in timed:
        r["note"] = "interleaved with reference, native"
    assert "Each size's candidates were timed interleaved in one process" in "\n".join(bench_report._conditions(rows))
    timed[0]["note"] = ""
    assert f"{len(timed) - 1} of the {len(timed)} timed cases were timed interleaved" in \
        "\n".join(bench_report._conditions(rows))


def test_cpu_peak_memory_counts_gradients_from_the_native_output_pool():
    """The native kernels keep freed 32 MiB gradient blocks for the next step; the memory
    measurement empties that pool first, so a step's two 32 MiB gradients still count."""
    from pnr_kernels import native
    if native.unavailable_reason(torch.device("cpu"), torch.float32) is not None:
        pytest.skip("native backend unavailable")
    record = bench.measure(bench.Case("vicreg_pnr", "native", "float32", 4096, 2048), "cpu", repeats=1, warmup=1)
    assert record["status"] == "ok"
    assert record["peak_memory_mb"] >= 64


def test_the_conditions_say_when_the_load_exceeded_the_cores():
    """A load average above the core count (the bench's own threads count in it) is reported with
    its highest value; one within the cores is not."""
    rows = _byol_rows()
    for r in rows:
        r["device_name"] = "Some CPU (2 cores)"
    for load, said in ((1.96, False), (2.05, True)):
        for r in rows:
            r["loadavg_1m"] = f"{load:.2f}"
        text = "\n".join(bench_report._conditions(rows))
        assert ("The load average exceeded the 2 cores at times (up to 2.05, the bench's own threads included)"
                in text) == said, text
