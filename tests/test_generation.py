import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from handsoff import save_networks
from handsoff.cli import main
from handsoff.data.layout import LabeledFolder
from handsoff.generation import read_webdataset
from handsoff.label_generator import Depth, Keypoints, LabelGenerator, Segmentation, save_label_generator

CLASSES = ["background", "a", "b", "c", "d"]


@pytest.fixture(scope="module")
def label_generator(tmp_path_factory, request):
    """A tiny generator and an (untrained, so members disagree) 3-task label generator, saved."""
    from checkpoint_writers import randomize
    from conftest import TINY

    from handsoff.generator import Generator

    root = tmp_path_factory.mktemp("lg")
    torch.manual_seed(0)
    G = randomize(Generator(**TINY), seed=1).eval()
    ckpt = save_networks(root / "g", G)
    torch.manual_seed(3)
    tasks = [Segmentation(CLASSES), Keypoints(["k1", "k2"]), Depth(log_mean=1.0, log_std=0.5)]
    model = LabelGenerator(G, tasks, 32, members=3, hidden=16, hidden2=8, generator_ref=str(ckpt))
    with torch.no_grad():  # spread the (random) class logits so that every class wins somewhere
        model.ensemble.weight3.mul_(50)
    return save_label_generator(model, root / "lg")


def _generate(lg, out, *extra, n=24, batch=4):
    return ["generate", "--label-generator", str(lg), "--out", str(out), "--n", str(n), "--batch", str(batch),
            "--device", "cpu", *extra]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_a_byte_identical_dataset_that_loads_back(tmp_path, label_generator):
    assert main(_generate(label_generator, tmp_path / "a")) == 0
    assert main(_generate(label_generator, tmp_path / "b")) == 0
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a == b and "dataset.json" in a and not any(k.startswith(".progress") for k in a)
    folder = LabeledFolder(tmp_path / "a")
    assert len(folder) == 24 - 2  # 10% of 24, rounded down, filtered
    sample = folder.load(folder.names[0])
    assert sample["mask"].shape == (32, 32) and sample["keypoints"].shape == (2, 3)
    assert sample["depth"].dtype == np.float32 and sample["image"].shape == (32, 32, 3)
    assert main(_generate(label_generator, tmp_path / "c", "--seed", "1")) == 0
    assert _tree(tmp_path / "c")["images/00000000.png"] != a["images/00000000.png"]
    # Rerunning a finished run changes nothing; other settings on the same folder are refused.
    assert main(_generate(label_generator, tmp_path / "a")) == 0
    assert _tree(tmp_path / "a") == a
    assert main(_generate(label_generator, tmp_path / "a", "--truncation", "0.5")) == 1


def test_filtering_drops_exactly_the_most_uncertain_and_records_them(tmp_path, label_generator):
    out = tmp_path / "d"
    assert main(_generate(label_generator, out, "--n", "40", "--filter-top", "0.25", "--filter-by", "seg",
                          "--keep-filtered")) == 0
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and sum(r["status"] == "filtered" for r in rows) == 10
    seg_scores = np.array([r["uncertainty"]["seg"] for r in rows])
    filtered = np.array([r["status"] == "filtered" for r in rows])
    assert seg_scores[filtered].min() >= seg_scores[~filtered].max()
    for r in rows:
        where = "filtered/images" if r["status"] == "filtered" else "images"
        assert (out / where / f"{r['name']}.png").is_file()
    assert len(LabeledFolder(out)) == 30



def test_void_top_leaves_each_samples_most_uncertain_pixels_unlabeled(tmp_path, label_generator):
    """--void-top F: in every sample exactly floor(F * L^2) mask pixels are void, the ones the members disagree on
    most (JS); depth is NaN at its own most uncertain pixels (variance); everything else as without it."""
    from handsoff.generator.sampling import latents_for_seeds
    from handsoff.label_generator import load_label_generator
    from handsoff.tasks.segmentation import VOID

    assert main(_generate(label_generator, tmp_path / "plain", "--filter-top", "0", n=8)) == 0
    assert main(_generate(label_generator, tmp_path / "void", "--filter-top", "0", "--void-top", "0.25", n=8)) == 0
    plain, void = LabeledFolder(tmp_path / "plain"), LabeledFolder(tmp_path / "void")
    card = json.loads((tmp_path / "void" / "dataset.json").read_text())
    model = load_label_generator(label_generator)
    z = latents_for_seeds(0, range(8), model.G.z_dim)
    result = model.predict_z(z, truncation_psi=0.7, precision=card["source"]["generation"]["label_precision"])
    for i, name in enumerate(void.names):
        a, b = plain.load(name), void.load(name)
        unlabeled = b["mask"] == VOID
        assert unlabeled.sum() == 32 * 32 // 4
        np.testing.assert_array_equal(b["mask"][~unlabeled], a["mask"][~unlabeled])
        js = result["seg"][i]["uncertainty"].numpy()
        assert js[unlabeled].min() >= js[~unlabeled].max()
        nan = np.isnan(b["depth"])
        assert nan.sum() == 32 * 32 // 4 and not np.isnan(a["depth"]).any()
        np.testing.assert_array_equal(b["depth"][~nan], a["depth"][~nan])
        np.testing.assert_array_equal(b["keypoints"], a["keypoints"])
        np.testing.assert_array_equal(b["image"], a["image"])
    with pytest.raises(SystemExit):  # a usage error: argparse's exit status 2
        main(_generate(label_generator, tmp_path / "bad", "--void-top", "1"))

def test_class_quota_reaches_its_target(tmp_path, label_generator):
    assert main(_generate(label_generator, tmp_path / "plain", "--n", "32", "--filter-top", "0")) == 0
    share = json.loads((tmp_path / "plain" / "dataset.json").read_text())["source"]["statistics"][
        "class_image_share"]
    rare = min((c for c in CLASSES[1:] if share[c] > 0), key=lambda c: share[c])
    target = min(0.9, share[rare] + 0.3)
    out = tmp_path / "quota"
    assert main(_generate(label_generator, out, "--n", "32", "--filter-top", "0", "--min-class-fraction",
                          f"{rare}={target}")) == 0
    stats = json.loads((out / "dataset.json").read_text())["source"]["statistics"]
    assert stats["class_image_share"][rare] >= target - 1e-9
    assert stats["counts"]["kept"] == 32 and stats["counts"]["rejected"] > 0 and stats["acceptance_rate"] < 1


def test_a_quota_the_generator_cannot_fill_gives_up(tmp_path, label_generator, monkeypatch, capsys):
    import handsoff.generation.run as generation

    monkeypatch.setattr(generation, "presence_pixels", lambda pixels: 10**9)  # as if never drawn
    out = tmp_path / "never"
    assert main(["generate", "--label-generator", str(label_generator), "--out", str(out), "--n", "4", "--batch",
                 "4", "--filter-top", "0", "--device", "cpu", "--min-class-fraction", f"{CLASSES[1]}=1.0"]) == 1
    err = capsys.readouterr().err
    assert f"0 of 80 candidates contain {CLASSES[1]!r}" in err and "gave up after 20 candidates per sample" in err
    assert not (out / "dataset.json").exists()


def test_samples_past_n_in_the_last_batch_are_surplus_not_rejections(tmp_path, label_generator):
    out = tmp_path / "surplus"
    assert main(["generate", "--label-generator", str(label_generator), "--out", str(out), "--n", "6", "--batch",
                 "4", "--filter-top", "0", "--device", "cpu"]) == 0
    stats = json.loads((out / "dataset.json").read_text())["source"]["statistics"]
    assert stats["counts"] == {"kept": 6, "filtered": 0, "rejected": 0, "surplus": 2}
    assert stats["acceptance_rate"] == 1.0
    assert len(list((out / "images").iterdir())) == 6


def test_webdataset_output_reads_back(tmp_path, label_generator):
    out = tmp_path / "wds"
    assert main(_generate(label_generator, out, "--format", "webdataset", "--shards", "2")) == 0
    shards = sorted(out.glob("*.tar"))
    assert len(shards) == 2 and not (out / "images").exists()
    samples = list(read_webdataset(out))
    assert len(samples) == 22 and samples[0]["mask"].shape == (32, 32) and samples[0]["keypoints"].shape == (2, 3)
    assert main(_generate(label_generator, tmp_path / "wds2", "--format", "webdataset", "--shards", "2")) == 0
    assert _tree(out) == _tree(tmp_path / "wds2")


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "handsoff", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, **kw)


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, label_generator):
    args = _generate(label_generator, tmp_path / "killed", n=240, batch=2)
    proc = _cli(args)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "killed" / ".progress").glob("batch-*.json"))) < 5:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "killed" / "dataset.json").exists()
    assert _cli(args).wait() == 0
    assert _cli(_generate(label_generator, tmp_path / "whole", n=240, batch=2)).wait() == 0
    assert _tree(tmp_path / "killed") == _tree(tmp_path / "whole")


def test_two_workers_equal_one(tmp_path, label_generator):
    args = _generate(label_generator, tmp_path / "two", n=24, batch=4)
    args[args.index("--n")] = "--num-samples"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29517", "-m", "handsoff", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # One worker with the same threads per worker as torchrun's (1): float reductions depend on thread counts.
    assert _cli(_generate(label_generator, tmp_path / "one", n=24, batch=4)).wait() == 0
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one")


def test_downstream_dataset_reads_webdataset_output(tmp_path, label_generator):
    from handsoff.data.dataset import LabeledImageDataset

    out = tmp_path / "wds"
    assert main(_generate(label_generator, out, "--format", "webdataset", "--shards", "3")) == 0
    data = LabeledImageDataset(out, augment=True)
    item = data[0]
    assert len(data) == 22 and item["image"].shape == (3, 32, 32) and item["mask"].shape == (32, 32)
    assert item["keypoints"].shape == (2, 3) and item["depth"].shape == (1, 32, 32)


def test_a_second_writer_is_refused_at_once(tmp_path, label_generator, capsys, lock_in_other_process):
    out = tmp_path / "busy"
    lock_in_other_process.hold(out)  # another process is writing the folder
    assert main(_generate(label_generator, out, n=4)) == 1
    assert "another handsoff process is writing this folder" in capsys.readouterr().err
    assert not out.exists()
    lock_in_other_process.release()
    assert main(_generate(label_generator, out, n=4)) == 0  # released: the same command now works


def test_resume_or_rerun_with_another_label_generator_is_refused(tmp_path, label_generator, monkeypatch, capsys):
    import handsoff.generation.run as generation
    from handsoff.label_generator import load_label_generator

    other = load_label_generator(label_generator)
    with torch.no_grad():
        other.ensemble.weight3.mul_(-1)
    other_path = save_label_generator(other, tmp_path / "other-lg")

    finished = tmp_path / "finished"
    assert main(_generate(label_generator, finished, n=4)) == 0
    before = _tree(finished)
    assert main(_generate(other_path, finished, n=4)) == 1
    assert "a finished dataset from another label generator" in capsys.readouterr().err
    assert _tree(finished) == before  # untouched

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the run were killed after its batches, before the dataset is written
    unfinished = tmp_path / "unfinished"
    monkeypatch.setattr(generation, "_finalize", killed)
    assert main(_generate(label_generator, unfinished, n=4)) == 130  # Ctrl-C: exit status 130, no traceback
    assert "run the same command again to resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(_generate(other_path, unfinished, n=4)) == 1
    err = capsys.readouterr().err
    assert "started with another label generator" in err and f"delete {unfinished}" in err
    assert main(_generate(label_generator, unfinished, n=4)) == 0  # the right one resumes and finishes


def test_auto_label_precision_is_resolved_recorded_and_held_on_resume(tmp_path, label_generator, monkeypatch,
                                                                      capsys):
    """'auto' becomes bf16 or fp32 for this machine (the matmul measurement decides on a CPU); dataset.json records
    the resolved one, and a machine that resolves 'auto' otherwise cannot resume or re-run into that dataset."""
    import handsoff.generation.run as generation
    from handsoff import runtime

    def machine(speedup: float, name: str):  # a CPU whose bf16 products measured ``speedup`` x float32
        monkeypatch.setenv("HANDSOFF_CACHE", str(tmp_path / f"cache-{name}"))
        monkeypatch.setattr(runtime, "measure_bf16_matmul_speedup", lambda: speedup)

    def recorded(out):
        return json.loads((out / "dataset.json").read_text())["source"]["generation"]["label_precision"]

    machine(2.0, "bf16")
    assert main(_generate(label_generator, tmp_path / "auto", n=8)) == 0
    assert recorded(tmp_path / "auto") == "bf16"
    assert main(_generate(label_generator, tmp_path / "auto", n=8)) == 0  # same machine: nothing to do
    machine(0.5, "fp32")
    assert main(_generate(label_generator, tmp_path / "auto", n=8)) == 1
    assert "a finished dataset with other settings" in capsys.readouterr().err
    assert main(_generate(label_generator, tmp_path / "fp32", "--label-precision", "fp32", n=8)) == 0
    assert recorded(tmp_path / "fp32") == "fp32"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    machine(2.0, "bf16")
    monkeypatch.setattr(generation, "_finalize", killed)
    assert main(_generate(label_generator, tmp_path / "unfinished", n=8)) == 130
    monkeypatch.undo()
    machine(0.5, "fp32")
    assert main(_generate(label_generator, tmp_path / "unfinished", n=8)) == 1
    assert "cannot resume with different settings (label_precision)" in capsys.readouterr().err
    assert main(_generate(label_generator, tmp_path / "unfinished", "--label-precision", "bf16", n=8)) == 0
    assert recorded(tmp_path / "unfinished") == "bf16"
