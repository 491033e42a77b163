"""What an ALoRE adapter folder holds beyond PEFT's: integrity digests, class names, a real model card."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alore_peft import AloreConfig, AloreLayer
from alore_peft.adapter_metadata import DIGEST_KEY, LABELS_KEY, tensor_sha256

from .models import tiny_vit

WEIGHTS = "adapter_model.safetensors"


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture
def adapter(tmp_path):
    """An ALoRE adapter with a head, saved from a ViT whose config names its classes."""
    base = tiny_vit()
    base.config.id2label = {0: "red", 1: "green", 2: "blue"}
    base.config.label2id = {"red": 0, "green": 1, "blue": 2}
    config = AloreConfig(r=2, num_experts=4, target_modules=["attention", "mlp"], modules_to_save=["classifier"],
                         init_weights=False)  # fmt: skip
    get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _load(folder):
    base = tiny_vit()
    return base, PeftModel.from_pretrained(base, str(folder))


def _untouched(base) -> bool:
    return not any(isinstance(m, AloreLayer) for m in base.modules())


# -- digests ---------------------------------------------------------------------------------------
def test_saved_file_carries_a_digest_of_every_tensor_and_the_class_names(adapter):
    metadata = _metadata(adapter / WEIGHTS)
    assert metadata["format"] == "pt"  # PEFT's own key is kept
    digests = json.loads(metadata[DIGEST_KEY])
    tensors = load_file(str(adapter / WEIGHTS))
    assert set(digests) == set(tensors) and len(tensors) == 11  # 4 blocks x (B, C), rules, head weight and bias
    assert all(digests[k] == tensor_sha256(t) for k, t in tensors.items())
    assert json.loads(metadata[LABELS_KEY]) == ["red", "green", "blue"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "no digest" notice for a file that has one
        _load(adapter)


def test_flipped_bytes_in_the_data_are_refused_before_the_model_is_touched(adapter):
    raw = bytearray((adapter / WEIGHTS).read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header + 40] ^= 0xFF  # inside the data region; the header (shapes, offsets) is intact
    (adapter / WEIGHTS).write_bytes(bytes(raw))
    base = tiny_vit()
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is corrupted: the bytes of 1 tensor\(s\) differ"):
        PeftModel.from_pretrained(base, str(adapter))
    assert _untouched(base)


def test_non_finite_weights_are_refused(adapter):
    tensors = load_file(str(adapter / WEIGHTS))
    name = next(k for k in tensors if k.endswith("alore_B"))
    tensors[name][0, 0, 0] = float("nan")
    save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})  # a consistent file, no digest
    base = tiny_vit()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=rf"NaN or infinite values in 1 tensor\(s\): \['{name}'\]"):
        PeftModel.from_pretrained(base, str(adapter))
    assert _untouched(base)


def test_adapter_without_digest_loads_after_one_notice(adapter):
    tensors = load_file(str(adapter / WEIGHTS))
    save_file(tensors, str(adapter / WEIGHTS), metadata={"format": "pt"})  # as an older release saved it
    with pytest.warns(UserWarning, match="has no alore.sha256 integrity digest") as caught:
        _, model = _load(adapter)
    assert len([w for w in caught if "integrity digest" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # once per file
        _load(adapter)
    assert any(isinstance(m, AloreLayer) for m in model.modules())


# -- only ALoRE adapters are affected; the wrapping is idempotent -------------------------------------
def test_other_peft_methods_are_untouched(tmp_path):
    get_peft_model(tiny_vit(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    assert _metadata(tmp_path / "lora" / WEIGHTS) == {"format": "pt"}
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "[More Information Needed]" in card and "alore" not in card.lower()


def test_wrapping_survives_a_reload_without_stacking(adapter, tmp_path):
    import alore_peft
    from alore_peft import _registration

    original = PeftModel.save_pretrained.__alore_original__
    importlib.reload(_registration)
    _registration.register(alore_peft.AloreConfig, alore_peft.AloreModel)
    assert PeftModel.save_pretrained.__alore_original__ is original
    assert PeftModel.create_or_update_model_card.__alore_original__.__qualname__ == "PeftModel.create_or_update_model_card"
    _, model = _load(adapter)
    model.save_pretrained(tmp_path / "again")
    assert _metadata(tmp_path / "again" / WEIGHTS)[DIGEST_KEY] == _metadata(adapter / WEIGHTS)[DIGEST_KEY]


# -- the model card -----------------------------------------------------------------------------------
def test_model_card_says_what_it_is_and_how_to_load_it(adapter):
    from huggingface_hub import ModelCard

    card = ModelCard.load(adapter / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-classification"
    assert "alore" in card.data.tags and not any(t.startswith("base_model:") for t in card.data.tags)
    text = card.text
    assert "https://arxiv.org/abs/2412.08341" in text and "[More Information Needed]" not in text
    assert "pip install alore-peft" in text and "import alore_peft" in text
    assert "AutoPeftModelForImageClassification.from_pretrained" in text and "PeftModel.from_pretrained" in text
    # r, n, alpha, s, mode, shared rules, targets, layers, and the trainable count as PEFT reports it
    _, model = _load(adapter)
    for name, param in model.named_parameters():
        param.requires_grad = "alore_" in name or "modules_to_save" in name
    trainable = model.get_nb_trainable_parameters()[0]
    assert trainable == 4 * 2 * (32 + 32) + 4**3 + (3 * 32 + 3)
    row = (f"| `default` | 2 | 4 | 4 | 2 | sequential | yes | `attention`, `mlp` | 4 | {trainable:,} (512 expert factors "
           "+ 64 rules + 99 in `modules_to_save`) |")  # fmt: skip
    assert row in text


def test_model_card_names_a_hub_base_and_keeps_a_handwritten_card(tmp_path):
    from huggingface_hub import ModelCard

    model = get_peft_model(tiny_vit(), AloreConfig(target_modules=["q_proj"]))
    model.peft_config["default"].base_model_name_or_path = "google/vit-base-patch16-224-in21k"
    model.save_pretrained(tmp_path / "a")
    card = ModelCard.load(tmp_path / "a" / "README.md")
    assert card.data.base_model == "google/vit-base-patch16-224-in21k"
    assert "base_model:adapter:google/vit-base-patch16-224-in21k" in card.data.tags
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("---\nlicense: mit\n---\n\n# My adapter\n\nWritten by hand.\n")
    model.save_pretrained(tmp_path / "b")
    card = ModelCard.load(tmp_path / "b" / "README.md")
    assert "Written by hand." in card.text and "alore" in card.data.tags and card.data.license == "mit"


def test_push_to_hub_uploads_the_alore_card(adapter, tmp_path, monkeypatch):
    """transformers' push_to_hub would replace the card with its empty template; ALoRE's is uploaded."""
    from huggingface_hub import ModelCard

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        uploaded["private"] = kwargs.get("private")
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        uploaded["repo"], uploaded["message"] = repo_id, kwargs["commit_message"]
        uploaded["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        uploaded["card"] = ModelCard.load(Path(folder_path) / "README.md")
        return "commit"

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", create_repo)
    monkeypatch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
    _, model = _load(adapter)
    assert model.push_to_hub("someone/tiny-alore", private=True, tags=["colours"]) == "commit"
    assert uploaded["repo"] == "someone/tiny-alore" and uploaded["private"] is True
    assert uploaded["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = uploaded["card"]
    assert "[More Information Needed]" not in card.text and "https://arxiv.org/abs/2412.08341" in card.text
    assert 'from_pretrained("someone/tiny-alore")' in card.text  # the loading code names the repository
    assert {"alore", "colours"} <= set(card.data.tags)


@pytest.mark.parametrize("r", [2, 8], ids=["r2", "r-equals-block"])
def test_files_hold_the_documented_factor_shapes_whatever_the_storage(tmp_path, r):
    # The layers store B and C as the matrices the factored path multiplies by, (n r, d / n); a file
    # (and the state dict) keeps the documented B (n, d_out / n, r) and C (n, r, d_in / n), and loading
    # puts them back. With r = d / n (8 here) a stored matrix and a file tensor still differ in rank,
    # so a state dict in either layout loads unambiguously.
    model = get_peft_model(tiny_vit(), AloreConfig(r=r, num_experts=4, target_modules=["q_proj"], init_weights=False))
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, AloreLayer))
    q = layer.in_dim // 4
    _, B, C = layer.factors("default")
    stored = {"alore_B": layer.alore_B["default"], "alore_C": layer.alore_C["default"]}
    assert all(t.is_contiguous() and t.shape == (4 * r, q) for t in stored.values())
    assert B.shape == (4, q, r) and C.shape == (4, r, q)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    prefix = name.split("base_model.model.", 1)[1]
    for kind, documented in (("alore_B", B), ("alore_C", C)):
        key = next(k for k in saved if k.endswith(f"{prefix}.{kind}"))
        assert saved[key].shape == documented.shape and torch.equal(saved[key], documented.detach())
    loaded = PeftModel.from_pretrained(tiny_vit(), tmp_path)
    again = dict(loaded.named_modules())[name]
    for kind, value in stored.items():
        got = getattr(again, kind)["default"]
        assert got.is_contiguous() and torch.equal(got, value.detach())
    # A state dict in the stored layout (the parameters themselves) loads as it is.
    params = {k: v.detach() + 1 for k, v in model.named_parameters() if ".alore_B." in k or ".alore_C." in k}
    model.load_state_dict(params, strict=False)
    own = dict(model.named_parameters())
    assert all(torch.equal(own[k], v) for k, v in params.items())
