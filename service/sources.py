"""What the coordinator needs to know about a job's data without loading it (and without torch): the
training split's size, read from an index (an IDX header, a folder listing), never from the images.
``workers.data`` builds the datasets on top of the same listings."""

from __future__ import annotations

import os
import struct

import fsspec

from service.spec import DataSpec, FashionMNISTData, ImageFolderData, SyntheticData

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def fashion_mnist_files(root: str | None, split: str) -> tuple[str, str]:
    """(images, labels) IDX files of a split; a clear error if Debian's package is not installed."""
    root = root or FASHION_MNIST_ROOT
    prefix = "train" if split == "train" else "t10k"
    images, labels = f"{root}/{prefix}-images-idx3-ubyte.gz", f"{root}/{prefix}-labels-idx1-ubyte.gz"
    if "://" not in root and not os.path.exists(labels):
        raise FileNotFoundError(
            f"data: Fashion-MNIST not found at {root}; install Debian's dataset-fashion-mnist"
            " (apt-get install dataset-fashion-mnist) or set data.root"
        )
    return images, labels


def idx_count(url: str) -> int:
    """The item count in a gzipped IDX file's header."""
    with fsspec.open(url, "rb", compression="gzip") as f:
        return struct.unpack(">I", f.read(8)[4:8])[0]


def image_folder_index(root: str) -> tuple[fsspec.AbstractFileSystem, list[str], list[tuple[str, int]]]:
    """torchvision's ImageFolder layout (``root/<class>/<image>``) on any fsspec URL:
    (filesystem, class names, [(path, label)]) in a stable order."""
    fs, path = fsspec.core.url_to_fs(root)
    classes = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p))
    if not classes:
        raise ValueError(f"data: no class folders under {root} (expected {root}/<class>/<image>)")
    samples = [
        (p, label)
        for label, cls in enumerate(classes)
        for p in sorted(fs.find(f"{path}/{cls}"))
        if p.lower().endswith(IMAGE_EXTENSIONS)
    ]
    return fs, classes, samples


def dataset_size(data: DataSpec) -> int:
    """Training samples of ``data`` (the plan needs only this)."""
    if isinstance(data, SyntheticData):
        return data.size
    if isinstance(data, FashionMNISTData):
        return idx_count(fashion_mnist_files(data.root, "train")[1])
    assert isinstance(data, ImageFolderData)
    try:
        return len(image_folder_index(data.train)[2])
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - credentials, network, permissions: say which and where
        raise ValueError(
            f"data.train: cannot list {data.train}: {type(e).__name__}: {e} (to plan without reading the "
            "data, pass --dataset-size N)"
        ) from None
