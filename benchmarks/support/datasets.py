"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (no download)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "load_fashion_mnist"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data, ">u4", count=1 + ndim)
    if header[0] != magic:
        raise ValueError(f"{path}: not an idx file of {ndim} dimension(s) (magic {header[0]:#x})")
    shape = tuple(int(d) for d in header[1:])
    # a writable copy: frombuffer's view is read-only, which torch.from_numpy warns about
    return np.frombuffer(data, np.uint8, offset=4 * (1 + ndim)).reshape(shape).copy()


def load_fashion_mnist(
    split: str = "train",
    root: str | Path = FASHION_MNIST_DIR,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of the ``"train"`` or ``"test"`` split.

    Install the data with ``apt-get install -y dataset-fashion-mnist``.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images_file, labels_file = (root / name for name in _FILES[split])
    if not images_file.exists():
        raise FileNotFoundError(
            f"{images_file} not found; install the Debian package: "
            f"apt-get update && apt-get install -y dataset-fashion-mnist"
        )
    images = _read_idx(images_file, 0x803, 3)
    labels = _read_idx(labels_file, 0x801, 1)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in {split}")
    return images, labels
