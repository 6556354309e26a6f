"""Every option of every command-line tool, given a bad value, ends in one line on stderr naming
the option and a non-zero exit (2: a usage error), never a traceback; and no work starts first.

The tools (pyproject.toml's [project.scripts]): ``pnr-bench`` (its default mode, ``--world-size
N``, ``report`` and ``limits``), ``pnr-cssl`` and ``pnr-kernels build``. The bad values are derived from each
option's parser action: an unknown choice, the refused texts of its number type
(``pnr_kernels._cli.Number.refused``: not a number, NaN, infinities, just outside the range), paths
that cannot be written or read, a value given to a flag. An option that none of this covers and
that has no row in ``EXTRA`` fails :func:`test_every_option_has_bad_values`, so a new option cannot
go unchecked. The runs are in-process (``main(argv)``); a few go through the real entry points.
"""
import argparse
import json
import os
import subprocess
import sys

import pytest

from pnr_kernels import _cli, native
from pnr_kernels.bench import distributed as bench_distributed
from pnr_kernels.bench import limits as bench_limits
from pnr_kernels.bench import report as bench_report
from pnr_kernels.bench import runner as bench
from pnr_kernels.cssl import cli as cssl_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (its parser, argv before the options, options every run needs, how to run it)
CLIS = {
    "pnr-bench": (bench.build_parser, [], {}),
    "pnr-bench --world-size": (bench_distributed.build_parser, [], {"--world-size": "2"}),
    "pnr-bench report": (bench_report.build_parser, ["report"], {"--csv": "{CSV}"}),
    "pnr-bench limits": (bench_limits.build_parser, ["limits"], {}),
    "pnr-cssl": (cssl_cli.build_parser, [], {}),
    "pnr-kernels build": (lambda: native.build_parser()._subparsers._group_actions[0].choices["build"], ["build"], {}),
}
MAINS = {"pnr-bench": bench.main, "pnr-bench --world-size": bench.main, "pnr-bench report": bench.main,
         "pnr-bench limits": bench.main,
         "pnr-cssl": cssl_cli.main, "pnr-kernels build": native.main}

# Bad values for what the action alone does not say (placeholders: see _paths).
EXTRA = {
    ("pnr-bench report", "--csv"): ["{MISSING}", "{FOLDER}"],  # checked after parsing (the first may be written)
    ("pnr-bench report", "--json"): ["{NOT_JSON}"],
    ("pnr-cssl", "--output-dir"): ["{FILE}", "{UNDER_FILE}"],  # the trainer's check, before any work
}
# Options with no bad value to give, and why.
EXEMPT = {("pnr-bench", "--worker"): "internal: the JSON a pnr-bench process hands to its worker process"}

PATH_VALUES = {
    _cli.OutputFile: ["{UNDER_FILE}", "{FOLDER}"],
    _cli.OutputDir: ["{UNDER_FILE}", "{FILE}"],
    _cli.InputFile: ["{MISSING}", "{FOLDER}"],
    _cli.InputDir: ["{MISSING}", "{FILE}"],
}


def _options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def bad_values(name, action):
    """The values ``action`` of CLI ``name`` must refuse (placeholders for paths)."""
    values = list(EXTRA.get((name, action.option_strings[0]), []))
    if action.nargs == 0:  # a flag: a value given to it
        values.append("{FLAG}")
    if action.choices is not None:
        values.append("no-such-choice")
    if isinstance(action.type, _cli.Number):
        values += action.type.refused()
    values += PATH_VALUES.get(type(action.type), [])
    return values


CASES = [(name, action.option_strings[0], value)
         for name, (build, _, _) in CLIS.items() for action in _options(build())
         for value in bad_values(name, action)]


def test_every_option_has_bad_values():
    missing = [f"{name} {action.option_strings[0]}" for name, (build, _, _) in CLIS.items()
               for action in _options(build())
               if not bad_values(name, action) and (name, action.option_strings[0]) not in EXEMPT]
    assert not missing, (f"options without a bad-value case: {missing}; give each a checking type "
                         f"(pnr_kernels/_cli.py) or a row in EXTRA")
    stale = [key for key in [*EXTRA, *EXEMPT]
             if key[1] not in {a.option_strings[0] for a in _options(CLIS[key[0]][0]())}]
    assert not stale, f"rows for options that no longer exist: {stale}"


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "rows.csv").write_text("")
    (tmp_path / "not.json").write_text("{ not json")
    return {"FILE": str(tmp_path / "file.txt"), "UNDER_FILE": str(tmp_path / "file.txt" / "out"),
            "FOLDER": str(tmp_path / "folder"), "MISSING": str(tmp_path / "missing" / "x"),
            "CSV": str(tmp_path / "rows.csv"), "NOT_JSON": str(tmp_path / "not.json")}


def run_in_process(main, argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_one_line(code, err, *needles, status=2):
    assert "Traceback" not in err, err
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


@pytest.mark.parametrize("name,option,value", CASES, ids=[f"{n}:{o}={v}" for n, o, v in CASES])
def test_a_bad_value_is_one_line_naming_the_option(name, option, value, paths, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a run might start writes into the checkout
    _, prefix, required = CLIS[name]
    argv = list(prefix)
    for opt, text in required.items():
        if opt != option:
            argv += [f"{opt}={text.format(**paths)}"]
    argv.append(f"{option}=1" if value == "{FLAG}" else f"{option}={value.format(**paths)}")
    code, err = run_in_process(MAINS[name], argv, capsys)
    assert_one_line(code, err, option, f"{name.split()[0]}")


def test_an_unknown_subcommand_is_one_line(capsys):
    assert_one_line(*run_in_process(native.main, ["bogus"], capsys), "invalid choice", "pnr-kernels")


def test_a_bench_run_whose_every_case_failed_exits_1(monkeypatch, capsys, tmp_path):
    module = sys.modules[bench.main.__module__]
    monkeypatch.setattr(module, "_measure_group_in_subprocess", lambda cases, *args, **kwargs:
                        [module.failed_record(case, "cpu", module.FAILED, "boom") for case in cases])
    code, err = run_in_process(bench.main, ["--quick", "--losses", "nt_xent", "--backends", "reference",
                                            "--json", str(tmp_path / "r.json")], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "pnr-bench: error: every case failed; the first: boom"


def test_bench_json_into_a_missing_folder_creates_it(monkeypatch, capsys, tmp_path):
    module = sys.modules[bench.main.__module__]
    monkeypatch.setattr(module, "_measure_group_in_subprocess", lambda cases, repeats, warmup, *a, **k:
                        module.measure_interleaved(cases, "cpu", repeats, warmup))
    monkeypatch.setattr(module, "add_percent_of_peak", lambda record, **kwargs: record)
    out = tmp_path / "new" / "deeper" / "out.json"
    code, err = run_in_process(bench.main, ["--quick", "--losses", "byol_pnr", "--backends", "reference",
                                            "--repeats", "1", "--json", str(out)], capsys)
    assert code == 0, err
    assert [r["loss"] for r in json.loads(out.read_text())] == ["byol_pnr"]


def test_a_divergence_names_the_term_that_overflowed(tmp_path, capsys):
    pytest.importorskip("sklearn")
    tiny = ["--tasks", "2", "--epochs", "1", "--batch-size", "8", "--limit-train", "16", "--max-steps-per-epoch",
            "1", "--limit-test", "20", "--limit-probe", "20", "--proj-hidden", "16", "--proj-dim", "8",
            "--no-progress", "--backend", "reference", "--output-dir", str(tmp_path / "run")]
    code, err = run_in_process(cssl_cli.main, tiny + ["--strategy", "cassle", "--cassle-weight", "1e308"], capsys)
    line = assert_one_line(code, err, "training diverged", "task 2, epoch 1, step 1",
                           "cassle_simclr_regularizer x --cassle-weight 1e+308", "is inf on finite inputs")
    assert "--lr" not in line


def _entry_point(script):
    """argv running the console script ``script`` as pyproject.toml declares it."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        module, function = tomllib.load(f)["project"]["scripts"][script].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function} as m; sys.exit(m())"]


@pytest.mark.parametrize("script,args,needles,status", [
    ("pnr-bench", ["--world-size", "2", "--batch", "-1"], ["argument --batch"], 2),
    ("pnr-bench", ["--repeats", "0"], ["argument --repeats"], 2),
    ("pnr-bench", ["--json", "{UNDER_FILE}"], ["argument --json", "is a file, not a folder"], 2),
    ("pnr-cssl", ["--strategy", "cassle", "--cassle-weight", "nan"], ["argument --cassle-weight"], 2),
    ("pnr-kernels", ["build"], ["pnr-kernels build: error:", "PNR_KERNELS_CACHE", "Not a directory"], 1),
])
def test_the_entry_points(script, args, needles, status, paths):
    env = dict(os.environ, PNR_KERNELS_CACHE=paths["UNDER_FILE"])
    run = subprocess.run(_entry_point(script) + [a.format(**paths) for a in args], capture_output=True,
                         text=True, env=env, timeout=120)
    assert_one_line(run.returncode, run.stderr, *needles, status=status)
    assert run.stdout == ""
