import json

import pytest
import torch

from handsoff.cli import main
from handsoff.domains.heads import write_heads_dataset
from handsoff.downstream import DenseModel, load_downstream
from handsoff.downstream.model import build_backbone, load_backbone_weights
from handsoff.downstream.train import heatmaps
from handsoff.generator import CheckpointError


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    return {name: write_heads_dataset(root / name, n, seed=seed, size=32, progress=False)
            for name, n, seed in (("train", 12, 0), ("val", 6, 1), ("test", 6, 2))}


def test_train_select_resume_and_evaluate(tmp_path, splits, capsys):
    out = tmp_path / "run"
    args = ["train-downstream", "--data", str(splits["train"]), "--val", str(splits["val"]), "--tasks",
            "seg,kp,depth", "--out", str(out), "--epochs", "1", "--batch", "4", "--backbone", "resnet18"]
    assert main(args) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and {"miou", "pck@0.1", "depth_rmse"} <= set(history[0]["val"])
    assert history[0]["images"] == 12  # an epoch is the dataset by default
    args[args.index("--epochs") + 1] = "2"
    assert main(args) == 0  # resumes: one more epoch
    assert len(json.loads((out / "history.json").read_text())) == 2
    assert main(["evaluate", "--model", str(out), "--data", str(splits["test"])]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and 0 <= metrics["pck@0.05"] <= 1 and metrics["depth_rmse"] > 0
    assert set(metrics["segmentation"]["iou"]) >= {"background", "skin"}
    assert "miou" in capsys.readouterr().out
    model, config = load_downstream(out)
    assert config["heads"] == {"seg": 12, "kp": 12, "depth": 1} and config["backbone_init"] == "random"


def test_fixed_images_per_epoch_cycles_a_small_dataset(tmp_path, splits):
    """The same schedule for any dataset size: 30 images per epoch from 12 means cycling through them."""
    out = tmp_path / "cycled"
    assert main(["train-downstream", "--data", str(splits["train"]), "--val", str(splits["val"]), "--tasks", "seg",
                 "--out", str(out), "--epochs", "1", "--batch", "6", "--images-per-epoch", "30"]) == 0
    assert json.loads((out / "history.json").read_text())[0]["images"] == 30


def test_an_early_stopped_run_stays_stopped(tmp_path, splits):
    out = tmp_path / "stopped"
    args = ["train-downstream", "--data", str(splits["train"]), "--val", str(splits["val"]), "--tasks", "seg",
            "--out", str(out), "--epochs", "3", "--batch", "6", "--patience", "1", "--lr", "0"]
    assert main(args) == 0  # lr 0: no epoch improves on the first, so it stops after the second
    assert len(json.loads((out / "history.json").read_text())) == 2
    args[args.index("--epochs") + 1] = "5"
    assert main(args) == 0
    assert len(json.loads((out / "history.json").read_text())) == 2


def test_backbone_weights_from_a_local_file(tmp_path):
    net, _, _ = build_backbone("resnet18")
    state = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "resnet18.pth")
    model = DenseModel("resnet18", {"seg": 3}, backbone_weights=tmp_path / "resnet18.pth")
    assert torch.all(model.backbone.conv1.weight == 0.5) and model.config["backbone_init"].startswith("imagenet")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth: not weights for this backbone"):
        load_backbone_weights(build_backbone("resnet18")[0], tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="never downloads"):
        DenseModel("resnet18", {"seg": 3}, backbone_weights=tmp_path / "missing.pth")


def test_heatmaps_peak_at_keypoints():
    kp = torch.tensor([[[3.5, 5.5, 2.0], [0.0, 0.0, 0.0]]])
    heat = heatmaps(kp, 8, sigma=1.0)
    assert heat.shape == (1, 2, 8, 8) and heat[0, 0, 5, 3] == 1.0 and heat[0, 1].abs().sum() == 0
