"""Crash safety: ``alore-train`` SIGKILLed at random moments, checkpoint writes included, then resumed.

The training command runs as a real subprocess (a tiny model, 12 optimizer
steps, a checkpoint after every step). Each checkpoint write is slowed down
inside ``accelerator.save_state`` so that kills land in it; the child records
every write it starts in a marker file. The job is killed (SIGKILL, no
clean-up) several times, at moments drawn from a seeded generator, some in
the middle of a checkpoint write and some between writes, each time resumed
with ``--resume-from-checkpoint latest``; the final adapter file must be
bit-identical to an uninterrupted run's, and so must the metrics log.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("yaml")
pytest.importorskip("PIL")

from alore_peft.training import TrainArgs, train  # noqa: E402

from .test_training import _split  # noqa: E402
from .training_fixtures import _fresh_accelerate_state, _one_thread  # noqa: F401 (autouse fixtures)

REPO = Path(__file__).resolve().parents[1]
PAUSE_S = 0.4  # added inside every checkpoint write of the child

# Runs `alore-train` with accelerator.save_state slowed down; every write it starts is one marker line.
LAUNCHER = """
import os, sys, time
import accelerate

original = accelerate.Accelerator.save_state

def save_state(self, output_dir=None, **kwargs):
    result = original(self, output_dir, **kwargs)  # files written, the checkpoint not yet complete
    with open(os.environ["ALORE_FAULT_MARKER"], "a") as marker:
        marker.write(str(output_dir) + "\\n")
    time.sleep(float(os.environ["ALORE_FAULT_PAUSE"]))
    return result

accelerate.Accelerator.save_state = save_state
from alore_peft.training.loop import main
sys.exit(main(sys.argv[1:]))
"""

FLAGS = dict(
    model_config="tiny-vit", batch_size=4, epochs=2, learning_rate=1e-2, warmup_epochs=0.5, seed=3,
    augmentation="crop_flip", checkpoint_steps=1, keep_checkpoints=2, logging_steps=1, merge=False, plot=False,
    progress=False, cpu=True,
)  # fmt: skip


def _argv(dataset: str, output_dir: Path, resume: bool) -> list[str]:
    argv = ["--dataset", dataset, "--output-dir", str(output_dir)]
    for name, value in FLAGS.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return argv + (["--resume-from-checkpoint", "latest"] if resume else [])


def _writes(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.is_file() else 0


def _wait_for_writes(process, marker: Path, count: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while _writes(marker) < count:
        assert process.poll() is None, f"the job ended (status {process.returncode}) before checkpoint write {count}"
        assert time.time() < deadline, "no checkpoint write in time"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "colours"
    datasets.DatasetDict(train=_split(24, 0), validation=_split(12, 1), test=_split(12, 2)).save_to_disk(str(path))
    return str(path)


def test_sigkilled_training_resumes_to_a_bit_identical_adapter(tmp_path, dataset):
    straight = tmp_path / "straight"
    train(TrainArgs(dataset=dataset, output_dir=str(straight), **FLAGS))

    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    out, marker = tmp_path / "killed", tmp_path / "writes.txt"
    env = {**os.environ, "ALORE_FAULT_MARKER": str(marker), "ALORE_FAULT_PAUSE": str(PAUSE_S),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    rng = random.Random(2412)
    # (which checkpoint write to wait for, extra delay): a delay below PAUSE_S kills inside that write,
    # a longer one kills while training between writes.
    kills = [(2, rng.uniform(0.0, 0.8 * PAUSE_S)), (3, rng.uniform(PAUSE_S, 3 * PAUSE_S)),
             (3, rng.uniform(0.0, PAUSE_S))]  # fmt: skip
    torn_seen, resumed_messages = 0, []
    for attempt, (write, delay) in enumerate(kills + [(None, None)]):
        before = _writes(marker)
        process = subprocess.Popen(
            [sys.executable, str(launcher), *_argv(dataset, out, resume=attempt > 0)],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        if write is None:
            output, _ = process.communicate(timeout=600)
            assert process.returncode == 0, output
            resumed_messages += [line for line in output.splitlines() if line.startswith("Resumed from")]
            break
        _wait_for_writes(process, marker, before + write)
        time.sleep(delay)
        process.kill()  # SIGKILL: no handler, no clean-up
        output, _ = process.communicate(timeout=60)
        assert process.returncode == -9, output
        resumed_messages += [line for line in output.splitlines() if line.startswith("Resumed from")]
        torn_seen += any(p.name.endswith(".partial") for p in (out / "checkpoints").iterdir())

    assert len(resumed_messages) == len(kills)  # every restart resumed from a checkpoint
    assert torn_seen >= 1, "no kill landed inside a checkpoint write"
    assert any("skipped incomplete checkpoint" in line for line in resumed_messages)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == (
        straight / "adapter" / "adapter_model.safetensors"
    ).read_bytes()
    assert (out / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    results, reference = (json.loads((d / "results.json").read_text()) for d in (out, straight))
    assert results["adapter_sha256"] == reference["adapter_sha256"] and results["optimizer_steps"] == 12
