"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` as a ``datasets.DatasetDict``.

The Debian package installs the original Zalando gzip IDX files under
``/usr/share/datasets/fashion-mnist/`` (60 000 training and 10 000 test images,
28 x 28 grayscale, 10 classes).

Images are stored as they are: single-channel ("L") PNGs. The backbones need
three channels; the image processors written by
:func:`~alore_peft.offline.dinov2.prepare_dinov2_small` and
:func:`~alore_peft.offline.mobilenet_v2.prepare_mobilenet_v2` convert to RGB
themselves (``do_convert_rgb``), and any other pipeline can decode RGB directly
with ``ds.cast_column("image", datasets.Image(mode="RGB"))``.
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from alore_peft.offline._common import (
    APT_INSTALL_FASHION_MNIST,
    PIP_INSTALL_PILLOW,
    OfflinePreparationError,
    check_out_dir,
    require_module,
    staged_output,
)

if TYPE_CHECKING:
    import numpy as np
    from datasets import Dataset, DatasetDict

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC = 2051  # IDX: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 2049  # IDX: unsigned bytes, 1 dimension


def _source_file(source_dir: Path, name: str) -> Path:
    path = source_dir / name
    if not path.is_file():
        hint = (
            f"install the Debian package with `{APT_INSTALL_FASHION_MNIST}`"
            if str(source_dir) == DEFAULT_SOURCE_DIR
            else f"pass the folder holding the IDX files as source_dir, or install the Debian package with "
            f"`{APT_INSTALL_FASHION_MNIST}` and use the default source_dir={DEFAULT_SOURCE_DIR!r}"
        )
        raise OfflinePreparationError(f"The Fashion-MNIST file {str(path)!r} does not exist; {hint}.")
    return path


def read_idx_images(path: str | Path) -> np.ndarray:
    """Read a gzip IDX image file.

    Args:
        path: ``*-images-idx3-ubyte.gz`` file.

    Returns:
        ``uint8`` array of shape ``(num_images, rows, cols)``.
    """
    import numpy as np

    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != _IMAGES_MAGIC:
        raise OfflinePreparationError(f"{str(path)!r} is not an IDX image file (magic {magic}, expected 2051).")
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16)
    if pixels.size != count * rows * cols:
        raise OfflinePreparationError(
            f"{str(path)!r} is truncated: header announces {count}x{rows}x{cols} pixels, found {pixels.size}."
        )
    # flat pixel stream -> (num_images, rows, cols)
    return pixels.reshape(count, rows, cols)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Read a gzip IDX label file.

    Args:
        path: ``*-labels-idx1-ubyte.gz`` file.

    Returns:
        ``int64`` array of shape ``(num_labels,)``.
    """
    import numpy as np

    with gzip.open(path, "rb") as handle:
        data = handle.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic != _LABELS_MAGIC:
        raise OfflinePreparationError(f"{str(path)!r} is not an IDX label file (magic {magic}, expected 2049).")
    labels = np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)
    if labels.size != count:
        raise OfflinePreparationError(f"{str(path)!r} is truncated: {count} labels announced, {labels.size} found.")
    return labels


def balanced_indices(labels: np.ndarray, size: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Pick ``size`` indices with per-class counts that differ by at most one.

    Classes take turns in a seeded order, and within a class the examples are
    drawn in a seeded random order, so the result depends only on ``labels``,
    ``size``, ``seed`` and ``exclude``.

    Args:
        labels: Integer class label of every candidate example.
        size: Number of indices to return.
        seed: Seed of the random generator.
        exclude: Indices that must not be picked.

    Returns:
        Sorted ``int64`` array of distinct indices into ``labels``.

    Raises:
        ValueError: If a class runs out of examples before ``size`` is reached.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    available = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        available[exclude] = False
    classes = np.unique(labels)
    per_class = size // len(classes)
    # Which classes get one extra example when size is not a multiple of the class count.
    extra = set(rng.permutation(classes)[: size - per_class * len(classes)].tolist())
    chosen = []
    for cls in classes:
        want = per_class + (1 if int(cls) in extra else 0)
        pool = np.flatnonzero((labels == cls) & available)
        if len(pool) < want:
            raise ValueError(
                f"size={size} needs {want} examples of class {int(cls)} but only {len(pool)} are available; "
                "ask for fewer examples."
            )
        chosen.append(rng.permutation(pool)[:want])
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _to_dataset(images: np.ndarray, labels: np.ndarray) -> Dataset:
    require_module("PIL", PIP_INSTALL_PILLOW, "to encode the Fashion-MNIST images")
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    encoded = []
    for pixels in images:
        buffer = io.BytesIO()
        PILImage.fromarray(pixels).save(buffer, format="PNG")
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = Features({"image": Image(), "label": ClassLabel(names=list(FASHION_MNIST_CLASSES))})
    return Dataset.from_dict({"image": encoded, "label": labels.tolist()}, features=features)


def load_fashion_mnist_arrays(
    source_dir: str | Path = DEFAULT_SOURCE_DIR,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read both splits into memory.

    Args:
        source_dir: Folder holding the four gzip IDX files.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}``.
    """
    source = Path(source_dir)
    arrays = {}
    for split, (image_file, label_file) in _FILES.items():
        images = read_idx_images(_source_file(source, image_file))
        labels = read_idx_labels(_source_file(source, label_file))
        if len(images) != len(labels):
            raise OfflinePreparationError(
                f"The {split} split has {len(images)} images but {len(labels)} labels in {str(source)!r}."
            )
        arrays[split] = (images, labels)
    return arrays


def prepare_fashion_mnist(
    out_dir: str | Path,
    *,
    source_dir: str | Path = DEFAULT_SOURCE_DIR,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write Fashion-MNIST as a ``DatasetDict`` (``train``, ``test``) with ``save_to_disk``.

    Features: ``image`` (``datasets.Image``, 28 x 28 grayscale "L" PNG) and ``label``
    (``datasets.ClassLabel`` with the ten Fashion-MNIST class names). Load it back
    with ``datasets.load_from_disk(out_dir)``.

    Args:
        out_dir: Destination folder.
        source_dir: Folder holding the gzip IDX files of the Debian package.
        train_size: Keep a class-balanced random subset of this many training
            images (all 60 000 when ``None``).
        test_size: Same for the 10 000 test images.
        seed: Seed of the subset selection.
        overwrite: Replace ``out_dir`` if it exists and is not empty.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        OfflinePreparationError: If the Debian data is missing or ``out_dir`` is
            non-empty without ``overwrite``.
        ValueError: If a requested size is not positive or exceeds the split.
    """
    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value} must be a positive number of images, or None for the whole split.")
    out_path = check_out_dir(out_dir, overwrite)
    from datasets import DatasetDict

    arrays = load_fashion_mnist_arrays(source_dir)
    splits = {}
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = arrays[split]
        if size is not None:
            if size > len(labels):
                raise ValueError(
                    f"{split}_size={size} exceeds the {len(labels)} images of the {split} split; "
                    "use a smaller size or None."
                )
            keep = balanced_indices(labels, size, seed)
            images, labels = images[keep], labels[keep]
        splits[split] = _to_dataset(images, labels)
    with staged_output(out_path) as staging:
        DatasetDict(splits).save_to_disk(str(staging))
    return out_path


def low_data_split(
    dataset_dict: DatasetDict,
    train: int = 800,
    val: int = 200,
    test: int = 2000,
    seed: int = 0,
) -> DatasetDict:
    """Draw a deterministic, class-balanced low-data benchmark from a train/test ``DatasetDict``.

    ``train`` and ``validation`` are disjoint subsets of ``dataset_dict["train"]``;
    ``test`` is a subset of ``dataset_dict["test"]``, so no evaluation image is
    ever trained or tuned on. Per-class counts in every split differ by at most one.

    Args:
        dataset_dict: Must contain ``train`` and ``test`` splits with a
            ``ClassLabel`` column named ``label``.
        train: Number of training examples.
        val: Number of validation examples.
        test: Number of test examples.
        seed: Seed of the selection; the same seed gives the same split.

    Returns:
        ``DatasetDict`` with ``train``, ``validation`` and ``test``.

    Raises:
        ValueError: If a split is missing or a size cannot be met.
    """
    import numpy as np
    from datasets import DatasetDict

    for split in ("train", "test"):
        if split not in dataset_dict:
            raise ValueError(
                f"dataset_dict has splits {sorted(dataset_dict)}, but low_data_split needs a {split!r} split."
            )
    for name, value in (("train", train), ("val", val), ("test", test)):
        if value <= 0:
            raise ValueError(f"{name}={value} must be a positive number of examples.")
    # Reading only the label column (respecting any earlier select) avoids decoding images.
    source_labels = np.asarray(dataset_dict["train"].select_columns(["label"])[:]["label"])
    test_labels = np.asarray(dataset_dict["test"].select_columns(["label"])[:]["label"])
    train_idx = balanced_indices(source_labels, train, seed)
    # A different stream for validation keeps the train subset identical whatever val is.
    val_idx = balanced_indices(source_labels, val, seed + 1, exclude=train_idx)
    test_idx = balanced_indices(test_labels, test, seed + 2)
    return DatasetDict(
        {
            "train": dataset_dict["train"].select(train_idx),
            "validation": dataset_dict["train"].select(val_idx),
            "test": dataset_dict["test"].select(test_idx),
        }
    )
