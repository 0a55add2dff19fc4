"""The whole pipeline end to end at 16 px: config -> inversion -> label generator -> generation -> downstream
(HandsOff, curve, Transfer, Oracle) -> evaluation -> report, through `handsoff run` and through the library."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import networks_16px

from handsoff.cli import main
from handsoff.data.layout import DatasetError, LabeledFolder
from handsoff.domains.heads import SPLIT_SEEDS, write_heads_dataset
from handsoff.generator import save_networks
from handsoff.inversion import load_latents
from handsoff.pipeline import PipelineConfig, load_config, run_pipeline
from handsoff.pipeline.benchmark import method_order, run_benchmark

SIZE = 16
TINY_STAGES = {
    "inversion": {"steps": 3, "batch": 4},
    "label_generator": {"members": 2, "hidden": 8, "hidden2": 4, "max_steps": 6, "min_steps": 6,
                        "images_per_step": 2, "pixels": 32},
    "generation": {"n": 8, "batch": 4, "filter_top": 0.25},
    "downstream": {"backbone": "resnet18", "epochs": 2, "batch": 2, "images_per_epoch": 4, "patience": 2},
}


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    root = tmp_path_factory.mktemp("domain")
    G, D = networks_16px()
    paths = {"generator": str(save_networks(root / "gan", G, D))}
    for role, split, n in (("labeled", "labeled", 4), ("validation", "validation", 4), ("test", "test", 4),
                           ("oracle", "oracle", 6)):
        paths[role] = str(write_heads_dataset(root / role, n, seed=SPLIT_SEEDS[split], size=SIZE, progress=False))
    return root, paths


def _config(out, paths, **extra) -> dict:
    return {"out": str(out), **paths, "tasks": ["seg", "kp", "depth"], "curve": [4], **TINY_STAGES, **extra}


def test_run_command_goes_through_every_stage_and_resumes(domain, tmp_path, capsys):
    _, paths = domain
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(_config("run", paths)))
    assert main(["run", str(config_file), "--quiet"]) == 0
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"handsoff", "handsoff-4", "transfer", "oracle"}
    for metrics in results["methods"].values():
        assert 0 <= metrics["miou"] <= 1 and 0 <= metrics["pck@0.1"] <= 1 and metrics["depth_rmse"] >= 0
        # Which parts each dataset teaches: IoU per class and PCK per keypoint for every method.
        assert {"background", "skin", "eye", "nose", "mouth"} <= set(metrics["iou"])
        assert len(metrics["pck_per_keypoint"]) == 12 and "pck@0.02" in next(iter(metrics["pck_per_keypoint"].values()))
    assert results["generation"]["counts"] == {"kept": 6, "filtered": 2, "rejected": 0, "surplus": 0}
    for path in ("inversion/latents.safetensors", "label_generator/model.safetensors", "dataset/manifest.jsonl",
                 "downstream/handsoff/model.safetensors", "downstream/transfer/model.safetensors",
                 "downstream/oracle/model.safetensors",
                 "curve/dataset-4/dataset.json"):
        assert (out / path).exists(), path
    # The generated dataset's keypoints.json is written as every dataset's is: the labeled set's skeleton kept.
    category = json.loads((out / "dataset" / "keypoints.json").read_text())["categories"][0]
    labeled = json.loads((Path(paths["labeled"]) / "keypoints.json").read_text())["categories"][0]
    assert category["skeleton"] == labeled["skeleton"] and len(category["skeleton"]) > 0
    table = capsys.readouterr().out
    assert "handsoff" in table and "transfer" in table and "oracle" in table and "IoU per class" in table

    # The report: self-contained (every image embedded), every section present.
    page = (out / "report.html").read_text()
    for section in ("Downstream network on real test images", "IoU per class", "vs number of generated images",
                    "Inversion",
                    "Label generator", "Most uncertain", "Class frequencies"):
        assert section in page, section
    assert "<svg" in page and page.count("data:image/png;base64,") >= 8
    assert not re.search(r'src="(?!data:)', page)  # nothing loaded from elsewhere

    # Rerunning skips every finished stage and gives the same results.
    stamp = (out / "downstream/handsoff/model.safetensors").stat().st_mtime_ns
    assert main(["run", str(config_file), "--quiet", "--no-report"]) == 0
    assert (out / "downstream/handsoff/model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]

    # Another config into the same folder is refused instead of mixing two runs.
    config_file.write_text(yaml.safe_dump(_config("run", paths, seed=1)))
    assert main(["run", str(config_file), "--quiet"]) == 1
    assert "other settings" in capsys.readouterr().err


def test_same_config_same_dataset(domain, tmp_path):
    _, paths = domain
    stages = {**TINY_STAGES, "downstream": {**TINY_STAGES["downstream"], "epochs": 1}}
    for name in ("a", "b"):
        config = PipelineConfig.model_validate({**_config(tmp_path / name, paths, curve=[], transfer=False,
                                                          oracle=None), **stages})
        run_pipeline(config, progress=False, log=lambda *_: None)
    a, b = (sorted((tmp_path / n / "dataset").rglob("*.*")) for n in ("a", "b"))
    assert [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b):
        if pa.name != "dataset.json":  # records its own path
            assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_labeled_share_puts_the_labeled_images_beside_the_generated(domain, tmp_path):
    _, paths = domain
    downstream = {**TINY_STAGES["downstream"], "epochs": 1, "labeled_share": 0.25}
    config = PipelineConfig.model_validate({**_config(tmp_path / "mixed", paths, curve=[], transfer=False,
                                                      oracle=None), **TINY_STAGES, "downstream": downstream})
    run_pipeline(config, progress=False, log=lambda *_: None)
    saved = json.loads((tmp_path / "mixed/downstream/handsoff/config.json").read_text())
    assert saved["train"] == [str(tmp_path / "mixed/dataset"), paths["labeled"]] and saved["shares"] == [0.75, 0.25]
    # Selected on the labeled images it trains on, the network would be chosen by its training error.
    with pytest.raises(ValueError, match="labeled_share"):
        PipelineConfig.model_validate({**_config(tmp_path / "x", paths, validation=None), "downstream": downstream})


def test_mirror_fits_the_label_generator_on_the_labeled_images_and_their_mirrors(domain, tmp_path):
    _, paths = domain
    label_generator = {**TINY_STAGES["label_generator"], "mirror": True}
    config = PipelineConfig.model_validate({**_config(tmp_path / "m", paths, curve=[], transfer=False, oracle=None),
                                            "label_generator": label_generator,
                                            "downstream": {**TINY_STAGES["downstream"], "epochs": 1}})
    run_pipeline(config, progress=False, log=lambda *_: None)
    names = LabeledFolder(paths["labeled"]).names
    inverted, _, _ = load_latents(tmp_path / "m/inversion/latents.safetensors")
    assert sorted(inverted) == sorted(names + [n + "-mirror" for n in names])
    fit = json.loads((tmp_path / "m/label_generator/config.json").read_text())
    assert fit["metadata"]["fit"]["images"] == 2 * len(names)
    assert len(LabeledFolder(tmp_path / "m/labeled-mirrored")) == 2 * len(names)
    # A run started before a setting existed resumes: the setting compares at its default.
    saved = json.loads((tmp_path / "m/config.json").read_text())
    del saved["downstream"]["labeled_share"]
    (tmp_path / "m/config.json").write_text(json.dumps(saved))
    run_pipeline(config, progress=False, log=lambda *_: None)


def test_config_errors_name_the_file_and_field(domain, tmp_path):
    _, paths = domain
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_config("x", paths), "tasks": ["seg", "pose"],
                                   "generation": {"n": 0, "colour": 1}}))
    with pytest.raises(DatasetError) as e:
        load_config(bad)
    message = str(e.value)
    assert "bad.yaml" in message and "tasks.1" in message and "generation.n" in message
    assert "generation.colour" in message  # unknown keys are errors, not silently ignored
    bad.write_text("out: [unclosed")
    with pytest.raises(DatasetError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_relative_paths_resolve_against_the_config_file(domain, tmp_path):
    root, _ = domain
    config_file = root / "relative.yaml"
    config_file.write_text(yaml.safe_dump({"out": "runs/x", "generator": "gan", "labeled": "labeled",
                                           "test": "test", "transfer": False}))
    config = load_config(config_file)
    assert config.labeled == root / "labeled" and config.out == root / "runs/x"
    assert config.generator == str(root / "gan")
    assert load_config(config_file).generator == config.generator
    shipped = root / "shipped.yaml"
    shipped.write_text(yaml.safe_dump({"out": "o", "generator": "heads-64", "labeled": "labeled", "transfer": False}))
    assert load_config(shipped).generator == "heads-64"  # a shipped name stays a name


def test_missing_labels_for_a_task_fail_before_any_work(domain, tmp_path):
    _, paths = domain
    from handsoff.data.layout import DatasetCard, DatasetWriter

    writer = DatasetWriter(tmp_path / "images-only", DatasetCard())
    writer.add("a", torch.zeros(SIZE, SIZE, 3, dtype=torch.uint8).numpy())
    writer.close()
    config = PipelineConfig.model_validate(_config(tmp_path / "r", {**paths, "test": str(tmp_path / "images-only")}))
    with pytest.raises(DatasetError, match=r"images-only \(the test dataset\): the dataset has no labels for "
                                           r"task\(s\) seg, kp, depth"):
        run_pipeline(config, progress=False)
    assert not (tmp_path / "r").exists()


def test_benchmark_aggregates_over_seeds(domain, tmp_path):
    _, paths = domain
    stages = {**TINY_STAGES, "downstream": {**TINY_STAGES["downstream"], "epochs": 1}}
    results = run_benchmark(tmp_path / "b", labeled=[2, 3], seeds=2, validation=3, test=3, oracle=4, generated=4,
                            settings=stages, generator=paths["generator"], size=SIZE, progress=False,
                            log=lambda *_: None)
    assert list(results["methods"]) == ["transfer-2", "transfer-3", "handsoff-2", "handsoff-3", "oracle"]
    cell = json.loads((tmp_path / "b/seed1/labeled-3/results.json").read_text())["methods"]["handsoff"]
    agg = results["methods"]["handsoff-3"]["miou"]
    assert agg["values"][1] == cell["miou"] and len(agg["values"]) == 2
    assert agg["mean"] == pytest.approx(sum(agg["values"]) / 2)
    # seeds draw different labeled images; the smaller set is nested in the larger
    names = {s: sorted(p.stem for p in (tmp_path / f"b/data/labeled-seed{s}-3/images").iterdir()) for s in (0, 1)}
    assert not set(names[0]) & set(names[1])
    small = sorted(p.stem for p in (tmp_path / "b/data/labeled-seed0-2/images").iterdir())
    assert set(small) <= set(names[0])
    assert "±" in (tmp_path / "b/table.txt").read_text()
    # HandsOff against Transfer, paired by seed, from the same cells
    lead = results["versus_transfer"][3]["miou"]
    transfer = results["methods"]["transfer-3"]["miou"]["values"]
    assert lead["values"] == pytest.approx([h - t for h, t in zip(agg["values"], transfer)])
    assert "3 labeled: miou" in (tmp_path / "b/table.txt").read_text()


def test_versus_transfer_pairs_seeds_and_flags_a_lead_beyond_twice_the_spread():
    from handsoff.pipeline.benchmark import versus_table, versus_transfer

    per_cell = {"handsoff-4": [{"miou": 0.40, "depth_rmse": 1.5}, {"miou": 0.42, "depth_rmse": 1.7}],
                "transfer-4": [{"miou": 0.30, "depth_rmse": 2.0}, {"miou": 0.34, "depth_rmse": 1.6}],
                "handsoff-16": [{"miou": 0.50}, {"miou": 0.40}],
                "transfer-16": [{"miou": 0.45}, {"miou": 0.45}],
                "oracle": [{"miou": 0.70}, {"miou": 0.74}]}
    versus = versus_transfer(per_cell, [16, 4])
    assert list(versus) == [4, 16]
    four = versus[4]
    assert four["miou"]["values"] == pytest.approx([0.10, 0.08])
    assert four["miou"]["significant"]                                   # 0.09 > 2 * 0.01
    assert four["depth_rmse"]["values"] == pytest.approx([0.5, -0.1])     # lower is better: Transfer - HandsOff
    assert not four["depth_rmse"]["significant"]
    assert four["miou"]["gap_closed"]["values"] == pytest.approx([0.10 / 0.40, 0.08 / 0.40])
    assert not versus[16]["miou"]["significant"]                          # +0.05 and -0.05: mean 0
    assert "4 labeled: miou +0.090 ± 0.010*" in versus_table(versus)
    # One seed: the spread is unknown, so nothing is called significant.
    single = versus_transfer({k: v[:1] for k, v in per_cell.items()}, [4])
    assert single[4]["miou"]["mean"] == pytest.approx(0.10) and not single[4]["miou"]["significant"]


def test_benchmark_orders_sizes_as_numbers():
    names = ["handsoff-16", "oracle", "transfer-50", "transfer-4", "handsoff-4", "transfer-16"]
    assert method_order(names) == ["transfer-4", "transfer-16", "transfer-50", "handsoff-4", "handsoff-16", "oracle"]


def test_readme_config_example_is_valid(tmp_path):
    """The config shown in the README's walkthrough validates (paths resolve against the file's folder)."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Your own domain", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    config_file = tmp_path / "cars.yaml"
    config_file.write_text("\n".join(line.removeprefix("   ") for line in block.splitlines()))
    config = load_config(config_file)
    assert config.tasks == ["seg"] and config.generation.n == 10000
    assert config.downstream.backbone_weights == tmp_path / "weights/resnet50-0676ba61.pth"
    assert config.generator == str(tmp_path / "checkpoints/stylegan2-car-config-f.pkl")


def test_labeled_images_larger_than_the_generator(domain, tmp_path):
    """Labeled images (and masks) at 32 px for a 16 px generator: inversion resizes the images, the label generator
    predicts at the masks' 32 px, and the generated dataset and every network work at 32 px."""
    _, paths = domain
    large = {role: str(write_heads_dataset(tmp_path / role, 4, seed=SPLIT_SEEDS[role], size=32, progress=False))
             for role in ("labeled", "validation", "test")}
    config = PipelineConfig.model_validate({**_config(tmp_path / "run", {**paths, **large}), "curve": [],
                                            "oracle": None})
    results = run_pipeline(config, progress=False)
    sample = LabeledFolder(tmp_path / "run" / "dataset").load(LabeledFolder(tmp_path / "run" / "dataset").names[0])
    assert sample["image"].shape == (32, 32, 3) and sample["mask"].shape == (32, 32)
    assert set(results["methods"]) == {"handsoff", "transfer"}


def test_benchmark_splits_are_reused_only_when_they_hold_the_same_heads(tmp_path):
    """A rendered split is reused when it holds exactly the heads asked for; other heads (another framing, size,
    count or first index: another --labeled list or --oracle count in the same --out) are refused by name and left
    as they are, never silently reused or overwritten; a killed render (no dataset.json) is redone."""
    from handsoff.errors import UsageError
    from handsoff.pipeline.benchmark import render_split

    split = render_split(tmp_path / "test", "test", 2, start=3, size=16, progress=False)
    first = (split / "dataset.json").stat().st_mtime_ns
    assert render_split(split, "test", 2, start=3, size=16, progress=False) == split  # complete: reused
    assert (split / "dataset.json").stat().st_mtime_ns == first
    assert LabeledFolder(split).names == [f"{SPLIT_SEEDS['test']:04d}_{i:07d}" for i in (3, 4)]
    for change, words in ((dict(framing="portrait"), "framing 'bust' (wanted 'portrait')"),
                          (dict(size=32), "size 16 (wanted 32)"), (dict(n=3), "2 heads"), (dict(start=5), "2 heads"),
                          (dict(split="oracle"), "seed")):
        args = dict(split="test", n=2, start=3, size=16) | change
        with pytest.raises(UsageError, match=re.escape(words)) as caught:
            render_split(split, args.pop("split"), args.pop("n"), progress=False, **args)
        assert str(split) in str(caught.value)
    assert (split / "dataset.json").stat().st_mtime_ns == first

    (split / "dataset.json").unlink()  # as a kill before the card is written leaves it
    assert render_split(split, "test", 2, start=3, size=16, progress=False, framing="portrait") == split
    assert LabeledFolder(split).card.source["framing"] == "portrait" and len(LabeledFolder(split)) == 2


def test_demo_and_benchmark_name_a_missing_generator_before_rendering(tmp_path):
    from handsoff.generator.checkpoints import CheckpointError
    from handsoff.pipeline.benchmark import run_demo

    for run in (lambda: run_demo(tmp_path / "demo", generator=str(tmp_path / "missing-gan"), progress=False),
                lambda: run_benchmark(tmp_path / "demo", labeled=[2], seeds=1, generator=str(tmp_path / "missing-gan"),
                                      progress=False)):
        with pytest.raises(CheckpointError, match="missing-gan"):
            run()
        assert not (tmp_path / "demo").exists()
