"""What the command-line tools (``pnr-bench`` in every mode, ``pnr-cssl``, ``pnr-kernels``) share:
a parser whose errors are one line, and argparse ``type=`` checks for numbers and paths.

Every option is checked while the command line is parsed, before any work starts: a bad value
ends in one line on stderr, ``<prog>: error: argument --option: <what is wrong>``, and exit
status 2 (argparse's usage error), never a traceback.

Numbers (:class:`Number`): an int or a float that is finite and lies in the range the option
admits. Paths: an output file (:class:`OutputFile`) or folder (:class:`OutputDir`) must be
creatable: it is not of the other kind, and the nearest folder above it that exists is a writable
folder. Missing folders above an output are created when it is written (:func:`make_parents`).
Inputs (:class:`InputFile`, :class:`InputDir`) must exist and be readable.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, NoReturn, Optional, Tuple


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (no usage block before them):
    ``<prog>: error: <message> (<prog> --help lists the options)`` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        text = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {text} ({self.prog} --help lists the options)\n")


def fail(prog: str, message: str, status: int = 1) -> int:
    """Print a failure that is not a usage error as one line, ``<prog>: error: <message>``, and
    return ``status`` (for ``return fail(...)`` in a ``main``)."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return status


class Number:
    """argparse type: ``kind`` (int or float) from the text, finite, within ``[low, high]``
    (``low_open``/``high_open`` exclude the bound; ``None`` means unbounded)."""

    def __init__(self, kind: type, low=None, high=None, *, low_open: bool = False, high_open: bool = False):
        self.kind, self.low, self.high, self.low_open, self.high_open = kind, low, high, low_open, high_open
        self.__name__ = self.describe()  # argparse names the type by it in some messages

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        low, high = (v if v is None or self.kind is int else f"{v:g}" for v in (self.low, self.high))
        if low is not None and high is not None:
            return f"{what} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if low is not None:
            return f"{what} {'>' if self.low_open else '>='} {low}"
        if high is not None:
            return f"{what} {'<' if self.high_open else '<='} {high}"
        return what

    def admits(self, value) -> bool:
        """Whether the already converted ``value`` has the kind and lies in the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def check(self, name: str, value) -> None:
        """Raise ``ValueError`` naming ``name`` unless :meth:`admits` ``value`` (for values that
        come from Python rather than from a command line)."""
        if not self.admits(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")

    def __call__(self, text: str):
        try:
            value = int(text) if self.kind is int else float(text)
        except (TypeError, ValueError):
            value = None
        if not self.admits(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value

    def refused(self) -> Tuple[str, ...]:
        """Texts this type refuses (non-numbers, non-finite values, the nearest values outside
        its range); the CLI tests feed them to every option of this type."""
        out = ["x", "nan", "inf", "-inf"] if self.kind is float else ["x", "nan", "1.5"]
        step = 1 if self.kind is int else 0.5
        if self.low is not None:
            out += [repr(self.low - step)] + ([repr(self.low)] if self.low_open else [])
            if self.low > 0:
                out.append("-1")
        if self.high is not None:
            out.append(repr(self.high if self.high_open else self.high + step))
        return tuple(out)


positive_int = Number(int, 1)
nonneg_int = Number(int, 0)
positive_float = Number(float, 0, low_open=True)
nonneg_float = Number(float, 0)
finite_float = Number(float)
unit_interval = Number(float, 0, 1)


def use_ranges(parser: argparse.ArgumentParser, ranges: Dict[str, Number]) -> None:
    """Make ``ranges[dest]`` the type of every option of ``parser`` whose destination is a key
    of ``ranges`` (one table for the parser and for the checks of values given in Python)."""
    actions = {action.dest: action for action in parser._actions}
    missing = sorted(set(ranges) - set(actions))
    if missing:
        raise ValueError(f"ranges for options the parser lacks: {', '.join(missing)}")
    for dest, number in ranges.items():
        actions[dest].type = number


def output_problem(path: str, folder: bool) -> Optional[str]:
    """Why ``path`` cannot be written as an output folder (``folder``) or file, or None: it is the
    other kind, it is not writable, or it is missing and cannot be created (a file, or a folder
    that is not writable, is its nearest existing parent). Creates nothing."""
    if os.path.exists(path):
        if folder and not os.path.isdir(path):
            return f"{path} is a file, not a folder"
        if not folder and os.path.isdir(path):
            return f"{path} is a folder; give a file path"
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            return f"{path} is not writable (permission denied)"
        return None
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{path} cannot be created: {parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path} cannot be created: permission denied in {parent}"
    return None


class OutputFile:
    """argparse type: a file this run will write (missing folders above it are created then)."""
    __name__ = "output file"
    folder = False

    def __call__(self, path: str) -> str:
        why = output_problem(path, self.folder)
        if why:
            raise argparse.ArgumentTypeError(why)
        return path


class OutputDir(OutputFile):
    """argparse type: a folder this run will write into (created when missing)."""
    __name__ = "output folder"
    folder = True


class InputFile:
    """argparse type: an existing readable file (``writable=True``: one rewritten in place)."""
    __name__ = "input file"

    def __init__(self, writable: bool = False):
        self.writable = writable

    def __call__(self, path: str) -> str:
        if not os.path.exists(path):
            raise argparse.ArgumentTypeError(f"{path} does not exist")
        if not os.path.isfile(path):
            raise argparse.ArgumentTypeError(f"{path} is not a file")
        if not os.access(path, os.R_OK | (os.W_OK if self.writable else 0)):
            raise argparse.ArgumentTypeError(f"{path} is not {'writable' if self.writable else 'readable'}")
        return path


class InputDir:
    """argparse type: an existing readable folder."""
    __name__ = "input folder"

    def __call__(self, path: str) -> str:
        if not os.path.isdir(path):
            raise argparse.ArgumentTypeError(
                f"{path} {'is not a folder' if os.path.exists(path) else 'does not exist'}")
        if not os.access(path, os.R_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{path} is not readable")
        return path


output_file, output_dir, input_file, input_dir = OutputFile(), OutputDir(), InputFile(), InputDir()


def make_parents(path: str) -> str:
    """Create the missing folders above the file ``path``; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


__all__ = ["ArgumentParser", "fail", "Number", "positive_int", "nonneg_int", "positive_float", "nonneg_float",
           "finite_float", "unit_interval", "use_ranges", "output_problem", "OutputFile", "OutputDir", "InputFile", "InputDir",
           "output_file", "output_dir", "input_file", "input_dir", "make_parents"]
