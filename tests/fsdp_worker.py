"""A few ALoRE training steps on a tiny ViT, sharded with FSDP2 or in one process (run by tests/test_fsdp.py).

Sharded: ``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py --out DIR``
(gloo on CPU); every encoder layer is its own ``fully_shard`` unit, the root
holds the embeddings, the classifier and the tuner's shared rules. Each rank
trains on its half of every batch; the full adapter is gathered and saved by
rank 0. Single: ``python tests/fsdp_worker.py --single --out DIR`` trains on the
whole batches. Both write ``adapter_model.safetensors`` (PEFT's format) and
``report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import get_peft_model

from alore_peft import AloreConfig
from alore_peft.tiny_models import tiny_model

BATCH = 8  # per step, over all ranks
STEPS = 4


def batches(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(BATCH, 3, 32, 32, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen))
        for _ in range(STEPS)
    ]


def build():
    model = tiny_model("vit", seed=0, num_labels=3)
    config = AloreConfig(target_modules=["attention", "mlp"], modules_to_save=["classifier"])
    return get_peft_model(model, config)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--single", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = build()
    model.train()
    rules_before = model.base_model.alore_rules["default"].detach().clone()
    rank, world = 0, 1
    if not args.single:
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        for layer in model.base_model.model.vit.layers:
            fully_shard(layer)  # one unit per transformer block: its frozen weights and its adapters
        fully_shard(model)  # the root: embeddings, classifier, and base_model.alore_rules
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    per_rank = BATCH // world
    for images, labels in batches():
        mine = slice(rank * per_rank, (rank + 1) * per_rank)  # this rank's half of the batch
        images, labels = images[mine], labels[mine]
        loss = F.cross_entropy(model(pixel_values=images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    rules = model.base_model.alore_rules["default"]
    report = {"world": world, "losses": losses, "rules_is_dtensor": type(rules).__name__ == "DTensor"}
    # Every adapter layer reads the tuner's rules, not a copy: the shared tensor is the one registered on the tuner.
    layers = [m for m in model.modules() if hasattr(m, "_shared_rules") and m._shared_rules is not None]
    report["layers_sharing_rules"] = sum(m._shared_rules is model.base_model.alore_rules for m in layers)
    report["adapter_layers"] = len(layers)
    if args.single:
        state = None
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # A collective: every rank takes part, rank 0 receives full tensors on the CPU.
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(str(out), state_dict=state)  # PEFT keeps the adapter's keys of the full state
        full_rules = (state or {}).get("base_model.alore_rules.default", rules.detach())
        report["rules_changed"] = (full_rules - rules_before).abs().max().item()
        (out / "report.json").write_text(json.dumps(report))
    if not args.single:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
