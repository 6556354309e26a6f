"""Datasets, continual task splits and two-view augmentations written with batched tensor ops.

Digits and CIFAR are held in memory as float32 tensors (N, C, H, W) in [0, 1]; image folders
(folders.py) are decoded on demand by worker processes. No dataset is ever downloaded: ``digits``
ships inside scikit-learn, CIFAR is read from the standard python-pickle release in a local folder.
"""
from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .folders import IMAGENET_STATS, FolderImages, scan_folder, storage_size

# Fixed seed of the digits train/test split, so that every run (whatever its --seed) is scored
# on the same test images.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
DIGITS_SIZE = 16  # the 8x8 digits are upsampled once (bilinear) so that crops keep some detail

CIFAR_LAYOUT = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], label_key=b"labels", classes=10,
                    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"],
                     label_key=b"fine_labels", classes=100,
                     url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
# The authors normalise CIFAR-100 with the CIFAR-10 statistics too (their CifarTransform).
PAPER_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class ImageData:
    """A labelled train/test pair of images (tensors, or :class:`FolderImages` decoded on demand),
    with the per-channel normalisation. Domain data sets add each image's domain (an index into
    ``domains``); ``skipped`` lists the unreadable files left out."""
    train_x: Union[torch.Tensor, FolderImages]
    train_y: torch.Tensor
    test_x: Union[torch.Tensor, FolderImages]
    test_y: torch.Tensor
    num_classes: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    domains: Optional[List[str]] = None
    train_domain: Optional[torch.Tensor] = None
    test_domain: Optional[torch.Tensor] = None
    skipped: Tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]


@dataclass
class Task:
    """One step of the continual stream: its classes and the indices of its training images."""
    classes: List[int]
    train_indices: torch.Tensor


def load_digits_data() -> ImageData:
    """scikit-learn's 1,797 8x8 digits, split 80/20 per class with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits dataset comes with scikit-learn, which is not installed; "
            "install the trainer's extra: pip install 'pnr-kernels[train]'") from exc
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        test_mask[idx[: round(DIGITS_TEST_FRACTION * len(idx))]] = True
    train_x, test_x = x[~test_mask], x[test_mask]
    mean, std = train_x.mean().item(), train_x.std().item()
    return ImageData(train_x, y[~test_mask], test_x, y[test_mask], 10, (mean,), (std,))


def _read_cifar_batches(paths: Sequence[str], label_key: bytes) -> Tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                entry = pickle.load(handle, encoding="bytes")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
                IndexError, KeyError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a readable CIFAR python-pickle batch ({type(exc).__name__}: {exc}); "
                             f"extract the original archive again") from exc
        if not isinstance(entry, dict) or b"data" not in entry or label_key not in entry:
            raise ValueError(f"{path} is not a CIFAR python-pickle batch: it lacks b'data' or {label_key!r}")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.tensor(list(entry[label_key]), dtype=torch.long))
    return torch.cat(images).float() / 255.0, torch.cat(labels)


def load_cifar_data(name: str, data_dir: Optional[str]) -> ImageData:
    """CIFAR-10/100 from the python-pickle release: ``data_dir`` is the extracted folder
    (``cifar-10-batches-py`` / ``cifar-100-python``) or the folder that contains it."""
    layout = CIFAR_LAYOUT[name]
    if data_dir is None:
        raise FileNotFoundError(
            f"{name} needs --data-dir: a folder with the extracted python release "
            f"({layout['folder']}/ from {layout['url']}); nothing is downloaded")
    root = data_dir if os.path.basename(os.path.normpath(data_dir)) == layout["folder"] \
        else os.path.join(data_dir, layout["folder"])
    files = layout["train"] + layout["test"]
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise FileNotFoundError(
            f"{name}: missing {', '.join(missing)} in {root}; extract {layout['url']} into "
            f"{data_dir} (nothing is downloaded)")
    train_x, train_y = _read_cifar_batches([os.path.join(root, f) for f in layout["train"]], layout["label_key"])
    test_x, test_y = _read_cifar_batches([os.path.join(root, f) for f in layout["test"]], layout["label_key"])
    for split, y in (("train", train_y), ("test", test_y)):
        if y.numel() and (y.min() < 0 or y.max() >= layout["classes"]):
            raise ValueError(f"{name} {split} labels must lie in [0, {layout['classes']}), "
                             f"got [{y.min().item()}, {y.max().item()}]")
    mean, std = CIFAR_STATS[name]
    return ImageData(train_x, train_y, test_x, test_y, layout["classes"], mean, std)


def load_folder_data(data_dir: Optional[str], split: str, image_size: int) -> ImageData:
    """An image folder or DomainNet (folders.py), normalised with the ImageNet statistics."""
    found = scan_folder(data_dir, split)
    size = storage_size(image_size)

    def tensors(scan):
        return (FolderImages(scan.paths, size), torch.tensor(scan.labels, dtype=torch.long),
                torch.tensor(scan.domains, dtype=torch.long))

    train_x, train_y, train_d = tensors(found.train)
    test_x, test_y, test_d = tensors(found.test)
    domain = split == "domain"
    return ImageData(train_x, train_y, test_x, test_y, len(found.classes), *IMAGENET_STATS,
                     domains=found.domains if domain else None, train_domain=train_d if domain else None,
                     test_domain=test_d if domain else None,
                     skipped=tuple(found.train.skipped + found.test.skipped))


def load_data(name: str, data_dir: Optional[str] = None, *, split: str = "class",
              image_size: Optional[int] = None) -> ImageData:
    if name == "digits":
        return load_digits_data()
    if name in CIFAR_LAYOUT:
        return load_cifar_data(name, data_dir)
    if name == "imagefolder":
        return load_folder_data(data_dir, split, image_size)
    raise ValueError(f"dataset must be digits, cifar10, cifar100 or imagefolder; got {name!r}")


def make_tasks(labels: torch.Tensor, num_classes: int, num_tasks: int, split: str, seed: int,
               limit: Optional[int] = None, domains: Optional[torch.Tensor] = None) -> List[Task]:
    """Split the training set into ``num_tasks`` tasks.

    ``class``: a seeded permutation of the classes, cut into contiguous groups (sizes differ by at
    most one); a task holds every image of its classes. ``data``: a seeded permutation of all
    images cut into equal parts; every task holds all classes. ``domain``: task j holds the images
    of domain j (``domains``, one per image; ``num_tasks`` must be the number of domains) and the
    classes present there. ``limit`` keeps at most that many images per task (the first ones of a
    seeded shuffle), to make tiny runs.
    """
    generator = torch.Generator().manual_seed(seed)
    if split == "domain":
        if domains is None:
            raise ValueError("split 'domain' needs a dataset with domains (--dataset imagefolder)")
        tasks = []
        for d in range(num_tasks):
            idx = torch.nonzero(domains == d).flatten()
            tasks.append(Task(sorted(set(labels[idx].tolist())), idx))
    elif split == "class":
        if num_tasks > num_classes:
            raise ValueError(f"tasks ({num_tasks}) cannot exceed the number of classes ({num_classes})")
        order = torch.randperm(num_classes, generator=generator).tolist()
        groups = [list(map(int, g)) for g in np.array_split(order, num_tasks)]
        tasks = [Task(sorted(g), torch.nonzero(torch.isin(labels, torch.tensor(g))).flatten()) for g in groups]
    elif split == "data":
        if num_tasks > len(labels):
            raise ValueError(f"tasks ({num_tasks}) cannot exceed the number of images ({len(labels)})")
        order = torch.randperm(len(labels), generator=generator)
        tasks = [Task(list(range(num_classes)), torch.sort(part).values)
                 for part in torch.tensor_split(order, num_tasks)]
    else:
        raise ValueError(f"split must be 'class', 'data' or 'domain', got {split!r}")
    if limit is not None:
        for task in tasks:
            keep = torch.randperm(len(task.train_indices), generator=generator)[:limit]
            task.train_indices = torch.sort(task.train_indices[keep]).values
    return tasks


class TwoViewAugment:
    """SimCLR-style random augmentation of a batch, one independent draw per image.

    Random resized crop (area fraction in ``[min_scale, 1]``, aspect ratio in [3/4, 4/3]) and an
    optional horizontal flip are one affine map per image, applied with ``affine_grid`` +
    ``grid_sample`` (bilinear); colour jitter (brightness, contrast, saturation; each factor in
    ``[1 - s, 1 + s]``, applied with probability 0.8) and random grayscale (probability 0.2) for
    RGB, brightness and contrast only for grayscale; additive gaussian noise (std ``noise``,
    probability 0.5); then per-channel normalisation. Every random number comes from the
    ``generator`` passed to the call, so a run is reproducible from that generator's state.
    Hue jitter and blur are left out.

    ``size`` (image folders): the crops are resampled to ``size x size`` from the larger decoded
    square, and :meth:`eval_view` takes its central ``size x size`` crop; otherwise crops keep the
    input's size and evaluation sees the whole image.
    """
    interpolation = "bilinear"

    def __init__(self, data: ImageData, *, min_scale: float, flip: bool, jitter: float, noise: float,
                 size: Optional[int] = None):
        self.rgb = data.channels == 3
        self.min_scale, self.flip, self.jitter, self.noise = min_scale, flip, jitter, noise
        self.size = size
        self.mean = torch.tensor(data.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std).view(1, -1, 1, 1)

    @classmethod
    def for_dataset(cls, name: str, data: ImageData, size: Optional[int] = None) -> "TwoViewAugment":
        if name == "digits":  # no flips: a mirrored digit is another symbol
            return cls(data, min_scale=0.5, flip=False, jitter=0.4, noise=0.05)
        return cls(data, min_scale=0.08, flip=True, jitter=0.4, noise=0.02, size=size)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def eval_view(self, x: torch.Tensor) -> torch.Tensor:
        """What evaluation sees: the central ``size`` crop (when set), normalised."""
        if self.size is not None and x.shape[-1] != self.size:
            top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
            x = x[..., top:top + self.size, left:left + self.size]
        return self.normalize(x)

    def linear_view(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training view of the authors' linear evaluation: RandomResizedCrop (area 0.08-1)
        and a horizontal flip, normalised; no colour changes."""
        b = x.shape[0]

        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

        out = self._crop(x, generator, uniform, mode=self.interpolation, min_scale=0.08, flip=True)
        return self.normalize(out.clamp(0, 1))

    def __call__(self, x: torch.Tensor, generator: torch.Generator, view: int = 0) -> torch.Tensor:
        b = x.shape[0]

        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

        out = self._crop(x, generator, uniform, mode="bilinear")
        s = self.jitter
        apply = (torch.rand(b, 1, 1, 1, generator=generator) < 0.8).float()
        brightness, contrast, saturation = (uniform(1 - s, 1 + s, 1, 1, 1) for _ in range(3))
        brightness, contrast, saturation = (1 + apply * (f - 1) for f in (brightness, contrast, saturation))
        out = (out * brightness.to(x.device)).clamp(0, 1)
        gray = self._gray(out)
        out = ((out - gray.mean((1, 2, 3), keepdim=True)) * contrast.to(x.device)
               + gray.mean((1, 2, 3), keepdim=True)).clamp(0, 1)
        if self.rgb:
            gray = self._gray(out)
            out = (gray + (out - gray) * saturation.to(x.device)).clamp(0, 1)
            to_gray = (torch.rand(b, 1, 1, 1, generator=generator) < 0.2).to(x.device)
            out = torch.where(to_gray, self._gray(out).expand_as(out), out)
        noisy = (torch.rand(b, 1, 1, 1, generator=generator) < 0.5).float()
        noise = torch.randn(out.shape, generator=generator) * self.noise * noisy
        out = out + noise.to(x.device)
        return self.normalize(out)

    def _crop(self, x: torch.Tensor, generator: torch.Generator, uniform, mode: str,
              min_scale: Optional[float] = None, flip: Optional[bool] = None) -> torch.Tensor:
        """Random resized crop and optional horizontal flip, one affine map per image, resampled
        to ``size`` (or the input's size)."""
        b = x.shape[0]
        min_scale = self.min_scale if min_scale is None else min_scale
        flip = self.flip if flip is None else flip
        area = uniform(min_scale, 1.0)
        log_ratio = uniform(math.log(3 / 4), math.log(4 / 3))
        width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
        height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
        cx = uniform(-1.0, 1.0) * (1 - width)
        cy = uniform(-1.0, 1.0) * (1 - height)
        sign = torch.ones(b)
        if flip:
            sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = width * sign, cx
        theta[:, 1, 1], theta[:, 1, 2] = height, cy
        theta = theta.to(x.device)
        shape = list(x.shape) if self.size is None else [b, x.shape[1], self.size, self.size]
        grid = F.affine_grid(theta, shape, align_corners=False)
        return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)

    def _gray(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rgb:
            return x
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)


def _rgb_to_hsv(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, torch.remainder((g - b) / safe, 6.0),
                      torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
    hue = torch.where(delta > 0, hue, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return hue, sat, maxc


def _hsv_to_rgb(hue: torch.Tensor, sat: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + hue * 6.0, 6.0)
        channels.append(value - value * sat * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(channels, 1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images ``x`` (B, 3, H, W) in [0, 1] by ``shift`` (B,) turns."""
    hue, sat, value = _rgb_to_hsv(x)
    hue = torch.remainder(hue + shift.view(-1, 1, 1).to(x.device), 1.0)
    return _hsv_to_rgb(hue, sat, value)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable gaussian blur of ``x`` (B, C, H, W), one ``sigma`` (B,) per image, an odd
    ``kernel`` wide, reflected borders (DALI's GaussianBlur default)."""
    b, c, h, w = x.shape
    half = min(kernel // 2, h - 1, w - 1)
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    weights = torch.exp(-t.view(1, -1) ** 2 / (2 * sigma.to(x.device, x.dtype).view(-1, 1) ** 2))
    weights = (weights / weights.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, k)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (half, half, 0, 0), mode="reflect"), weights.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, half, half), mode="reflect"), weights.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


class PaperAugment(TwoViewAugment):
    """The authors' augmentation (``--recipe paper``), one independent draw per image.

    RandomResizedCrop to the full size with bicubic interpolation (area fraction in
    ``[min_scale, 1]``); ColorJitter(brightness, contrast, saturation, hue) with probability 0.8,
    its four adjustments in a random order per image, factors drawn as torchvision draws them
    (brightness/contrast/saturation in ``[max(0, 1 - s), 1 + s]``, hue shift in ``[-h, h]``);
    grayscale with probability 0.2; solarisation (``x -> 1 - x`` where ``x >= 0.5``) with a
    per-view probability (``solarize[view]``, asymmetric across the two views); horizontal flip;
    normalisation with the CIFAR-10 statistics for CIFAR-10 and CIFAR-100 alike. No noise. CIFAR:
    no blur. Image folders (their ImageNet-100/DomainNet DALI pipeline): the crop resampled to
    ``size``, and after the grayscale step a gaussian blur with a per-view probability
    (``blur[view]``), sigma uniform in [0.1, 2] and a 23-pixel window at 224 pixels (both scaled
    by ``size / 224``); ImageNet normalisation.
    """
    interpolation = "bicubic"

    def __init__(self, data: ImageData, *, min_scale: float, jitter: Tuple[float, float, float, float],
                 solarize: Tuple[float, float], mean=None, std=None, size: Optional[int] = None,
                 blur: Tuple[float, float] = (0.0, 0.0)):
        super().__init__(data, min_scale=min_scale, flip=True, jitter=0.0, noise=0.0, size=size)
        self.jitter4, self.solarize, self.blur = jitter, solarize, blur
        if mean is not None:
            self.mean = torch.tensor(mean).view(1, -1, 1, 1)
            self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator, view: int = 0) -> torch.Tensor:
        b = x.shape[0]

        def uniform(lo, hi, *shape):
            return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

        out = self._crop(x, generator, uniform, mode="bicubic").clamp(0, 1)
        bri, con, sat, hue = self.jitter4
        apply = torch.rand(b, generator=generator) < 0.8
        factors = [uniform(max(0.0, 1 - bri), 1 + bri), uniform(max(0.0, 1 - con), 1 + con),
                   uniform(max(0.0, 1 - sat), 1 + sat), uniform(-hue, hue)]
        order = torch.argsort(torch.rand(b, 4, generator=generator), dim=1)
        view4 = (-1, 1, 1, 1)
        for position in range(4):
            for op in range(4):
                mask = (apply & (order[:, position] == op)).view(view4).to(x.device)
                if not mask.any():
                    continue
                f = factors[op].to(x.device)
                if op == 0:
                    changed = out * f.view(view4)
                elif op == 1:
                    mean = self._gray(out).mean((1, 2, 3), keepdim=True)
                    changed = mean + (out - mean) * f.view(view4)
                elif op == 2:
                    gray = self._gray(out)
                    changed = gray + (out - gray) * f.view(view4)
                else:
                    changed = shift_hue(out, f) if self.rgb else out
                out = torch.where(mask, changed.clamp(0, 1), out)
        if self.rgb:
            to_gray = (torch.rand(b, 1, 1, 1, generator=generator) < 0.2).to(x.device)
            out = torch.where(to_gray, self._gray(out).expand_as(out), out)
        if any(self.blur):
            scale = out.shape[-1] / 224
            sigma = (0.1 + 1.9 * torch.rand(b, generator=generator)) * scale
            blurred = (torch.rand(b, 1, 1, 1, generator=generator) < self.blur[view]).to(x.device)
            kernel = 2 * max(1, round(11 * scale)) + 1
            out = torch.where(blurred, gaussian_blur(out, sigma, kernel).clamp(0, 1), out)
        solar = (torch.rand(b, 1, 1, 1, generator=generator) < self.solarize[view]).to(x.device)
        out = torch.where(solar & (out >= 0.5), 1 - out, out)
        return self.normalize(out)


def make_augment(recipe: str, method: str, dataset: str, data: ImageData,
                 image_size: Optional[int] = None) -> TwoViewAugment:
    """The two-view augmentation of a run: the recipe's for CIFAR and image folders, the digits
    one for digits."""
    if recipe == "paper" and dataset == "imagefolder":
        # Their ImageNet-100 and DomainNet scripts: blur 1.0 / 0.1 and solarisation 0 / 0.2 on the
        # two views; VICReg: crops of at least 20 %, solarisation 0.1 and (no --gaussian_prob, their
        # default) blur 0.5 on both.
        if method == "vicreg":
            return PaperAugment(data, min_scale=0.2, jitter=(0.4, 0.4, 0.2, 0.1), solarize=(0.1, 0.1),
                                blur=(0.5, 0.5), size=image_size)
        return PaperAugment(data, min_scale=0.08, jitter=(0.4, 0.4, 0.2, 0.1), solarize=(0.0, 0.2),
                            blur=(1.0, 0.1), size=image_size)
    if recipe == "paper" and dataset != "digits":
        if method == "vicreg":  # their VICReg script: crops of at least 20 %, solarisation 0.1 on both views
            return PaperAugment(data, min_scale=0.2, jitter=(0.4, 0.4, 0.2, 0.1), solarize=(0.1, 0.1),
                                mean=PAPER_CIFAR_STATS[0], std=PAPER_CIFAR_STATS[1])
        return PaperAugment(data, min_scale=0.08, jitter=(0.4, 0.4, 0.2, 0.1), solarize=(0.0, 0.2),
                            mean=PAPER_CIFAR_STATS[0], std=PAPER_CIFAR_STATS[1])
    return TwoViewAugment.for_dataset(dataset, data, size=image_size if dataset == "imagefolder" else None)
