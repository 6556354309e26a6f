"""Image folders (ImageNet-100 layout) and DomainNet domains, decoded lazily by worker processes.

Layouts (docs/trainer.md, "Image folders"); nothing is ever downloaded:

- ``--split class`` / ``data``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``; classes are the
  sorted folder names of ``train`` (``val`` may hold a subset of them).
- ``--split domain``: the DomainNet release, ``DIR/<domain>_train.txt`` and ``<domain>_test.txt``
  (lines ``<path relative to DIR> <label>``) when such lists are present; else domain folders
  ``DIR/<domain>/<class>/*``, of which a fixed 20 % per (domain, class) is held out for testing
  (seed 0, whatever the run's ``--seed``). One domain per task, in the authors' order
  (:data:`DOMAINNET_ORDER`) when every domain is one of theirs, else sorted by name; the class set
  (the sorted union of the class names) is shared by every domain.

Decoding (Pillow) is deterministic: RGB, the shorter side resized to the storage size ``S =
round(image_size * 256 / 224)`` (bicubic), the central ``S x S`` square kept, as uint8. The random
augmentations (crops to ``image_size`` and the rest) run batched on the training device, drawn from
the run's checkpointed generator (data.py), so that a resumed run stays exact whatever the number
of workers. Evaluation uses the central ``image_size`` crop of that square: the authors'
``Resize(256)`` + ``CenterCrop(224)`` at the default size.

Files whose header Pillow cannot read are skipped when the folder is scanned and counted; a class
left without a readable image, a missing split or an empty class folder is an error naming the
path. An image whose header reads but whose data does not decode stops the run with its path.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
# The authors' domain order (their cassle/methods/base.py, ``self.domains``).
DOMAINNET_ORDER = ("real", "quickdraw", "painting", "sketch", "infograph", "clipart")
DOMAIN_TEST_FRACTION = 0.2
DOMAIN_SPLIT_SEED = 0
# ImageNet statistics as the authors' pipelines normalise (their dali_dataloader.py).
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.228, 0.224, 0.225))


class ImageReadError(ValueError):
    """An image of the folder cannot be decoded (the message names it)."""


def storage_size(image_size: int) -> int:
    """Side of the decoded square: ``image_size * 256 / 224`` (256 for 224), at least ``image_size``."""
    return max(image_size, round(image_size * 256 / 224))


@dataclass
class FolderImages:
    """Image files of one split, decoded on demand to uint8 ``(3, size, size)`` squares.

    Indexing with an index tensor or list gives the sub-list (nothing is decoded);
    :func:`iterate_batches` decodes."""
    paths: List[str]
    size: int

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (len(self.paths), 3, self.size, self.size)

    def __getitem__(self, index) -> "FolderImages":
        if isinstance(index, torch.Tensor):
            index = index.tolist()
        return FolderImages([self.paths[i] for i in index], self.size)


def decode(path: str, size: int) -> torch.Tensor:
    """One image as a uint8 ``(3, size, size)`` tensor: RGB, shorter side resized to ``size``
    (bicubic; JPEGs first decoded at a reduced scale that still covers ``size``, Pillow's
    ``draft``), central square. Raises :class:`ImageReadError` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            # JPEG: let libjpeg decode at the smallest of 1/1, 1/2, 1/4, 1/8 of the full size that
            # still covers size x size (deterministic; a large speed-up on full-size photographs).
            image.draft("RGB", (size, size))
            image = image.convert("RGB")
            w, h = image.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            image = image.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            image = image.crop((left, top, left + size, top + size))
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot decode {path} ({type(exc).__name__}: {exc}); remove or replace it") from exc
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class _Decoder(torch.utils.data.Dataset):
    """Worker-side dataset: index -> (uint8 image, '' or the path that failed)."""

    def __init__(self, paths: Sequence[str], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return decode(self.paths[i], self.size), ""
        except ImageReadError as exc:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), str(exc)


def _collate(items):
    return torch.stack([image for image, _ in items]), [error for _, error in items if error]


def iterate_batches(images, chunks: Iterable[torch.Tensor], device: torch.device, workers: int = 0
                    ) -> Iterator[torch.Tensor]:
    """The float images ``images[chunk]`` in [0, 1] on ``device``, one batch per chunk of indices.

    In-memory tensors are indexed; :class:`FolderImages` are decoded by a DataLoader with
    ``workers`` worker processes (0: in this process), pinned memory on CUDA and a prefetch of
    4 batches per worker, so that decoding overlaps the training step."""
    chunks = [c.tolist() if isinstance(c, torch.Tensor) else list(c) for c in chunks]
    if isinstance(images, torch.Tensor):
        for chunk in chunks:
            yield images[torch.tensor(chunk, dtype=torch.long)].to(device)
        return
    loader = torch.utils.data.DataLoader(
        _Decoder(images.paths, images.size), batch_sampler=chunks, num_workers=workers,
        collate_fn=_collate, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    for batch, errors in loader:
        if errors:
            more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
            raise ImageReadError(errors[0] + more)
        yield batch.to(device, non_blocking=True).float().div_(255.0)


# -- scanning ----------------------------------------------------------------------------------

@dataclass
class Scan:
    paths: List[str] = field(default_factory=list)
    labels: List[int] = field(default_factory=list)
    domains: List[int] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)


def _readable(path: str) -> bool:
    """Whether Pillow reads the file's header (cheap: the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.size  # noqa: B018
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _subfolders(path: str) -> List[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: str) -> List[str]:
    return sorted(os.path.join(folder, e.name) for e in os.scandir(folder)
                  if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))


def _require_folder(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"imagefolder: {path} is missing ({what}); nothing is downloaded")


def _scan_classes(root: str, classes: Sequence[str], into: Scan, domain: int = 0,
                  keep=None) -> None:
    """Add the readable images of ``root/<class>/`` for each of ``classes`` present in ``root``;
    ``keep(class_index, files) -> files`` selects a part (the domain hold-out)."""
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        files = _image_files(folder)
        if not files:
            raise ValueError(f"imagefolder: {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        good = [f for f in files if _readable(f)]
        if len(good) != len(files):
            kept = set(good)
            into.skipped += [f for f in files if f not in kept]
        if not good:
            raise ValueError(f"imagefolder: no readable image in {folder} ({len(files)} file(s) that Pillow "
                             f"cannot open)")
        if keep is not None:
            good = keep(label, good)
        into.paths += good
        into.labels += [label] * len(good)
        into.domains += [domain] * len(good)


def _domain_order(names: Sequence[str]) -> List[str]:
    if set(names) <= set(DOMAINNET_ORDER):
        return [d for d in DOMAINNET_ORDER if d in names]
    return sorted(names)


@dataclass
class FolderData:
    """What :func:`scan_folder` found: the train/test images, labels, domains and class names."""
    train: Scan
    test: Scan
    classes: List[str]
    domains: List[str]


def scan_folder(data_dir: Optional[str], split: str) -> FolderData:
    """Find the images of ``data_dir`` for ``split`` (module docstring); raises FileNotFoundError
    or ValueError with one line naming the path."""
    if data_dir is None:
        raise FileNotFoundError("imagefolder needs --data-dir: DIR/train/<class>/* and DIR/val/<class>/*, or "
                                "DomainNet domains for --split domain")
    _require_folder(data_dir, "--data-dir")
    if split != "domain":
        train_root, val_root = os.path.join(data_dir, "train"), os.path.join(data_dir, "val")
        _require_folder(train_root, "expected DIR/train/<class>/* and DIR/val/<class>/*")
        _require_folder(val_root, "expected DIR/train/<class>/* and DIR/val/<class>/*")
        classes = _subfolders(train_root)
        if not classes:
            raise ValueError(f"imagefolder: {train_root} has no class folders (expected {train_root}/<class>/*)")
        extra = sorted(set(_subfolders(val_root)) - set(classes))
        if extra:
            raise ValueError(f"imagefolder: {os.path.join(val_root, extra[0])} is a class that "
                             f"{train_root} does not have")
        train, test = Scan(), Scan()
        _scan_classes(train_root, classes, train)
        _scan_classes(val_root, classes, test)
        if not test.paths:
            raise ValueError(f"imagefolder: {val_root} has no class folders with images")
        return FolderData(train, test, list(classes), [])
    lists = sorted(f[:-len("_train.txt")] for f in os.listdir(data_dir) if f.endswith("_train.txt"))
    if lists:
        return _scan_lists(data_dir, _domain_order(lists))
    domains = _domain_order(_subfolders(data_dir))
    if not domains:
        raise ValueError(f"imagefolder: {data_dir} has neither <domain>_train.txt lists nor domain folders "
                         f"({data_dir}/<domain>/<class>/*)")
    classes = sorted(set().union(*(_subfolders(os.path.join(data_dir, d)) for d in domains)))
    if not classes:
        raise ValueError(f"imagefolder: the domain folders of {data_dir} hold no class folders "
                         f"({data_dir}/<domain>/<class>/*)")
    train, test = Scan(), Scan()
    for d, name in enumerate(domains):
        root = os.path.join(data_dir, name)
        held_out = {}

        def keep(label, files, _d=d):
            rng = random.Random(f"{DOMAIN_SPLIT_SEED}/{_d}/{label}")
            order = list(range(len(files)))
            rng.shuffle(order)
            n_test = round(DOMAIN_TEST_FRACTION * len(files)) if len(files) > 1 else 0
            held_out[label] = [files[i] for i in sorted(order[:n_test])]
            return [files[i] for i in sorted(order[n_test:])]

        _scan_classes(root, classes, train, domain=d, keep=keep)
        for label in sorted(held_out):
            test.paths += held_out[label]
            test.labels += [label] * len(held_out[label])
            test.domains += [d] * len(held_out[label])
    return FolderData(train, test, classes, domains)


def _scan_lists(data_dir: str, domains: Sequence[str]) -> FolderData:
    """The DomainNet ``<domain>_{train,test}.txt`` lists (paths relative to ``data_dir``)."""
    scans = {"train": Scan(), "test": Scan()}
    for d, name in enumerate(domains):
        for split, scan in scans.items():
            listing = os.path.join(data_dir, f"{name}_{split}.txt")
            if not os.path.isfile(listing):
                raise FileNotFoundError(f"imagefolder: {listing} is missing (every <domain>_train.txt needs its "
                                        f"<domain>_test.txt)")
            with open(listing) as handle:
                for number, line in enumerate(handle, 1):
                    parts = line.split()
                    if not parts:
                        continue
                    if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                        raise ValueError(f"imagefolder: {listing} line {number} is not '<path> <label>': "
                                         f"{line.strip()!r}")
                    path = os.path.join(data_dir, parts[0])
                    if not (os.path.isfile(path) and _readable(path)):
                        scan.skipped.append(path)
                        continue
                    scan.paths.append(path)
                    scan.labels.append(int(parts[1]))
                    scan.domains.append(d)
    for split, scan in scans.items():
        for d, name in enumerate(domains):
            if d not in set(scan.domains):
                raise ValueError(f"imagefolder: {os.path.join(data_dir, f'{name}_{split}.txt')} lists no readable "
                                 f"image")
    num_classes = max(scans["train"].labels + scans["test"].labels) + 1
    return FolderData(scans["train"], scans["test"], [str(c) for c in range(num_classes)], list(domains))
