"""Whether Triton runs its kernels in the numpy interpreter: a leaf module, so that the backend's
hookup (``pnr_kernels.triton``) and the kernel modules it loads both read it without importing
each other."""
import os


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (must be set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
