"""A tiny fake CIFAR-10 in the python-pickle layout, for the trainer's data tests."""
import pickle

import numpy as np


def write_fake_cifar10(root, per_batch=6, test=10):
    """Write cifar-10-batches-py/ under root: 5 training batches of per_batch images and a test
    batch of test images, random pixels, labels cycling over the 10 classes."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    gen = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        entry = {b"data": gen.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"labels": [int(x) for x in (np.arange(n) + len(name)) % 10]}
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    return folder
