"""ALoRE under PyTorch FSDP2 (``fully_shard``), two CPU processes over gloo.

``tests/fsdp_worker.py`` trains a tiny ViT with ALoRE block adapters for a few
steps with every encoder layer sharded on its own, gathers the full adapter
(``get_model_state_dict`` with ``full_state_dict=True``) and saves it with
PEFT; the same steps run in one process on the whole batches. The two
adapters, including the shared rule matrices, must match.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from peft import PeftModel
from safetensors.torch import load_file

from .tolerances import TOLERANCES

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fsdp_worker.py"
RTOL, ATOL = TOLERANCES[torch.float32]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    run = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    sharded, single = root / "sharded", root / "single"
    _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(_free_port()), str(WORKER), "--out", str(sharded)])  # fmt: skip
    _run([str(WORKER), "--single", "--out", str(single)])
    return sharded, single


def test_shared_rules_stay_shared_under_sharding(runs):
    sharded, _ = runs
    report = json.loads((sharded / "report.json").read_text())
    assert report["world"] == 2
    assert report["rules_is_dtensor"]  # the tuner's rules are sharded with the root unit
    assert report["layers_sharing_rules"] == report["adapter_layers"] == 4  # every layer reads the tuner's tensor
    assert report["rules_changed"] > 1e-3  # and it trained


def test_gathered_adapter_matches_one_process(runs):
    sharded, single = runs
    a = load_file(str(sharded / "adapter_model.safetensors"))
    b = load_file(str(single / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    assert "base_model.alore_rules" in a and sum("alore_B" in k for k in a) == 4
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL, msg=key)
    assert any((a[k] != 0).any() for k in a if "alore_B" in k)  # B starts at zero: the adapters trained


def test_gathered_adapter_loads_with_peft(runs):
    sys.path.insert(0, str(REPO / "tests"))
    try:
        from fsdp_worker import batches
    finally:
        sys.path.remove(str(REPO / "tests"))
    from alore_peft.tiny_models import tiny_model

    sharded, single = runs
    base = tiny_model("vit", seed=0, num_labels=3)
    images = batches()[0][0]
    with torch.no_grad():
        logits = [PeftModel.from_pretrained(copy.deepcopy(base), str(d)).eval()(pixel_values=images).logits
                  for d in (sharded, single)]  # fmt: skip
        untouched = base(pixel_values=images).logits
    torch.testing.assert_close(logits[0], logits[1], rtol=RTOL, atol=ATOL)
    assert (logits[0] - untouched).abs().max() > 1e-3
