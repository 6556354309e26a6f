"""``python -m pnr_kernels.cssl``: the same as the ``pnr-cssl`` console script."""
import sys

from .cli import main

sys.exit(main())
