"""Every stage runs on every trunk: StyleGAN3 (configs t and r) through invert, fit, generate and run, at 16 px."""

import json

import numpy as np
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


def test_labeled_images_of_any_shape_and_size(tmp_path):
    """Labeled images need not match the generator: 32x24 (non-square) heads for a 16-px generator are resized for
    inversion, fitted with their labels at the label resolution (the longer side, 32, by default: masks and depth
    by nearest neighbour, keypoints scaled), and the generated dataset is labeled at that resolution."""
    from handsoff.data.layout import DatasetWriter

    G, D = networks_16px()
    ckpt = save_networks(tmp_path / "gan", G, D)
    heads = LabeledFolder(write_heads_dataset(tmp_path / "square", 3, seed=SPLIT_SEEDS["labeled"], size=32,
                                              progress=False))
    writer = DatasetWriter(tmp_path / "wide", heads.card)
    for name in heads.names:  # crop 4 columns off each side: 24 wide, 32 high
        s = heads.load(name)
        kp = s["keypoints"].copy()
        kp[:, 0] -= 4
        kp[(kp[:, 0] < 0) | (kp[:, 0] >= 24), 2] = 0
        writer.add(name, s["image"][:, 4:28].copy(), mask=s["mask"][:, 4:28].copy(), depth=s["depth"][:, 4:28].copy(),
                   keypoints=kp)
    labeled = writer.close()
    latents, lg, dataset = tmp_path / "latents.safetensors", tmp_path / "lg", tmp_path / "dataset"
    assert main(["invert", "--generator", str(ckpt), "--images", str(labeled), "--out", str(latents),
                 "--steps", "2", "--device", "cpu"]) == 0
    assert main(["fit", "--generator", str(ckpt), "--latents", str(latents), "--labels", str(labeled),
                 "--tasks", "seg,kp,depth", "--out", str(lg), "--members", "2", "--hidden", "8", "--hidden2", "4",
                 "--max-steps", "3", "--min-steps", "3", "--pixels", "32", "--device", "cpu"]) == 0
    assert load_label_generator(lg).label_size == 32
    assert main(["generate", "--label-generator", str(lg), "--n", "2", "--out", str(dataset), "--seed", "0",
                 "--device", "cpu"]) == 0
    sample = LabeledFolder(dataset).load("00000000")
    assert sample["image"].shape == (32, 32, 3) and sample["mask"].shape == (32, 32)
    assert sample["depth"].shape == (32, 32) and (sample["keypoints"][:, :2] < 32).all()


def test_labels_resize_with_their_image():
    """Each task resizes its own label: nearest neighbour at pixel centres for masks and depth, scaled keypoints."""
    from handsoff.label_generator.train import square_sample
    from handsoff.tasks import Depth, Keypoints, Segmentation

    mask = np.zeros((4, 2), np.int64)
    mask[:, 1] = 1                     # right column class 1
    depth = np.arange(8, dtype=np.float32).reshape(4, 2)
    sample = {"name": "s", "image": np.zeros((4, 2, 3), np.uint8), "mask": mask, "depth": depth,
              "keypoints": np.array([[1.5, 2.0, 2.0]], np.float32)}
    tasks = [Segmentation(["bg", "a"]), Keypoints(["k"]), Depth()]
    out = square_sample(sample, 8, tasks)
    assert out["image"].shape == (8, 8, 3)
    assert (out["mask"][:, :4] == 0).all() and (out["mask"][:, 4:] == 1).all()
    assert out["depth"][0, 0] == 0 and out["depth"][7, 7] == 7 and set(np.unique(out["depth"])) <= set(range(8))
    np.testing.assert_allclose(out["keypoints"], [[6.0, 4.0, 2.0]])
