"""Input factories shared by the test files (the same ones the benchmark runner uses)."""
from pnr_kernels.bench import TRAINABLE, make_inputs  # noqa: F401
