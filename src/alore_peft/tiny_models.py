"""Small random vision models of every transformers image-classification type, built from configs.

Nothing is downloaded: each model is built from a config whose widths are
small and divisible by 4 and 8 where the architecture allows, with one or two
blocks per stage and a 32-pixel image (64 where the architecture downsamples
too much for 32). Used by the coverage tests of the traced placement and by
anyone who wants to try ALoRE on an architecture without its weights::

    from alore_peft.tiny_models import tiny_model, example_inputs

    model = tiny_model("resnet")
    logits = model(**example_inputs(model)).logits

A type that cannot be built here (an optional package such as ``natten`` or
``timm`` is missing) raises :class:`TinyModelUnavailable` with the reason.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "IMAGE_SIZE",
    "TINY_CONFIGS",
    "DENSE_MODELS",
    "TinyModelUnavailable",
    "image_classification_types",
    "tiny_config",
    "tiny_model",
    "tiny_dense_model",
    "example_inputs",
]

IMAGE_SIZE = 32

_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=IMAGE_SIZE,
    patch_size=8,
)
_DINO = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=IMAGE_SIZE, patch_size=8
)
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=99)
_SWIN = dict(image_size=IMAGE_SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)
_CONVNEXT = dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, image_size=IMAGE_SIZE, layer_scale_init_value=1.0)
_RESNET_LIKE = dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], image_size=IMAGE_SIZE)

# model_type -> keyword arguments of its config (AutoConfig.for_model(model_type, **kwargs)).
# `image_size` is set on every config, also where the config class does not declare it,
# so that an example image can be built from the config alone.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "beit": dict(_VIT, use_relative_position_bias=True),
    "bit": dict(_RESNET_LIKE, num_groups=4),
    "clip": dict(vision_config=_VIT, text_config=_TEXT),
    "convnext": _CONVNEXT,
    "convnextv2": _CONVNEXT,
    "cvt": dict(
        embed_dim=[16, 32, 64],
        num_heads=[2, 2, 4],
        depth=[1, 2, 3],  # CvtStage indexes its drop-path rates by stage: depth[i] must exceed i
        image_size=IMAGE_SIZE,
    ),
    "data2vec-vision": dict(_VIT, use_relative_position_bias=True),
    "deit": _VIT,
    "dinat": dict(
        embed_dim=16, depths=[1, 1], num_heads=[2, 2], kernel_size=3, dilations=[[1], [1]], image_size=IMAGE_SIZE
    ),
    "dinov2": _DINO,
    "dinov2_with_registers": _DINO,
    "donut-swin": _SWIN,
    "efficientnet": dict(
        image_size=IMAGE_SIZE,
        width_coefficient=0.25,
        depth_coefficient=0.25,
        kernel_sizes=[3, 3],
        in_channels=[32, 16],
        out_channels=[16, 24],
        strides=[1, 2],
        num_block_repeats=[1, 2],
        expand_ratios=[1, 6],
        hidden_dim=320,  # the top conv's width, round_filters(1280) at width_coefficient=0.25
        num_hidden_layers=12,
    ),
    "focalnet": dict(image_size=IMAGE_SIZE, patch_size=4, embed_dim=16, depths=[1, 1], focal_levels=[2, 2],
                     focal_windows=[3, 3], hidden_sizes=[32, 64]),
    "hgnet_v2": dict(
        image_size=IMAGE_SIZE,
        stem_channels=[3, 8, 16],
        stage_in_channels=[16, 32],
        stage_mid_channels=[8, 16],
        stage_out_channels=[32, 64],
        stage_num_blocks=[1, 1],
        stage_downsample=[False, True],
        stage_light_block=[False, True],
        stage_kernel_size=[3, 3],
        stage_numb_of_layers=[2, 2],
        hidden_sizes=[32, 64],
        depths=[1, 1],
    ),
    "hiera": dict(
        image_size=[64, 64],
        embed_dim=16,
        depths=[1, 1],
        num_heads=[2, 2],
        num_query_pool=1,
        masked_unit_size=[8, 8],
        masked_unit_attention=[True, False],
    ),
    "ijepa": _VIT,
    "imagegpt": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, image_size=8),
    "levit": dict(
        image_size=64,
        hidden_sizes=[16, 32, 48],
        num_attention_heads=[2, 2, 2],
        depths=[1, 1, 1],
        key_dim=[8, 8, 8],
        down_ops=[["Subsample", 8, 2, 4, 2, 2], ["Subsample", 8, 2, 4, 2, 2]],
    ),
    "metaclip_2": dict(vision_config=_VIT, text_config=_TEXT),
    "mobilenet_v1": dict(image_size=IMAGE_SIZE, depth_multiplier=0.25),
    "mobilenet_v2": dict(image_size=IMAGE_SIZE, depth_multiplier=0.25),
    "mobilevit": dict(
        image_size=64,
        hidden_sizes=[16, 24, 32],
        neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32],
        num_attention_heads=2,
    ),
    "mobilevitv2": dict(image_size=64, width_multiplier=0.25, n_attn_blocks=[1, 1, 1]),
    "perceiver": dict(
        image_size=IMAGE_SIZE,
        num_latents=8,
        d_latents=32,
        d_model=32,
        num_blocks=1,
        num_self_attends_per_block=2,
        num_self_attention_heads=4,
        num_cross_attention_heads=4,
    ),
    "poolformer": dict(
        image_size=IMAGE_SIZE,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_encoder_blocks=2,
        patch_sizes=[7, 3],
        strides=[4, 2],
        padding=[2, 1],
        layer_scale_init_value=1.0,  # the default 1e-5 hides every block from the output
    ),
    "pp_lcnet": dict(
        image_size=IMAGE_SIZE,
        scale=0.25,
        block_configs=[  # (kernel, in, out, stride, squeeze-excite) per block; five stages are required
            [[3, 16, 32, 1, False]],
            [[3, 32, 64, 2, False]],
            [[3, 64, 128, 2, False]],
            [[3, 128, 256, 2, False]],
            [[5, 256, 512, 2, True]],
        ],
        depths=[1, 1, 1, 1, 1],
        class_expand=64,
    ),
    "pvt": dict(
        image_size=IMAGE_SIZE,
        num_encoder_blocks=2,
        depths=[1, 1],
        sequence_reduction_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[4, 2],
        strides=[4, 2],
        num_attention_heads=[2, 4],
        mlp_ratios=[4, 4],
    ),
    "pvt_v2": dict(
        image_size=IMAGE_SIZE,
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[2, 4],
        mlp_ratios=[4, 4],
        out_features=None,
        out_indices=None,
    ),
    "regnet": dict(_RESNET_LIKE, groups_width=8),
    "resnet": _RESNET_LIKE,
    "segformer": dict(
        image_size=IMAGE_SIZE,
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[2, 4],
        mlp_ratios=[4, 4],
        decoder_hidden_size=32,
    ),
    "shieldgemma2": dict(
        vision_config=dict(_VIT),
        text_config=dict(_TEXT, head_dim=8, num_key_value_heads=2, vocab_size=300),
        mm_tokens_per_image=4,
        boi_token_index=295,
        eoi_token_index=296,
        image_token_index=297,
    ),
    "siglip": dict(vision_config=_VIT, text_config=_TEXT),
    "siglip2": dict(vision_config=dict(_VIT, num_patches=16), text_config=_TEXT),
    "swiftformer": dict(
        image_size=IMAGE_SIZE, depths=[1, 1, 1, 1], embed_dims=[16, 16, 32, 32], layer_scale_init_value=1.0
    ),
    "swin": _SWIN,
    "swinv2": _SWIN,
    "textnet": dict(
        image_size=[IMAGE_SIZE, IMAGE_SIZE],
        stem_out_channels=8,
        hidden_sizes=[8, 16, 32],
        conv_layer_kernel_sizes=[[[3, 3], [1, 3]], [[3, 3], [3, 1]]],
        conv_layer_strides=[[1, 2], [2, 1]],
        depths=[2, 2],
        stage_names=["stem", "stage1", "stage2"],
        out_features=["stage2"],
    ),
    "timm_wrapper": dict(architecture="resnet18", image_size=IMAGE_SIZE),
    "vit": _VIT,
    "vit_msn": _VIT,
}

class TinyModelUnavailable(RuntimeError):
    """A model type that cannot be built small in this environment (the message says why)."""


def image_classification_types() -> list[str]:
    """Every model type of transformers' image-classification auto mapping, in its order."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return list(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def tiny_config(model_type: str, **overrides: Any):
    """The small config of ``model_type`` (see :data:`TINY_CONFIGS`), with ``overrides`` applied."""
    from transformers import AutoConfig

    if model_type not in TINY_CONFIGS:
        raise KeyError(
            f"No tiny config for model_type={model_type!r}; known types: {', '.join(sorted(TINY_CONFIGS))}. "
            "Add its small config to alore_peft.tiny_models.TINY_CONFIGS."
        )
    kwargs = {**TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """A small random image classifier of ``model_type`` in eval mode.

    Args:
        model_type: A key of transformers' image-classification auto mapping.
        seed: Seed of the random weights.
        overrides: Config values that replace the tiny ones.

    Raises:
        TinyModelUnavailable: The type cannot be built small here (the reason is
            in the message).
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    config = tiny_config(model_type, **overrides)
    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(model_type, "")
    name = names[0] if isinstance(names, (list, tuple)) else names  # the first class of a tuple (e.g. without teacher)
    torch.manual_seed(seed)
    try:
        model = getattr(transformers, name)(config)
    except Exception as exc:  # missing optional package, architecture that needs a download, ...
        raise TinyModelUnavailable(f"{model_type}: {type(exc).__name__}: {_first_line(exc)}") from exc
    _rescale(model)
    return model.eval()


def _rescale(model: nn.Module) -> None:
    """Variance-preserving random weights: N(0, 1 / fan_in) for linear/conv, unit norm scales.

    Some transformers vision models initialise conv weights, and even batch-norm
    scales, with a fixed std of 0.02; in a tiny network the features then shrink
    by orders of magnitude per stage (a tiny MobileViT's logits come out as exact
    zeros). Tests that compare outputs need features of order one throughout.
    """
    norms = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, fan_in**-0.5)
            elif isinstance(module, norms) and getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


# -- dense prediction -------------------------------------------------------------

def _upernet(backbone: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import UperNetConfig, UperNetForSemanticSegmentation

        backbone_config = tiny_config(backbone, out_features=_stage_names(backbone))
        config = UperNetConfig(
            backbone_config=backbone_config,
            hidden_size=16,
            use_auxiliary_head=False,  # it reads the third feature map; the tiny backbones have two
            pool_scales=[1, 2],
            num_labels=3,
            image_size=IMAGE_SIZE,
            num_channels=3,
        )
        return UperNetForSemanticSegmentation(config)

    return build


def _stage_names(model_type: str) -> list[str]:
    config = tiny_config(model_type)
    return [name for name in config.stage_names if name != "stem"]


def _dpt_dinov2() -> nn.Module:
    from transformers import Dinov2Config, DPTConfig, DPTForDepthEstimation

    backbone = Dinov2Config(**{**_DINO, "num_hidden_layers": 4}, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False, apply_layernorm=True)
    config = DPTConfig(
        backbone_config=backbone,
        is_hybrid=False,
        hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
        head_in_index=-1,
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_channels=3,
    )
    return DPTForDepthEstimation(config)


def _mask2former_swin() -> nn.Module:
    from transformers import Mask2FormerConfig, Mask2FormerModel

    backbone = tiny_config("swin", depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2], image_size=64, window_size=2,
                           out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,  # the pixel decoder's group norms have 32 groups
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=4,
        num_labels=3,
        common_stride=4,
        image_size=64,
        num_channels=3,
    )
    # The universal-segmentation class builds its Hungarian-matching loss, which needs scipy;
    # the model without the class and mask heads has the same backbone, pixel decoder and decoder.
    return Mask2FormerModel(config)


def _detr_like(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers as T

        config_cls, model_cls = _DETR_CLASSES[name]
        backbone = tiny_config("resnet", out_features=["stage1", "stage2"])
        kwargs: dict[str, Any] = dict(
            backbone_config=backbone,
            backbone=None,  # transformers before 5.x.y default it to "resnet50" and refuse both
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            d_model=16,
            encoder_layers=1,
            decoder_layers=2,  # Deformable DETR ties its box heads across decoder layers: it needs two
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            num_queries=4,
            num_labels=3,
            image_size=IMAGE_SIZE,
            num_channels=3,
        )
        params = inspect.signature(getattr(T, config_cls).__init__).parameters
        if "num_feature_levels" in params:  # deformable attention; its input projections use 32-group norms
            kwargs.update(num_feature_levels=2, encoder_n_points=2, decoder_n_points=2, d_model=32)
        kwargs = {k: v for k, v in kwargs.items() if k in params or k in ("image_size", "num_channels")}
        return getattr(T, model_cls)(getattr(T, config_cls)(**kwargs))

    return build


def _rt_detr() -> nn.Module:
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    backbone = RTDetrResNetConfig(
        embedding_size=8,
        hidden_sizes=[16, 32, 64, 64],
        depths=[1, 1, 1, 1],
        out_features=["stage2", "stage3", "stage4"],
    )
    config = RTDetrConfig(
        backbone_config=backbone,
        encoder_in_channels=[32, 64, 64],
        encoder_hidden_dim=32,
        encoder_ffn_dim=64,
        encoder_attention_heads=2,
        d_model=32,
        decoder_in_channels=[32, 32, 32],
        decoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        num_queries=4,
        num_denoising=0,
        num_labels=3,
        image_size=64,
        num_channels=3,
    )
    return RTDetrForObjectDetection(config)


def _segformer() -> nn.Module:
    from transformers import SegformerForSemanticSegmentation

    return SegformerForSemanticSegmentation(tiny_config("segformer", num_labels=3))


_DETR_CLASSES = {
    "detr": ("DetrConfig", "DetrForObjectDetection"),
    "conditional_detr": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection"),
    "deformable_detr": ("DeformableDetrConfig", "DeformableDetrForObjectDetection"),
    "table-transformer": ("TableTransformerConfig", "TableTransformerForObjectDetection"),
    "dab-detr": ("DabDetrConfig", "DabDetrForObjectDetection"),
}

# name -> builder of a small random dense-prediction model (eval mode is set by tiny_dense_model).
DENSE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "upernet-convnext": _upernet("convnext"),
    "upernet-swin": _upernet("swin"),
    "dpt-dinov2": _dpt_dinov2,
    "mask2former-swin": _mask2former_swin,
    **{name: _detr_like(name) for name in _DETR_CLASSES},
    "rt_detr": _rt_detr,
    "segformer": _segformer,
}


def tiny_dense_model(name: str, seed: int = 0) -> nn.Module:
    """A small random dense-prediction model (``DENSE_MODELS``) in eval mode."""
    if name not in DENSE_MODELS:
        raise KeyError(f"No tiny dense model {name!r}; known: {', '.join(DENSE_MODELS)}.")
    torch.manual_seed(seed)
    try:
        model = DENSE_MODELS[name]()
    except Exception as exc:
        raise TinyModelUnavailable(f"{name}: {type(exc).__name__}: {_first_line(exc)}") from exc
    _rescale(model)
    return model.eval()


# -- inputs --------------------------------------------------------------------------

def example_inputs(model: nn.Module, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs for one forward pass of a tiny model (see :func:`alore_peft.placement.example_inputs`)."""
    from .placement import example_inputs as from_config

    return from_config(model, batch_size=batch_size, seed=seed)
