"""``pnr-bench`` (``python -m pnr_kernels.bench``): the benchmark of every loss x backend x size.

Modules, imported in one direction (``runner`` imports ``peers`` and ``limits`` and dispatches to
``report`` and ``distributed``; none of those imports ``runner``; all of them import the library,
which never imports the bench):

- :mod:`~pnr_kernels.bench.runner`: the grid, the measurement of one case and the command line
  (:func:`main`);
- :mod:`~pnr_kernels.bench.peers`: the third-party peers (torch_compile, pml, infcl): where each
  runs and its forward;
- :mod:`~pnr_kernels.bench.limits`: the machine's measured limits that ``percent_of_peak``
  divides by, cached per machine (``pnr-bench limits``);
- :mod:`~pnr_kernels.bench.report`: CSV rows, docs tables and figures (``pnr-bench report``);
- :mod:`~pnr_kernels.bench.distributed`: the data-parallel gather's cost (``pnr-bench --world-size``);
- :mod:`~pnr_kernels.bench.dtypes`: the dtype names shared by the command lines.
"""
from .runner import main

__all__ = ["main"]
