"""Image-classification data for the training loop: loading, labels, transforms, batching.

A dataset is a Hub name, a local ``imagefolder`` directory or a
``save_to_disk`` folder; the default is the offline Fashion-MNIST low-data
split prepared by :func:`prepare_default_dataset`. Pixels come from the
backbone's image processor (``AutoImageProcessor``); the augmentations are
written with PIL so they need no torchvision.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = [
    "DEFAULT_CACHE_ENV",
    "ImageTransform",
    "ImageClassificationDataset",
    "DataBundle",
    "cache_dir",
    "collate",
    "label_names",
    "load_data",
    "load_dataset_source",
    "prepare_default_dataset",
    "select_split",
]

DEFAULT_CACHE_ENV = "ALORE_PEFT_CACHE"


def cache_dir(path: Optional[str] = None) -> Path:
    """Folder for the offline default model and data.

    Args:
        path: Explicit folder; ``None`` uses ``$ALORE_PEFT_CACHE`` or
            ``~/.cache/alore_peft``.
    """
    if path:
        return Path(path).expanduser()
    return Path(os.environ.get(DEFAULT_CACHE_ENV) or "~/.cache/alore_peft").expanduser()


def prepare_default_dataset(
    cache: Optional[str | Path] = None, train: int = 500, val: int = 100, test: int = 1000, seed: int = 0
) -> Path:
    """Prepare (once) the offline Fashion-MNIST low-data split and return its folder.

    Only ``train + val`` training and ``test`` test images are encoded, drawn
    class-balanced with :func:`alore_peft.offline.prepare_fashion_mnist`, then
    split by :func:`alore_peft.offline.low_data_split` into disjoint ``train``
    and ``validation`` and a ``test`` split, saved with ``save_to_disk``.

    Args:
        cache: Cache folder (see :func:`cache_dir`).
        train: Training images.
        val: Validation images (disjoint from ``train``).
        test: Test images (from the Fashion-MNIST test set).
        seed: Seed of the selection.

    Returns:
        The folder, loadable with ``datasets.load_from_disk``.
    """
    from datasets import load_from_disk

    from alore_peft.offline import low_data_split, prepare_fashion_mnist
    from alore_peft.offline._common import staged_output

    root = cache_dir(None if cache is None else str(cache))
    target = root / f"fashion-mnist-lowdata-{train}-{val}-{test}-seed{seed}"
    if (target / "dataset_dict.json").is_file():
        return target
    pool = root / f"fashion-mnist-pool-{train + val}-{test}-seed{seed}"
    if not (pool / "dataset_dict.json").is_file():
        prepare_fashion_mnist(pool, train_size=train + val, test_size=test, seed=seed, overwrite=True)
    split = low_data_split(load_from_disk(str(pool)), train=train, val=val, test=test, seed=seed)
    with staged_output(target) as staging:
        split.save_to_disk(str(staging))
    return target


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or os.sep in text.rstrip(os.sep) and Path(text).parent.exists()


def load_dataset_source(source: str, config: Optional[str] = None):
    """Load a ``DatasetDict`` from a ``save_to_disk`` folder, an image folder or the Hub.

    Args:
        source: Folder path or Hub dataset name.
        config: Hub configuration name.

    Returns:
        A ``datasets.DatasetDict`` (a single saved ``Dataset`` becomes its ``train`` split).

    Raises:
        ValueError: If the path does not exist or nothing can be loaded from it.
    """
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        try:
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        except Exception as error:  # datasets raises several types for a folder without images
            raise ValueError(
                f"--dataset {source!r} is a folder but neither a save_to_disk dataset (no dataset_dict.json or "
                f"state.json) nor an image folder datasets can read ({type(error).__name__}: {error}). Use one "
                "sub-folder of images per class, optionally under train/ and test/ folders."
            ) from error
    if path.exists():
        raise ValueError(
            f"--dataset {source!r} is a file; pass a folder (save_to_disk output or an image folder) or a Hub dataset "
            "name."
        )
    if _looks_like_path(source):
        raise ValueError(
            f"--dataset {source!r} does not exist. Pass an existing folder (save_to_disk output or an image folder), "
            "a Hub dataset name, or leave --dataset out for the offline Fashion-MNIST default."
        )
    try:
        return datasets.load_dataset(source, config)
    except Exception as error:
        raise ValueError(
            f"--dataset {source!r} is not a local folder and could not be loaded from the Hugging Face Hub "
            f"({type(error).__name__}: {error}). Check the name (and --dataset-config), or pass a local folder."
        ) from error


def select_split(dataset_dict, expression: str, flag: str):
    """One split, or ``"a+b"`` concatenated, with an error that lists the available splits."""
    import datasets

    names = [part.strip() for part in expression.split("+") if part.strip()]
    missing = [name for name in names if name not in dataset_dict]
    if not names or missing:
        raise ValueError(
            f"{flag} {expression!r} names split(s) {missing or [expression]} that the dataset does not have; its "
            f"splits are {sorted(dataset_dict)}. Pass one of them (join several with '+')."
        )
    parts = [dataset_dict[name] for name in names]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _check_columns(dataset, image_column: str, label_column: str, split: str) -> None:
    import datasets

    columns = list(dataset.column_names)
    for flag, column in (("--image-column", image_column), ("--label-column", label_column)):
        if column not in columns:
            raise ValueError(
                f"The {split!r} split has no column {column!r} (its columns are {columns}); pass the right name with "
                f"{flag}. A dataset without labels cannot train a classifier."
            )
    feature = dataset.features[image_column]
    if not isinstance(feature, datasets.Image):
        raise ValueError(
            f"Column {image_column!r} of the {split!r} split holds {feature!r}, not images; pass the image column "
            "with --image-column."
        )


def label_names(splits: dict[str, Any], label_column: str) -> list[str]:
    """Class names: the ``ClassLabel`` names, else the sorted distinct values of all splits."""
    import datasets

    first = next(iter(splits.values()))
    feature = first.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    values: set = set()
    for dataset in splits.values():
        values.update(dataset.unique(label_column))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise ValueError(f"Label column {label_column!r} has negative values; labels must be 0..num_labels-1.")
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


class ImageTransform:
    """PIL image -> normalised ``(3, H, W)`` tensor, with optional augmentation.

    Resizing to ``image_size`` is done here with PIL (bicubic); rescaling and
    normalisation are the image processor's. Without ``image_size`` the
    processor does everything (its own resize and crop).

    Args:
        processor: An image processor (``AutoImageProcessor``).
        image_size: Square side in pixels, or ``None`` for the processor's size.
        augmentation: ``"none"``, ``"flip"`` or ``"crop_flip"``.
    """

    def __init__(self, processor: Any, image_size: Optional[int], augmentation: str = "none") -> None:
        self.processor = processor
        self.image_size = image_size
        self.augmentation = augmentation
        if image_size is None:
            probe = self._process(_blank_image(), resize=True)
            self.output_hw = tuple(probe.shape[-2:])
        else:
            self.output_hw = (image_size, image_size)

    def _process(self, image, resize: bool) -> torch.Tensor:
        kwargs = {} if resize else {"do_resize": False, "do_center_crop": False}
        return self.processor(images=[image], return_tensors="pt", **kwargs)["pixel_values"][0]

    def __call__(self, image, rng: Optional[random.Random] = None) -> torch.Tensor:
        from PIL import Image

        image = image.convert("RGB")
        if self.augmentation == "crop_flip" and rng is not None:
            image = _random_resized_crop(image, self.output_hw, rng)
            resized = True
        else:
            resized = self.image_size is not None
            if resized:
                image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        if self.augmentation in ("flip", "crop_flip") and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return self._process(image, resize=not resized)


def _blank_image():
    from PIL import Image

    return Image.new("RGB", (64, 64))


def _random_resized_crop(image, output_hw: tuple[int, int], rng: random.Random, scale=(0.08, 1.0), ratio=(0.75, 4 / 3)):
    """The Inception-style random resized crop (area ``scale``, aspect ``ratio``), then resize to ``output_hw``."""
    from PIL import Image

    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            box = (left, top, left + w, top + h)
            break
    if box is None:  # ten misses: the largest centred crop within the ratio bounds (as torchvision does)
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        box = (left, top, left + w, top + h)
    return image.resize((output_hw[1], output_hw[0]), Image.BICUBIC, box=box)


class ImageClassificationDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` seen as ``{"pixel_values", "labels", "index"}`` examples.

    The augmentation of example ``i`` in epoch ``e`` draws from a generator
    seeded by ``(seed, e, i)`` only, so it is the same whatever the process
    count, the batch order or an interruption and resume.

    Args:
        dataset: The split.
        transform: The image transform.
        image_column: Image column name.
        label_column: Label column name.
        label_to_id: Maps non-integer label values to class ids.
        seed: Base seed of the augmentation.
    """

    def __init__(
        self,
        dataset,
        transform: ImageTransform,
        image_column: str,
        label_column: str,
        label_to_id: Optional[dict[str, int]] = None,
        seed: int = 0,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column
        self.label_to_id = label_to_id
        self.seed = seed
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s augmentation. (Not named ``set_epoch``: Accelerate would call that itself.)"""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
        label = row[self.label_column]
        if self.label_to_id is not None:
            label = self.label_to_id[str(label)]
        augment = self.transform.augmentation != "none"
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}") if augment else None
        return {
            "pixel_values": self.transform(row[self.image_column], rng),
            "labels": int(label),
            "index": int(index),
        }


def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples into a batch: ``pixel_values`` ``(B, 3, H, W)``, ``labels`` and ``index`` ``(B,)``."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long),
        "index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
    }


@dataclass
class DataBundle:
    """The splits of a run and their labels.

    Attributes:
        train: Training split (``datasets.Dataset``).
        eval: Per-epoch evaluation split, or ``None``.
        test: Final test split, or ``None`` (then ``eval`` is used).
        labels: Class names; index = class id.
        label_to_id: Map for string labels, ``None`` for integer labels.
        source: Where the data came from, for the record.
    """

    train: Any
    eval: Any
    test: Any
    labels: list[str]
    label_to_id: Optional[dict[str, int]]
    source: str


def load_data(args) -> DataBundle:
    """Load the splits named by ``args`` (a :class:`~alore_peft.training.args.TrainArgs`).

    Raises:
        ValueError: On a bad path, a missing split or a missing column.
    """
    import datasets

    if args.dataset is None:
        folder = prepare_default_dataset(
            args.cache_dir, args.offline_train_size, args.offline_val_size, args.offline_test_size
        )
        dataset_dict = datasets.load_from_disk(str(folder))
        source = str(folder)
    else:
        dataset_dict = load_dataset_source(args.dataset, args.dataset_config)
        source = args.dataset

    train = select_split(dataset_dict, args.train_split, "--train-split")
    eval_split = select_split(dataset_dict, args.eval_split, "--eval-split") if args.eval_split else None
    test_split = select_split(dataset_dict, args.test_split, "--test-split") if args.test_split else None
    splits = {"train": train, "eval": eval_split, "test": test_split}
    splits = {name: split for name, split in splits.items() if split is not None}
    for name, split in splits.items():
        _check_columns(split, args.image_column, args.label_column, name)
        if len(split) == 0:
            raise ValueError(f"The {name} split of --dataset {source!r} is empty.")
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples:
        if eval_split is not None:
            eval_split = eval_split.select(range(min(args.max_eval_samples, len(eval_split))))
        if test_split is not None:
            test_split = test_split.select(range(min(args.max_eval_samples, len(test_split))))
    labels = label_names({"train": train, **{k: v for k, v in splits.items() if k != "train"}}, args.label_column)
    feature = train.features[args.label_column]
    integer_labels = isinstance(feature, datasets.ClassLabel) or feature.dtype.startswith(("int", "uint"))
    label_to_id = None if integer_labels else {name: i for i, name in enumerate(labels)}
    if len(labels) < 2:
        raise ValueError(
            f"Column {args.label_column!r} has {len(labels)} distinct label(s); a classifier needs at least two."
        )
    return DataBundle(train, eval_split, test_split, labels, label_to_id, source)
