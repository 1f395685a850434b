"""What the coordinator needs to know about a job's data without loading it (and without torch): the
training split's size, read from an index (an IDX header, a folder listing), never from the images.
``workers.data`` builds the datasets on top of the same listings."""

from __future__ import annotations

import os
import struct

import fsspec

from service import tiers
from service.spec import CustomData, DataSpec, FashionMNISTData, ImageFolderData, SyntheticData

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
    entries = fs.ls(path, detail=False)
    if {p.rstrip("/").rsplit("/", 1)[-1] for p in entries} & {tiers.MANIFEST, tiers.INTENT}:
        # its tier folders would be listed as classes, every image once per tier
        raise ValueError(
            f"data: {root} holds the resolution tiers of `stagetrain prepare`: a stage reads one of them "
            "(service.tiers.tier_root), not the folder itself"
        )
    classes = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries if fs.isdir(p))
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
    if isinstance(data, CustomData):
        return len(custom_dataset(data, "train"))
    assert isinstance(data, ImageFolderData)
    try:
        prepared = tiers.read_manifest(data.train)  # stagetrain prepare: every tier has the same samples
        if prepared:
            tiers.check_bad_images(prepared, data.on_bad_image == "skip")
        return prepared.samples if prepared else len(image_folder_index(data.train)[2])
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - credentials, network, permissions: say which and where
        raise ValueError(
            f"data.train: cannot list {data.train}: {type(e).__name__}: {e} (to plan without reading the "
            "data, pass --dataset-size N)"
        ) from None


def resolve_callable(path: str, field: str):
    """``package.module:function`` -> the function, or a ValueError naming ``field`` (with the closest
    name the module has). The coordinator checks ``model.builder`` before a job is written, so a typo is
    invalid input; on a worker the same error starts with the field, and the coordinator does not retry
    it (``decisions.CONFIG_FIELDS``)."""
    import difflib
    import importlib

    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"{field}: cannot import {module_name!r} ({e}); it must be importable where stagetrain runs "
            "and on every worker (installed, or shipped with the Ray runtime_env)"
        ) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean {module_name}:{close[0]}?" if close else ""
        raise ValueError(f"{field}: {module_name!r} has no function {name!r}{hint}")
    return fn


def check_callable(path: str, field: str) -> None:
    """``resolve_callable``'s check, without running the module when its source shows ``name`` defined by
    a top-level ``def`` or ``class``: the coordinator checks ``model.builder`` this way and so does not
    import the model code, and torch with it (~3 s of CPU per run on a 2-core machine; only the workers
    need it). Anything else (a name assigned or imported, a compiled module, a typo) is imported and
    checked as the workers will, with the same errors."""
    import ast
    import importlib.util

    module_name, _, name = path.partition(":")
    try:
        found = importlib.util.find_spec(module_name)  # imports the parent packages only
        with open(found.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read(), found.origin)
    except Exception:  # noqa: BLE001 - no spec, no source, not Python: the import says what is wrong
        tree = None
    defined = {
        node.name
        for node in (tree.body if tree is not None else [])
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }
    if name not in defined:
        resolve_callable(path, field)


def custom_dataset(data: CustomData, split: str):
    """``data.factory(split=split, **data.kwargs)``: the user's map-style dataset (imports their code, and
    with it whatever it imports: torch, usually)."""
    fn = resolve_callable(data.factory, "data.factory")
    dataset = fn(split=split, **data.kwargs)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise ValueError(
            f"data.factory: {data.factory}(split={split!r}) returned {type(dataset).__name__}, not a "
            "map-style Dataset (__getitem__ and __len__)"
        )
    return dataset
