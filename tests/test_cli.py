"""The ``alore`` command line, run in-process through ``main([...])`` on tiny saved models."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import ViTForImageClassification

from alore_peft import AloreConfig
from alore_peft import functional
from alore_peft import experts as insp
from alore_peft.cli import main

from .models import tiny_vit

TOL = dict(rtol=1e-4, atol=1e-5)
COMMANDS = ("info", "inspect", "merge", "budget")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base, a wider base, and two trained-looking adapters (linear targets, block placement)."""
    root = tmp_path_factory.mktemp("cli")
    tiny_vit(seed=0).save_pretrained(root / "base")
    tiny_vit(seed=1, hidden_size=64).save_pretrained(root / "wide")
    paths = {"root": root, "base": root / "base", "wide": root / "wide"}
    for name, targets in (("adapter", ["q_proj", "fc1"]), ("blocks", ["attention", "mlp"])):
        torch.manual_seed(0)
        base = ViTForImageClassification.from_pretrained(root / "base")
        config = AloreConfig(
            r=2, num_experts=4, target_modules=targets, modules_to_save=["classifier"], init_weights=False
        )
        model = get_peft_model(base, config)
        with torch.no_grad():
            model.base_model.model.classifier.modules_to_save["default"].weight.mul_(3)  # a "trained" head
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def load_peft(saved, name="adapter", is_trainable=False):
    base = ViTForImageClassification.from_pretrained(saved["base"])
    return PeftModel.from_pretrained(base, saved[name], is_trainable=is_trainable).eval()


def run_error(capsys, argv):
    """Run a command that must fail like argparse: exit status 2, one message, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: alore {command}")


def test_module_runs_as_a_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "alore_peft.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in COMMANDS)


def test_info_reads_counts_from_the_files_alone(saved, capsys):
    assert main(["info", str(saved["adapter"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model = load_peft(saved, is_trainable=True)
    reported, _ = model.get_nb_trainable_parameters()
    saved_head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad)
    counts = report["counts"]
    assert counts["alore_params"] == reported - saved_head == 4 * 2 * (32 + 32) + 4**3
    assert counts["modules_to_save_params"] == saved_head == 3 * 32 + 3
    assert counts["rule_params"] == 64 and counts["layers"] == 4
    assert report["config"]["r"] == 2 and report["config"]["base_model_name_or_path"] == str(saved["base"])
    assert {layer["module"] for layer in report["layers"]} == {name for name, _ in insp.alore_layers(model)}
    assert all(layer["rank_bound"] == 32 for layer in report["layers"])  # min(32, 4**2 * 2)

    assert main(["info", str(saved["blocks"])]) == 0
    text = capsys.readouterr().out
    assert "vit.layers.1.attention" in text and "512 expert factors + 64 rules" in text


def test_inspect_writes_tables_and_pictures(saved, tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        pixels = torch.randint(0, 255, (40, 40, 3), generator=torch.Generator().manual_seed(k), dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(images / f"img{k}.png")
    out = tmp_path / "out"
    argv = ["inspect", str(saved["adapter"]), "--images", str(images), "--out", str(out), "--per-layer"]
    assert main(argv + ["--layers", "vit.layers.1.mlp.fc1"]) == 0
    assert "eff. rank" in capsys.readouterr().out
    with open(out / "experts.csv") as f:
        rows = list(csv.DictReader(f))
    want = insp.expert_records(load_peft(saved))
    assert len(rows) == len(want) == 16
    for row, rec in zip(rows, want):
        assert (row["layer"], int(row["expert"])) == (rec["layer"], rec["expert"])
        assert float(row["norm"]) == pytest.approx(rec["norm"], rel=1e-6)
    with open(out / "layers.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    for name in ("summary.md", "rules.json", "contributions.png", "expert_maps.png", "expert_shares.png"):
        assert (out / name).stat().st_size > 0, name
    per_layer = sorted(p.name for p in out.glob("expert_*_vit_*.png"))
    assert per_layer == ["expert_maps_vit_layers_1_mlp_fc1.png", "expert_shares_vit_layers_1_mlp_fc1.png"]
    assert json.loads((out / "rules.json").read_text())["shared"][0][0] != 0


def test_missing_matplotlib_is_a_clear_error(saved, tmp_path, monkeypatch, capsys):
    from alore_peft import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib..." raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'alore-peft\[plots\]'"):
        plots.plot_contribution_heatmap([{"layer": "a", "expert": 0, "norm": 1.0}])
    err = run_error(capsys, ["inspect", str(saved["adapter"]), "--out", str(tmp_path / "o")])
    assert "alore-peft[plots]" in err and "--no-plots" in err
    assert not (tmp_path / "o").exists()


def test_inspect_without_plots_needs_no_images(saved, tmp_path, capsys):
    out = tmp_path / "tables"
    assert main(["inspect", str(saved["blocks"]), "--base", str(saved["base"]), "--out", str(out), "--no-plots"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["experts.csv", "layers.csv", "rules.json", "summary.md"]


@pytest.mark.parametrize("name", ["adapter", "blocks"])
def test_merge_saves_a_model_equal_to_the_adapter(saved, tmp_path, name, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(saved[name]), "--out", str(out)]) == 0
    out_text = capsys.readouterr().out
    assert "outputs equal the adapter model's" in out_text and "(left unchanged)" in out_text
    assert (out / "model.safetensors").is_file()
    merged = ViTForImageClassification.from_pretrained(out).eval()
    assert not any("alore" in key for key in merged.state_dict())
    reference = load_peft(saved, name)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, reference(pixel_values=pixels).logits, **TOL)
    err = run_error(capsys, ["merge", str(saved[name]), "--out", str(out)])
    assert "exists and is not an empty folder" in err


def test_merge_refuses_to_write_a_wrong_model(saved, tmp_path, monkeypatch, capsys):
    real = functional.merge_weight
    monkeypatch.setattr(functional, "merge_weight", lambda weight, seq=None, par=None: real(weight, seq, par) * 1.01)
    out = tmp_path / "bad"
    err = run_error(capsys, ["merge", str(saved["adapter"]), "--out", str(out)])
    assert "does not reproduce the adapter" in err and "Nothing was written" in err
    assert not out.exists()


def test_clear_errors_for_missing_and_mismatched_inputs(saved, tmp_path, capsys):
    missing = tmp_path / "nope"
    err = run_error(capsys, ["info", str(missing)])
    assert f"adapter directory '{missing}' does not exist" in err
    err = run_error(capsys, ["inspect", str(saved["adapter"]), "--base", str(missing), "--out", str(tmp_path / "o")])
    assert f"base model '{missing}' (from --base) is not a local model folder" in err
    err = run_error(
        capsys, ["merge", str(saved["adapter"]), "--base", str(saved["wide"]), "--out", str(tmp_path / "m")]
    )
    # The tuner's own check, with the shapes that differ.
    assert "does not fit this base model" in err and "this model needs (4, 16, 2)" in err
    assert not (tmp_path / "m").exists()
    err = run_error(capsys, ["inspect", str(saved["adapter"]), "--images", str(missing), "--out", str(tmp_path / "o")])
    assert "neither an image file nor a folder" in err
    err = run_error(capsys, ["info", str(saved["base"])])
    assert "has no adapter_config.json" in err
    orphan = tmp_path / "orphan"  # an adapter that does not record its base
    orphan.mkdir()
    config = json.loads((saved["adapter"] / "adapter_config.json").read_text())
    (orphan / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    (orphan / "adapter_model.safetensors").write_bytes((saved["adapter"] / "adapter_model.safetensors").read_bytes())
    err = run_error(capsys, ["merge", str(orphan), "--out", str(tmp_path / "m")])
    assert "has no base_model_name_or_path. Pass --base" in err
    err = run_error(capsys, ["budget", "--model-type", "vit"])  # --budget missing: argparse itself
    assert "--budget" in err


def test_budget_command(saved, capsys):
    argv = ["budget", "--base", str(saved["base"]), "--budget", "1k", "--targets", "q_proj", "fc1", "--format", "json"]
    assert main(argv) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(row["trainable"] <= 1000 for row in rows)
    assert rows[0]["trainable"] == max(row["trainable"] for row in rows)
    first = rows[0]
    model = get_peft_model(
        tiny_vit(), AloreConfig(r=first["r"], num_experts=first["num_experts"], target_modules=["q_proj", "fc1"])
    )
    assert model.get_nb_trainable_parameters()[0] == first["trainable"]

    assert main(["budget", "--model-type", "vit", "--budget", "150k", "--targets", "q_proj", "fc1", "--top", "40"]) == 0
    text = capsys.readouterr().out
    assert "| 4 | 4 | 147,520 |" in text and "24 sequential ALoRE layers" in text
    err = run_error(capsys, ["budget", "--model-type", "vit", "--budget", "10", "--targets", "q_proj"])
    assert "nothing fits --budget 10" in err
    err = run_error(capsys, ["budget", "--model-type", "vit", "--budget", "lots"])
    assert "is not a parameter count" in err


# -- merge: where it may write, what it keeps ---------------------------------------------------
@pytest.mark.parametrize("where", ["adapter", "base", "parent"])
def test_merge_never_overwrites_the_adapter_or_the_base(saved, tmp_path, where, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(saved["root"] / "base", root / "base")
    shutil.copytree(saved["adapter"], root / "adapter")
    (root / "adapter-link").symlink_to(root / "adapter")  # real paths are compared, not spellings
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    out = {"adapter": root / "adapter-link", "base": root / "base", "parent": root}[where]
    argv = ["merge", str(root / "adapter"), "--base", str(root / "base"), "--out", str(out), "--overwrite"]
    err = run_error(capsys, argv)
    what = {"adapter": "is the adapter's folder", "base": "is the base model's folder", "parent": "holds the"}[where]
    assert what in err and "Choose a new folder for --out" in err
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_merge_keeps_the_class_names(saved, tmp_path, capsys):
    """The adapter records the class names of the model it was saved from; the merged config has them."""
    names = {0: "cat", 1: "dog", 2: "bird"}
    base = ViTForImageClassification.from_pretrained(saved["base"])
    base.config.id2label, base.config.label2id = names, {v: k for k, v in names.items()}
    model = get_peft_model(base, AloreConfig(r=2, num_experts=4, target_modules=["q_proj"], modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "adapter")
    assert ViTForImageClassification.from_pretrained(saved["base"]).config.id2label[0] == "LABEL_0"
    assert main(["merge", str(tmp_path / "adapter"), "--base", str(saved["base"]), "--out", str(tmp_path / "m")]) == 0
    assert "classes: cat, dog, bird" in capsys.readouterr().out
    merged = ViTForImageClassification.from_pretrained(tmp_path / "m")
    assert merged.config.id2label == names and merged.config.label2id == {"cat": 0, "dog": 1, "bird": 2}


# -- the fit check is the tuner's: a custom container whose first Linear is not its input's ---------
class _TwoWayConfig(__import__("transformers").PretrainedConfig):
    model_type = "alore-test-two-way"

    def __init__(self, width: int = 32, image_size: int = 4, num_channels: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.width, self.image_size, self.num_channels = width, image_size, num_channels


class _TwoWayBlock(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj_out = torch.nn.Linear(2 * width, width)  # registered first, but reads the hidden state
        self.proj_in = torch.nn.Linear(width, 2 * width)  # reads the block's input

    def forward(self, x):
        return self.proj_out(torch.relu(self.proj_in(x)))


class _TwoWayModel(__import__("transformers").PreTrainedModel):
    config_class = _TwoWayConfig

    def __init__(self, config):
        super().__init__(config)
        self.block = _TwoWayBlock(config.width)
        self.head = torch.nn.Linear(config.width, 3)
        self.post_init()

    def forward(self, pixel_values, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        return ImageClassifierOutput(logits=self.head(self.block(pixel_values.flatten(1))))  # (B, 2*4*4) -> (B, 3)


def test_merge_loads_a_block_adapter_on_a_custom_container(tmp_path, monkeypatch, capsys):
    import transformers

    monkeypatch.setattr(transformers, "_TwoWayModel", _TwoWayModel, raising=False)  # found by auto_mapping's name
    torch.manual_seed(0)
    _TwoWayModel(_TwoWayConfig()).save_pretrained(tmp_path / "base")
    model = get_peft_model(
        _TwoWayModel.from_pretrained(tmp_path / "base"),
        AloreConfig(r=2, num_experts=4, target_modules=["block"], init_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    assert main(["merge", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    merged = _TwoWayModel.from_pretrained(tmp_path / "merged").eval()
    pixels = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits, **TOL)


# -- budget: targets ------------------------------------------------------------------------------------
def test_budget_lists_the_valid_targets_and_takes_a_regex(saved, capsys):
    err = run_error(capsys, ["budget", "--base", str(saved["base"]), "--budget", "1k", "--targets", "query", "fc1"])
    assert "Valid target names in this model: layers" in err
    assert "q_proj" in err and "fc1" in err and "blocks (sequential mode)" in err and "attention" in err
    # '+' makes a regex (the same rule as alore-train's --target-modules): the q_proj layers only
    assert main(["budget", "--base", str(saved["base"]), "--budget", "1k", "--targets", ".+q_proj", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["layers"] == 2
    err = run_error(capsys, ["budget", "--base", str(saved["base"]), "--budget", "1k", "--targets", ".+q_proj", "fc1"])
    assert "mixes a regex" in err
