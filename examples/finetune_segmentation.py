"""Fine-tune a small segmentation model with ALoRE in its backbone, then merge the adapter.

A random SegFormer (or UperNet) is taught to segment rectangles on noise: the
adapters sit where the traced placement puts them (the backbone's attention
and MLP inputs), the decode head is trained in full, and after training the
adapter is folded into the frozen weights. Nothing is downloaded::

    python examples/finetune_segmentation.py --steps 60
    python examples/finetune_segmentation.py --model upernet-convnext --output-dir /tmp/seg-alore

It prints the placement, the loss and pixel accuracy before and after, and the
largest difference between the merged and the adapted model's logits.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from peft import get_peft_model
from torch import nn

from alore_peft import AloreConfig
from alore_peft.placement import find_placement
from alore_peft.tiny_models import tiny_dense_model

HEADS = {"segformer": "decode_head", "upernet-convnext": "decode_head", "upernet-swin": "decode_head"}


def rectangles(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with one brighter rectangle each; labels 1 inside it, 0 outside."""
    images = torch.randn(n, 3, size, size, generator=generator) * 0.5  # (N, 3, H, W)
    masks = torch.zeros(n, size, size, dtype=torch.long)  # (N, H, W)
    for i in range(n):
        y0, x0 = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        h, w = torch.randint(size // 4, size // 2, (2,), generator=generator).tolist()
        images[i, :, y0 : y0 + h, x0 : x0 + w] += 1.5
        masks[i, y0 : y0 + h, x0 : x0 + w] = 1
    return images, masks


def pixel_accuracy(model, images: torch.Tensor, masks: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(pixel_values=images).logits  # (N, labels, h, w), h and w a fraction of the image's
        logits = torch.nn.functional.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    return (logits.argmax(1) == masks).float().mean().item()


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="segformer", choices=sorted(HEADS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output-dir", default=None, help="where to save the adapter (default: not saved)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = tiny_dense_model(args.model, seed=args.seed)
    size = model.config.image_size
    placement = find_placement(model)
    print(placement)
    # The decode head is new for the task: its linear and conv layers are trained in full and saved.
    head = HEADS[args.model]
    layers = model.get_submodule(head).named_modules()
    head_layers = [f"{head}.{name}" for name, m in layers if isinstance(m, (nn.Linear, nn.Conv2d))]
    config = AloreConfig(target_modules=placement.targets, modules_to_save=head_layers)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    gen = torch.Generator().manual_seed(args.seed)
    test_images, test_masks = rectangles(32, size, gen)
    model.eval()
    before = pixel_accuracy(model, test_images, test_masks)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    model.train()
    for step in range(args.steps):
        images, masks = rectangles(args.batch_size, size, gen)
        loss = model(pixel_values=images, labels=masks).loss  # upsamples the logits to the labels' size
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 6) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    model.eval()
    after = pixel_accuracy(model, test_images, test_masks)
    if args.output_dir:
        model.save_pretrained(args.output_dir)
    with torch.no_grad():
        adapted = model(pixel_values=test_images).logits
        merged_model = model.merge_and_unload()
        merged = merged_model(pixel_values=test_images).logits
    merge_diff = (merged - adapted).abs().max().item()
    print(f"pixel accuracy {before:.3f} -> {after:.3f}; merged vs adapted logits: max |diff| {merge_diff:.2e}")
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    return {"accuracy_before": before, "accuracy_after": after, "loss_first": first, "loss_last": last,
            "merge_diff": merge_diff, "logit_scale": adapted.abs().max().item()}


if __name__ == "__main__":
    main()
