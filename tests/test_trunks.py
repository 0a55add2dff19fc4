"""Every stage runs on every trunk: StyleGAN3 (configs t and r) through invert, fit, generate and run, at 16 px."""

import json

import pytest
import torch
import yaml
from conftest import networks_16px, stylegan3_16px
from test_pipeline import TINY_STAGES

from handsoff.cli import main
from handsoff.data.layout import LabeledFolder
from handsoff.domains.heads import SPLIT_SEEDS, write_heads_dataset
from handsoff.generator import Trunk, load_generator, save_networks
from handsoff.label_generator import load_label_generator


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads16")
    return {role: write_heads_dataset(root / role, 4, seed=SPLIT_SEEDS[role], size=16, progress=False)
            for role in ("labeled", "test")}


def _checkpoint(tmp_path, config):
    _, D = networks_16px()  # StyleGAN3 is trained with the StyleGAN2 discriminator; inversion uses its features
    return save_networks(tmp_path / f"sg3-{config}", stylegan3_16px(config), D)


@pytest.mark.parametrize("config", ["t", "r"])
def test_invert_fit_generate_on_stylegan3(tmp_path, heads, config):
    ckpt = _checkpoint(tmp_path, config)
    G = load_generator(ckpt)
    assert isinstance(G, Trunk) and isinstance(networks_16px()[0], Trunk)
    latents, lg, dataset = tmp_path / "latents.safetensors", tmp_path / "lg", tmp_path / "dataset"
    assert main(["invert", "--generator", str(ckpt), "--images", str(heads["labeled"]), "--out", str(latents),
                 "--steps", "3", "--device", "cpu"]) == 0
    report = json.loads(latents.with_suffix(".json").read_text())
    objective = {stage: 10 * m["perceptual"] + m["mse"] for stage, m in report["mean"].items()}  # what it minimizes
    assert objective["refined"] < objective["average"]
    assert main(["fit", "--generator", str(ckpt), "--latents", str(latents), "--labels", str(heads["labeled"]),
                 "--tasks", "seg,kp,depth", "--out", str(lg), "--members", "2", "--hidden", "8", "--hidden2", "4",
                 "--max-steps", "4", "--min-steps", "4", "--pixels", "32", "--device", "cpu"]) == 0
    model = load_label_generator(lg)
    assert model.G.config == G.config
    # The hypercolumn is the Fourier input plus every layer but ToRGB, each cropped to the image.
    assert len(model.groups) >= 1 and sum(model.G.synthesis.feature_channels) == model.ensemble.weight1.shape[1]
    assert main(["generate", "--label-generator", str(lg), "--n", "4", "--out", str(dataset), "--seed", "0",
                 "--device", "cpu"]) == 0
    folder = LabeledFolder(dataset)
    assert len(folder) == 4
    sample = folder.load(folder.names[0])
    assert sample["image"].shape == (16, 16, 3) and sample["mask"].shape == (16, 16)
    assert sample["keypoints"].shape == (12, 3) and sample["depth"].shape == (16, 16)


def test_run_on_stylegan3(tmp_path, heads):
    ckpt = _checkpoint(tmp_path, "t")
    stages = {**TINY_STAGES, "downstream": {**TINY_STAGES["downstream"], "epochs": 1}}
    config = {"out": str(tmp_path / "run"), "generator": str(ckpt), "labeled": str(heads["labeled"]),
              "test": str(heads["test"]), "tasks": ["seg", "kp", "depth"], "curve": [], "transfer": False,
              "oracle": None, **stages}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["run", str(tmp_path / "run.yaml"), "--quiet", "--no-report"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["methods"]["handsoff"]["miou"] <= 1
    assert torch.isfinite(torch.tensor(results["methods"]["handsoff"]["depth_rmse"]))
