"""benchmarks/gpu_check.sh, the one-call GPU check of issue 22, run end to end here in its dry-run
mode (what needs a GPU replaced and marked DRY RUN in status.txt), so that the device call cannot
fail on a typo: the files it leaves (8 at most, as the device returns), a status line per step with
its exit code and time, the CSV of ``pnr-bench report``; and that a failing or starved step does
not stop the steps after it."""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pnr_kernels import native
from pnr_kernels.bench import report as bench_report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
FILES = {"env.txt", "build.log", "tests.log", "tests.xml", "sanitizer.log", "bench.log", "cuda.csv", "status.txt"}
STEPS = ["wheels", "env", "build", "tests", "memcheck", "racecheck", "bench", "compile", "report"]
STEP_LINE = re.compile(r"^step (\S+)\s+rc=(\S+)\s+seconds=(\S+)\s+timeout=(\S+)\s*(.*)$")
# The suite's own arch list, so that the dry run reuses the build the other tests made (the script
# builds for 9.0 alone otherwise, one more build on a CPU machine)
SUITE_ARCHS = "8.0;9.0+PTX"

pytestmark = pytest.mark.skipif(native._find_nvcc()[0] is None or native._find_cxx()[0] is None,
                                reason="the dry run builds the native extension's CUDA part: needs nvcc and g++")


def run_script(out: Path, *, dry_run: bool = True, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("OUT", "PNR_GPU_CHECK_DRY_RUN")}
    environment.update({"PYTHON": sys.executable, "PNR_GPU_CHECK_ARCHS": SUITE_ARCHS, **env})
    command = ["bash", str(SCRIPT), *(["--dry-run"] if dry_run else []), str(out)]
    return subprocess.run(command, cwd="/", env=environment, capture_output=True, text=True, timeout=900)


def steps(status: str):
    """{step: (rc, seconds, timeout, note)} of a status.txt, in order."""
    found = {}
    for line in status.splitlines():
        match = STEP_LINE.match(line)
        if match:
            name, rc, seconds, limit, note = match.groups()
            assert name not in found, f"step {name} recorded twice:\n{status}"
            found[name] = (rc, seconds, limit, note)
    return found


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = run_script(out)
    return out, result


@pytest.mark.slow
def test_dry_run_passes_end_to_end_and_leaves_the_eight_files(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == FILES and len(files) <= 8
    status = (out / "status.txt").read_text()
    assert result.stdout.rstrip().endswith(status.rstrip().splitlines()[-1])  # status.txt is printed last
    assert status.splitlines()[0].startswith("gpu_check mode=dry-run ")
    assert re.search(r"^result ok mode=dry-run seconds=\d+$", status, re.M), status
    assert f"files 8: {' '.join(sorted(FILES))}" in status


@pytest.mark.slow
def test_every_step_records_its_exit_code_and_time_and_stubs_say_dry_run(dry_run):
    out, _ = dry_run
    status = (out / "status.txt").read_text()
    found = steps(status)
    assert list(found) == STEPS, status
    for name, (rc, seconds, limit, note) in found.items():
        assert rc in ("0", "-"), f"{name}: {status}"
        assert seconds.isdigit() and re.fullmatch(r"-?\d+", limit), f"{name}: {status}"
    # what needs the GPU is replaced, and says so
    for name in ("env", "build", "tests", "memcheck", "racecheck", "bench", "compile"):
        assert found[name][3].startswith("DRY RUN"), f"{name}: {found[name]}"
    assert found["build"][0] == "0" and "TORCH_CUDA_ARCH_LIST=" + SUITE_ARCHS in found["build"][3]
    assert "CUDA part: " in (out / "build.log").read_text()  # nvcc ran: the CUDA part was compiled
    collected = re.search(r"^tests: collected \(dry run\) (\d+)$", status, re.M)
    assert collected and int(collected.group(1)) > 100, status
    tests_log = (out / "tests.log").read_text()
    assert "tests/test_infonce_native_cuda.py::" in tests_log and "tests/test_infonce_triton.py::" in tests_log
    # only the CUDA tests of test_regularizers_native.py (none are collected without a GPU but this one)
    assert re.findall(r"tests/test_regularizers_native.py::(\w+)", tests_log) == [
        "test_cuda_sources_compiled_when_nvcc_is_present"]
    sanitizer_log = (out / "sanitizer.log").read_text()
    assert "\n0 of 16 cases failed\n" in sanitizer_log and len(re.findall(r"^ok \w+ native ", sanitizer_log, re.M)) == 16


@pytest.mark.slow
def test_dry_run_csv_is_pnr_bench_reports_format(dry_run):
    out, _ = dry_run
    with open(out / "cuda.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = [dict(zip(header, row)) for row in reader]
    assert header == bench_report.COLUMNS
    measured = {r["backend"] for r in rows if r["status"] == "ok" and r["metric"] == "time" and r["p50"]}
    assert {"reference", "native"} <= measured
    compiled = [r for r in rows if r["backend"] == "torch_compile"]
    assert compiled and all(r["status"].startswith("skipped: ") and "the step's time budget (0 s) ran out" in r["status"]
                            for r in compiled)
    bench_log = (out / "bench.log").read_text()
    assert "CUDA plan: 19 sizes x 2 dtypes" in bench_log
    assert "simclr_pnr B=4096 D=256 K=-" in bench_log and "moco_pnr B=256 D=128 K=65536" in bench_log
    assert bench_report.DOCS_BEGIN in bench_log  # pnr-bench report rendered the CSV
    status = (out / "status.txt").read_text()
    assert "goal SimCLR-PNR B=4096 D=256 bf16 triton: " in status


def test_a_failing_step_does_not_stop_the_later_ones(tmp_path):
    """A Python that fails the build, the sanitizer's cases and the benchmark: every step still
    runs and is recorded with its exit code, and the script exits non-zero naming them."""
    wrapper = tmp_path / "python"
    wrapper.write_text("#!/bin/sh\n"
                       'case "$*" in\n'
                       '  *"pnr_kernels.native build"*) echo "injected build failure" >&2; exit 3 ;;\n'
                       '  *gpu_sanitize_cases.py*) exit 5 ;;\n'
                       '  *gpu_bench.py*) exit 4 ;;\n'
                       "esac\n"
                       f'exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    out = tmp_path / "out"
    result = run_script(out, PYTHON=str(wrapper))
    assert result.returncode != 0
    assert "injected build failure" in result.stdout  # the build log's end is printed at once
    status = (out / "status.txt").read_text()
    found = steps(status)
    assert list(found) == STEPS, status
    assert [found[name][0] for name in ("build", "memcheck", "bench", "compile", "report")] == ["3", "5", "4", "4", "1"]
    assert found["tests"][0] == "0" and found["env"][0] == "0"
    assert re.search(r"^result FAILED mode=dry-run seconds=\d+ steps: build memcheck bench compile report$",
                     status, re.M), status


def test_a_spent_budget_skips_steps_and_fails(tmp_path):
    out = tmp_path / "out"
    result = run_script(out, GPU_CHECK_BUDGET_S="0")
    assert result.returncode != 0
    found = steps((out / "status.txt").read_text())
    assert list(found) == STEPS
    for name in ("env", "build", "tests", "memcheck", "bench", "compile"):
        assert found[name][0] == "-" and found[name][3].startswith("NOT RUN: the budget of 0 s is spent"), found[name]
    assert len([p for p in out.iterdir()]) <= 8


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the device branches where no GPU answers")
def test_device_mode_without_a_gpu_runs_every_branch_and_fails_cleanly(tmp_path):
    """The script's device branches (not the dry run's), here where nothing answers: the sanitizer
    steps with a stand-in compute-sanitizer that refuses the device (as gVisor's runtime does) are
    recorded as refused, not failed, and called with our kernel filter; the benchmark steps fail
    with their reason; the tests run (every CUDA one skipped); every step is recorded."""
    tools = tmp_path / "bin"
    tools.mkdir()
    calls = tmp_path / "calls.txt"
    sanitizer = tools / "compute-sanitizer"
    sanitizer.write_text("#!/bin/sh\n"
                         'if [ "$1" = "--help" ]; then echo "  --kernel-name arg"; exit 0; fi\n'
                         f'echo "$@" >> "{calls}"\n'
                         'echo "========= Error: Device not supported"\n'
                         "exit 1\n")
    sanitizer.chmod(0o755)
    out = tmp_path / "out"
    no_wheels = tmp_path / "no_wheels"
    no_wheels.mkdir()
    result = run_script(out, dry_run=False, PATH=f"{tools}:{os.environ['PATH']}",
                        PNR_GPU_CHECK_WHEELS=str(no_wheels))
    assert result.returncode != 0
    status = (out / "status.txt").read_text()
    found = steps(status)
    assert list(found) == STEPS, status
    assert status.splitlines()[0].startswith("gpu_check mode=device ")
    assert found["build"][0] == "0" and found["tests"][0] == "0", status
    assert re.search(r"^tests: \d+ run, 0 failed, 0 errors, \d+ skipped$", status, re.M), status
    for tool in ("memcheck", "racecheck"):
        assert found[tool][0] == "-" and "refused the device" in found[tool][3], status
    assert [line.split()[:2] for line in calls.read_text().splitlines() if line != "--version"] == [
        ["--tool", "memcheck"], ["--tool", "racecheck"]]
    assert all("--kernel-name kns=pnr_kernels" in line for line in calls.read_text().splitlines()[1:])
    assert found["bench"][0] == "2" and "needs a CUDA GPU" in (out / "bench.log").read_text()
    assert re.search(r"^result FAILED mode=device seconds=\d+ steps: bench compile report$", status, re.M), status
