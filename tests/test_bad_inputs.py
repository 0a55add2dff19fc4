"""Every command driven with a careless or hostile user's inputs.

Each case: the command line, what is broken (a file written by ``prepare`` or an option), and a fragment of the
expected message. Every one must end with exit status 1 and a single line ``error: ...`` on stderr (no
traceback), naming the file or option, and must leave nothing that blocks the corrected rerun: where a case gives
one, the corrected command then succeeds.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import networks_16px
from PIL import Image

from handsoff.cli import main
from handsoff.domains.heads import SPLIT_SEEDS, write_heads_dataset
from handsoff.generator import save_networks

SIZE = 16
FIT = ["--members", "2", "--hidden", "8", "--hidden2", "4", "--max-steps", "2", "--min-steps", "0",
       "--images-per-step", "2", "--pixels", "16", "--device", "cpu"]
TRAIN = ["--tasks", "seg", "--epochs", "1", "--batch", "2", "--images-per-epoch", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good inputs for every stage at 16 px: generator, labeled heads (seg, kp, depth), latents, label generator,
    a downstream model. Cases copy what they break."""
    root = tmp_path_factory.mktemp("world")
    G, D = networks_16px()
    w = {"gen": save_networks(root / "gen", G, D),
         "labeled": write_heads_dataset(root / "labeled", 4, seed=SPLIT_SEEDS["labeled"], size=SIZE, progress=False)}
    w["latents"] = root / "latents.safetensors"
    assert main(["invert", "--generator", str(w["gen"]), "--images", str(w["labeled"]), "--out", str(w["latents"]),
                 "--steps", "0", "--perceptual", "none", "--device", "cpu"]) == 0
    w["lg"] = root / "lg"
    assert main(["fit", "--generator", str(w["gen"]), "--latents", str(w["latents"]), "--labels", str(w["labeled"]),
                 "--tasks", "seg,kp", "--out", str(w["lg"]), *FIT]) == 0
    w["model"] = root / "model"
    assert main(["train-downstream", "--data", str(w["labeled"]), "--val", str(w["labeled"]), "--out",
                 str(w["model"]), *TRAIN]) == 0
    return {k: str(v) for k, v in w.items()}


def copy_dataset(world, tmp: Path, name: str = "bad") -> Path:
    return Path(shutil.copytree(world["labeled"], tmp / name))


def copy_folder(world, key: str, tmp: Path) -> Path:
    return Path(shutil.copytree(world[key], tmp / f"bad-{key}"))


def first_name(dataset: Path) -> str:
    return sorted(p.stem for p in (dataset / "images").iterdir())[0]


# --- what each case breaks (returns nothing; files go under tmp) ---

def nan_keypoint(world, tmp):
    data = copy_dataset(world, tmp)
    coco = json.loads((data / "keypoints.json").read_text())
    coco["annotations"][1]["keypoints"][0] = float("nan")
    (data / "keypoints.json").write_text(json.dumps(coco))  # Python writes NaN, as a careless exporter would


def corrupt_mask(world, tmp):
    data = copy_dataset(world, tmp)
    (data / "masks" / f"{first_name(data)}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")


def corrupt_depth(world, tmp):
    data = copy_dataset(world, tmp)
    (data / "depth" / f"{first_name(data)}.npy").write_bytes(b"not numpy")


def card_is_a_list(world, tmp):
    data = copy_dataset(world, tmp)
    (data / "dataset.json").write_text("[1, 2]")


def keypoints_not_json(world, tmp):
    data = copy_dataset(world, tmp)
    (data / "keypoints.json").write_text("{ nope")


def card_without_keypoints(world, tmp):
    data = copy_dataset(world, tmp)
    card = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**card, "keypoints": None}))


def renamed_class(world, tmp):
    data = copy_dataset(world, tmp)
    card = json.loads((data / "dataset.json").read_text())
    card["classes"][1]["name"] = "fur"
    (data / "dataset.json").write_text(json.dumps(card))


def float_image(world, tmp):
    data = copy_dataset(world, tmp)
    path = data / "images" / f"{first_name(data)}.png"
    Image.fromarray(np.zeros((SIZE, SIZE), np.float32), mode="F").save(path.with_suffix(".tiff"))
    path.unlink()


def lg_config_is_a_list(world, tmp):
    (copy_folder(world, "lg", tmp) / "config.json").write_text("[]")


def lg_weights_truncated(world, tmp):
    path = copy_folder(world, "lg", tmp) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


def lg_weights_nan(world, tmp):
    from safetensors.torch import load_file, save_file

    path = copy_folder(world, "lg", tmp) / "model.safetensors"
    state = load_file(path)
    state["weight3"][0, 0, 0] = float("nan")
    save_file(state, path)


def gen_weights_truncated(world, tmp):
    path = copy_folder(world, "gen", tmp) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def foreign_safetensors(world, tmp):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp / "mine.safetensors")


def nan_latents(world, tmp):
    from safetensors.torch import load_file, save_file

    state = load_file(world["latents"])
    first = sorted(state)[0]
    state[first][0, 0] = float("inf")
    save_file(state, tmp / "bad.safetensors", metadata={"handsoff": "{}"})


def images_only_dataset(world, tmp):
    from handsoff.data.layout import DatasetCard, DatasetWriter

    writer = DatasetWriter(tmp / "images-only", DatasetCard())
    writer.add("a", np.zeros((SIZE, SIZE, 3), np.uint8))
    writer.close()


def run_config(**changes):
    def prepare(world, tmp):
        import yaml

        config = {"out": str(tmp / "run"), "generator": world["gen"], "labeled": world["labeled"],
                  "validation": world["labeled"], "test": world["labeled"], "tasks": ["seg"],
                  "inversion": {"steps": 0, "perceptual": "none"},
                  "label_generator": {"members": 2, "hidden": 8, "hidden2": 4, "max_steps": 2, "min_steps": 0,
                                      "pixels": 16},
                  "generation": {"n": 4, "batch": 4},
                  "downstream": {"epochs": 1, "batch": 2, "images_per_epoch": 2}}
        for key, value in changes.items():
            section, _, field = key.partition(".")
            if field:
                config[section] = {**config[section], field: value}
            else:
                config[key] = value
        (tmp / "run.yaml").write_text(yaml.safe_dump(config))
    return prepare


def run_config_is_a_list(world, tmp):
    (tmp / "run.yaml").write_text("- out: x\n")


def user_file_in_run_folder(world, tmp):
    run_config()(world, tmp)
    (tmp / "run").mkdir()
    (tmp / "run" / "results.json").write_text("my own results")


def nothing(world, tmp):
    pass


GEN, LABELED, LATENTS, LG, MODEL = "{gen}", "{labeled}", "{latents}", "{lg}", "{model}"
FIT_CMD = ["fit", "--generator", GEN, "--latents", LATENTS, "--tasks", "seg,kp", *FIT]
GENERATE = ["generate", "--n", "4", "--batch", "4", "--device", "cpu"]

CASES = [  # id, command (with {placeholders} and {tmp}), prepare, fragment, corrected command (or None)
    ("fit-nan-keypoint", [*FIT_CMD, "--labels", "{tmp}/bad", "--out", "{tmp}/lg"], nan_keypoint,
     "keypoints.json: annotation 2 holds NaN", None),
    ("fit-corrupt-mask", [*FIT_CMD, "--labels", "{tmp}/bad", "--out", "{tmp}/lg"], corrupt_mask,
     ".png: cannot read mask", None),
    ("fit-corrupt-depth", [*FIT_CMD[:-len(FIT)], "--tasks", "depth", *FIT, "--labels", "{tmp}/bad", "--out",
                           "{tmp}/lg"], corrupt_depth, ".npy: cannot read depth", None),
    ("fit-card-is-a-list", [*FIT_CMD, "--labels", "{tmp}/bad", "--out", "{tmp}/lg"], card_is_a_list,
     "dataset.json: expected a JSON object", None),
    ("fit-keypoints-not-json", [*FIT_CMD, "--labels", "{tmp}/bad", "--out", "{tmp}/lg"], keypoints_not_json,
     "keypoints.json: not a COCO keypoints file", None),
    ("fit-unknown-task", ["fit", "--generator", GEN, "--latents", LATENTS, "--tasks", "seg,pose", *FIT,
                          "--labels", LABELED, "--out", "{tmp}/lg"], nothing, "unknown task 'pose'",
     [*FIT_CMD, "--labels", LABELED, "--out", "{tmp}/lg"]),
    ("fit-task-without-labels", [*FIT_CMD, "--labels", "{tmp}/bad", "--out", "{tmp}/lg"], card_without_keypoints,
     "task kp: the labeled dataset has no keypoints", None),
    ("fit-missing-latents", [*FIT_CMD[:3], "--latents", "{tmp}/none.safetensors", *FIT_CMD[5:], "--labels", LABELED,
                             "--out", "{tmp}/lg"], nothing, "none.safetensors: latents file not found", None),
    ("fit-nan-latents", [*FIT_CMD[:3], "--latents", "{tmp}/bad.safetensors", *FIT_CMD[5:], "--labels", LABELED,
                         "--out", "{tmp}/lg"], nan_latents, "hold NaN or infinite values",
     [*FIT_CMD, "--labels", LABELED, "--out", "{tmp}/lg"]),
    ("fit-device-banana", [*FIT_CMD, "--labels", LABELED, "--out", "{tmp}/lg", "--device", "banana"], nothing,
     "--device 'banana': not a device", [*FIT_CMD, "--labels", LABELED, "--out", "{tmp}/lg"]),
    ("fit-missing-generator", ["fit", "--generator", "{tmp}/no-such-gan.pkl", *FIT_CMD[3:], "--labels", LABELED,
                               "--out", "{tmp}/lg"], nothing, "no-such-gan.pkl", None),
    ("invert-float-image", ["invert", "--generator", GEN, "--images", "{tmp}/bad", "--out", "{tmp}/l.safetensors",
                            "--steps", "0", "--perceptual", "none", "--device", "cpu"], float_image,
     "image mode F", None),
    ("invert-over-a-foreign-file", ["invert", "--generator", GEN, "--images", LABELED, "--out",
                                    "{tmp}/mine.safetensors", "--steps", "0", "--perceptual", "none"],
     foreign_safetensors, "not a latents file written by handsoff",
     ["invert", "--generator", GEN, "--images", LABELED, "--out", "{tmp}/l.safetensors", "--steps", "0",
      "--perceptual", "none"]),
    ("generate-lg-config-a-list", [*GENERATE, "--label-generator", "{tmp}/bad-lg", "--out", "{tmp}/d"],
     lg_config_is_a_list, "config.json: expected a JSON object",
     [*GENERATE, "--label-generator", LG, "--out", "{tmp}/d"]),
    ("generate-lg-truncated", [*GENERATE, "--label-generator", "{tmp}/bad-lg", "--out", "{tmp}/d"],
     lg_weights_truncated, "model.safetensors: cannot read", [*GENERATE, "--label-generator", LG, "--out", "{tmp}/d"]),
    ("generate-lg-nan-weights", [*GENERATE, "--label-generator", "{tmp}/bad-lg", "--out", "{tmp}/d"],
     lg_weights_nan, "weight3 hold NaN", [*GENERATE, "--label-generator", LG, "--out", "{tmp}/d"]),
    ("generate-filter-by-absent-task", [*GENERATE, "--label-generator", LG, "--out", "{tmp}/d", "--filter-by",
                                        "depth"], nothing, "--filter-by depth: not a task",
     [*GENERATE, "--label-generator", LG, "--out", "{tmp}/d", "--filter-by", "kp"]),
    ("generate-quota-unknown-class", [*GENERATE, "--label-generator", LG, "--out", "{tmp}/d",
                                      "--min-class-fraction", "wings=0.5"], nothing, "'wings' is not a class",
     [*GENERATE, "--label-generator", LG, "--out", "{tmp}/d", "--min-class-fraction", "background=1"]),
    ("generate-quota-malformed", [*GENERATE, "--label-generator", LG, "--out", "{tmp}/d", "--min-class-fraction",
                                  "skin"], nothing, "--min-class-fraction expects CLASS=FRACTION", None),
    ("generate-quota-too-large", [*GENERATE, "--label-generator", LG, "--out", "{tmp}/d", "--min-class-fraction",
                                  "skin=1.5"], nothing, "must be in (0, 1]", None),
    ("sample-truncated-generator", ["sample", "--checkpoint", "{tmp}/bad-gen", "--out", "{tmp}/g.png"],
     gen_weights_truncated, "bad-gen", ["sample", "--checkpoint", GEN, "--out", "{tmp}/g.png"]),
    ("sample-missing-checkpoint", ["sample", "--checkpoint", "{tmp}/nothing-here", "--out", "{tmp}/g.png"],
     nothing, "nothing-here", None),
    ("train-downstream-missing-data", ["train-downstream", "--data", "{tmp}/nowhere", "--val", LABELED, "--out",
                                       "{tmp}/m", *TRAIN], nothing, "nowhere", None),
    ("train-downstream-task-without-labels", ["train-downstream", "--data", "{tmp}/images-only", "--val", LABELED,
                                              "--out", "{tmp}/m", *TRAIN], images_only_dataset, "images-only",
     ["train-downstream", "--data", LABELED, "--val", LABELED, "--out", "{tmp}/m", *TRAIN]),
    ("train-downstream-backbone-weights-missing", ["train-downstream", "--data", LABELED, "--val", LABELED,
                                                   "--out", "{tmp}/m", *TRAIN, "--backbone-weights",
                                                   "{tmp}/r18.pth"], nothing, "r18.pth",
     ["train-downstream", "--data", LABELED, "--val", LABELED, "--out", "{tmp}/m", *TRAIN]),
    ("train-downstream-unknown-backbone", ["train-downstream", "--data", LABELED, "--val", LABELED, "--out",
                                           "{tmp}/m", *TRAIN, "--backbone", "vgg99"], nothing,
     "unknown backbone 'vgg99'", ["train-downstream", "--data", LABELED, "--val", LABELED, "--out", "{tmp}/m",
                                  *TRAIN]),
    ("evaluate-missing-model", ["evaluate", "--model", "{tmp}/none", "--data", LABELED], nothing, "none", None),
    ("evaluate-corrupt-test-mask", ["evaluate", "--model", MODEL, "--data", "{tmp}/bad", "--out",
                                    "{tmp}/m.json", "--device", "cpu"], corrupt_mask, "cannot read mask", None),
    ("evaluate-other-classes", ["evaluate", "--model", MODEL, "--data", "{tmp}/bad", "--out", "{tmp}/m.json",
                                "--device", "cpu"], renamed_class, "are not the model's",
     ["evaluate", "--model", MODEL, "--data", LABELED, "--out", "{tmp}/m.json", "--device", "cpu"]),
    ("run-config-a-list", ["run", "{tmp}/run.yaml"], run_config_is_a_list, "run.yaml: expected a mapping", None),
    ("run-negative-seed", ["run", "{tmp}/run.yaml", "--quiet"], run_config(seed=-1), "seed", None),
    ("run-filter-by-absent-task", ["run", "{tmp}/run.yaml", "--quiet"], run_config(**{"generation.filter_by": "kp"}),
     "filter_by 'kp' is not one of the run's tasks", None),
    ("run-quota-unknown-class", ["run", "{tmp}/run.yaml", "--quiet"],
     run_config(**{"generation.min_class_fraction": {"wings": 0.5}}), "wings is not a class of", None),
    ("run-missing-backbone-weights", ["run", "{tmp}/run.yaml", "--quiet"],
     run_config(**{"downstream.backbone_weights": "/nonexistent/r18.pth"}), "r18.pth: not found", None),
    ("run-device-banana", ["run", "{tmp}/run.yaml", "--quiet", "--device", "banana"], run_config(),
     "--device 'banana'", None),
    ("run-over-user-files", ["run", "{tmp}/run.yaml", "--quiet"], user_file_in_run_folder,
     "holds results.json but no handsoff run", None),
    ("import-coco-not-json", ["import-data", "coco", "{tmp}/ann.json", "--images", "{tmp}", "--out", "{tmp}/o"],
     lambda w, t: (t / "ann.json").write_text("{ nope"), "ann.json: not a COCO annotation file", None),
    ("import-coco-without-images", ["import-data", "coco", "{tmp}/ann.json", "--out", "{tmp}/o"], nothing,
     "--images DIR is required", None),
    ("import-unknown-mapping", ["import-data", "handsoff-faces", "{tmp}", "--out", "{tmp}/o", "--mapping",
                                "martians"], nothing, "martians: no such mapping", None),
    ("show-not-a-dataset", ["show", "{tmp}", "--out", "{tmp}/s.png"], nothing, "no dataset.json", None),
    ("report-not-a-run", ["report", "{tmp}"], nothing, "results.json", None),
    ("convert-garbage", ["convert", "{tmp}/x.pt", "{tmp}/out"], lambda w, t: (t / "x.pt").write_bytes(b"garbage"),
     "x.pt", None),
    ("train-gan-empty-folder", ["train-gan", "--data", "{tmp}", "--out", "{tmp}/gan", "--size", "16"], nothing,
     "no images", None),
]


def _fill(argv: list[str], world: dict, tmp: Path) -> list[str]:
    return [a.format(tmp=tmp, **world) for a in argv]


@pytest.mark.parametrize("argv, prepare, fragment, corrected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line_and_blocks_nothing(world, tmp_path, capsys, argv, prepare, fragment, corrected):
    prepare(world, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    capsys.readouterr()
    assert main(_fill(argv, world, tmp_path)) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    changed = {p for p in tmp_path.rglob("*") if p not in before and not p.name.startswith(".")}
    assert not [p for p in changed if p.is_file()], changed  # nothing half-written
    if corrected:
        assert main(_fill(corrected, world, tmp_path)) == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["fit", "--generator", GEN, "--latents", LATENTS, "--labels", LABELED, *FIT, "--out", "{tmp}/out"],
    ["train-downstream", "--data", LABELED, "--val", LABELED, *TRAIN, "--out", "{tmp}/out"],
    ["invert", "--generator", GEN, "--images", LABELED, "--steps", "0", "--perceptual", "none", "--out",
     "{tmp}/out"],
    ["render-heads", "--n", "2", "--size", "16", "--out", "{tmp}/out"],
], ids=["fit", "train-downstream", "invert", "render-heads"])
def test_a_second_writer_is_refused_and_the_first_output_untouched(world, tmp_path, capsys, lock_in_other_process,
                                                                   command):
    command = _fill(command, world, tmp_path)
    if command[0] == "invert":
        command[-1] += ".safetensors"
    lock_in_other_process.hold(command[-1])
    assert main(command) == 1
    assert "another handsoff process is writing this folder" in capsys.readouterr().err
    assert not Path(command[-1]).exists()
    lock_in_other_process.release()
    assert main(command) == 0


def test_debug_shows_the_traceback(tmp_path):
    from handsoff.generator import CheckpointError

    with pytest.raises(CheckpointError, match="none.pt: no such file"):
        main(["--debug", "sample", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "g.png")])


def test_a_run_resumed_on_changed_inputs_is_refused(world, tmp_path, capsys):
    """The same config on a labeled set whose files changed (same path) or another generator is refused, naming
    what differs; the outputs stay as they were."""
    labeled = copy_dataset(world, tmp_path, "labeled")
    run_config(labeled=str(labeled), transfer=False, test=None)(world, tmp_path)
    assert main(["run", str(tmp_path / "run.yaml"), "--quiet", "--no-report"]) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    mask = labeled / "masks" / f"{first_name(labeled)}.png"
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(mask)  # someone relabels an image in place
    capsys.readouterr()
    assert main(["run", str(tmp_path / "run.yaml"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert "inputs.json: this run was started with other labeled" in err and "\n" not in err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_image_folders_skip_hidden_and_half_written_files(tmp_path):
    """A killed writer's temporary file (".NAME.png.tmp.png", half-written) and macOS's "._NAME.png" are not images
    to train on or invert; images in subfolders are."""
    from handsoff.data.images import ImageFolder

    (tmp_path / "sub").mkdir()
    (tmp_path / ".cache").mkdir()
    for name in ("b.png", "sub/a.png", ".cache/c.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name)
    (tmp_path / ".b.png.tmp.png").write_bytes(b"\x89PNG half-written")
    (tmp_path / "._b.png").write_bytes(b"resource fork")
    folder = ImageFolder(tmp_path, 8)
    assert folder.names == ["b", "sub/a"]
    assert folder.batch([0, 1]).shape == (2, 3, 8, 8)
