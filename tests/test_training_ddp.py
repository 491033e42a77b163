"""Two-process DDP (gloo on CPU) through ``accelerate launch``: shards differ, gradients are synchronised."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("yaml")

from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from alore_peft.training import TrainArgs, train  # noqa: E402
from .training_fixtures import _fresh_accelerate_state, _one_thread  # noqa: F401 (autouse fixtures)

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["red", "green", "blue"]


def _split(count: int, seed: int):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(count):
        pixels = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
        pixels[..., i % 3] += 140
        images.append(Image.fromarray(pixels))
        labels.append(i % 3)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accelerate() -> list[str]:
    found = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if found is None:
        pytest.skip("the accelerate launcher is not installed")
    return [found]


TRAIN_FLAGS = [
    "--model-config", "tiny-vit",
    "--batch-size", "4",  # per process: 2 x 4 = the single-process batch of 8 below
    "--epochs", "1",
    "--learning-rate", "0.01",
    "--seed", "3",
    "--selection", "last",
    "--eval-split", "",
    "--no-merge",
    "--no-plot",
    "--no-progress",
]  # fmt: skip




def test_two_cpu_processes_run_ddp_over_gloo(tmp_path):
    data = tmp_path / "colours"
    datasets.DatasetDict(train=_split(24, 0), test=_split(12, 2)).save_to_disk(str(data))
    out = tmp_path / "ddp"
    command = _accelerate() + [
        "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(REPO / "examples" / "train_image_classification.py"),
        "--cpu", "--dataset", str(data), "--output-dir", str(out), "--rank-report", *TRAIN_FLAGS,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    reports = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["world_size"] == 2
        assert report["backend"] == "gloo"
        assert report["distributed_type"].endswith("MULTI_CPU")
        assert report["optimizer_steps"] == 3  # 24 images / (2 processes x 4)
    # different data shards, together the whole training set
    shard0, shard1 = (set(r["indices_by_epoch"]["0"]) for r in reports)
    assert len(shard0) == len(shard1) == 12 and not shard0 & shard1 and shard0 | shard1 == set(range(24))
    # identical weights at the end, although each process saw other images: gradients were averaged
    assert reports[0]["adapter_sha256"] == reports[1]["adapter_sha256"]
    # the shared rule matrices (one parameter used by every layer) trained and stayed in sync
    assert reports[0]["rules_sha256"] == reports[1]["rules_sha256"]
    assert reports[0]["rules_sha256"] != reports[0]["rules_init_sha256"]

    # Averaged gradients of 2 x 4 images = the gradient of the same 8 images on one process.
    single = tmp_path / "single"
    flags = dict(zip(TRAIN_FLAGS[::2], TRAIN_FLAGS[1::2]))
    train(
        TrainArgs(
            dataset=str(data), output_dir=str(single), model_config="tiny-vit", batch_size=8, epochs=1,
            learning_rate=float(flags["--learning-rate"]), seed=3, selection="last", eval_split="", merge=False,
            plot=False, progress=False, cpu=True,
        )
    )  # fmt: skip
    ddp_weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    single_weights = load_file(str(single / "adapter" / "adapter_model.safetensors"))
    assert ddp_weights.keys() == single_weights.keys()
    assert any("alore_rules" in key for key in ddp_weights)
    for key in ddp_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], atol=1e-5, rtol=1e-4, msg=key)
