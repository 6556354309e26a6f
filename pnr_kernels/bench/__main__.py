"""``python -m pnr_kernels.bench``: the same command line as ``pnr-bench``."""
import sys

from .runner import main

sys.exit(main())
