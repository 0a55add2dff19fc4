"""The prepared scripts for lent GPU machines run their CPU smoke mode (what a GPU session will run at full size)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_smoke_measures_every_stage(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "device_check.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    report = json.loads((tmp_path / "device_check.json").read_text())
    stages = [row["stage"].split(" ")[0] for row in report["rows"]]
    labeled = [row["stage"] for row in report["rows"] if row["stage"].startswith("labeled")]
    # Label maps in fp32, and in the precision 'auto' takes on this machine where that is not fp32.
    assert labeled[0].endswith(", fp32") or labeled[0].endswith(", fp32 (auto)")
    assert len(labeled) == 1 + labeled[0].endswith(", fp32") and labeled[-1].endswith("(auto)")
    assert [s for i, s in enumerate(stages) if s != "labeled" or i == stages.index("labeled")] == \
        ["generator", "labeled", "inversion", "label", "downstream", "downstream"]
    for row in report["rows"]:
        numbers = [v for k, v in row.items() if k != "stage"]
        assert all(isinstance(v, (int, float)) and v > 0 for v in numbers), row
    assert "| generator 32 px |" in (tmp_path / "device_check.md").read_text()


def test_shipped_generator_records_the_commands_that_trained_it(tmp_path):
    """A widened run's command is preceded by its source's, up to the source snapshot it started from."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from ship_heads_generator import training_command
    finally:
        sys.path.pop(0)

    def make_run(name, first_tick, snapshots, **config):
        run = tmp_path / name
        run.mkdir()
        base = {"data": "runs/portrait-gan-50k", "out": f"runs/{name}", "resolution": 64, "snapshot_images": 20000,
                "tick_images": 4000, "seed": 0, "channel_base": 2048, "lr": 0.0025}
        (run / "training.json").write_text(json.dumps({**base, **config}))
        (run / "log.jsonl").write_text(json.dumps({"images_seen": first_tick}) + "\n")
        for images in snapshots:
            (run / f"network-{images:08d}").mkdir()
        return run

    source = make_run("narrow", 4000, [20000, 40000, 60000])
    wide = make_run("wide", 42016, [50000], channel_base=4096, init_from=str(source), snapshot_images=10000,
                    tick_images=2000)
    render = "handsoff render-heads --out runs/portrait-gan-50k --n 50000 --seed 4 --size 64 --framing portrait"
    assert training_command(source, 60000, "portrait") == (
        f"{render} && handsoff train-gan --data runs/portrait-gan-50k --out runs/narrow --size 64 --images 60000 "
        "--snapshot 20000 --tick 4000 --seed 0")
    assert training_command(wide, 50000, "portrait") == (
        f"{render} && handsoff train-gan --data runs/portrait-gan-50k --out runs/narrow --size 64 --images 40000 "
        "--snapshot 20000 --tick 4000 --seed 0 && handsoff train-gan --data runs/portrait-gan-50k --out runs/wide "
        f"--size 64 --images 50000 --snapshot 10000 --tick 2000 --seed 0 --channel-base 4096 --init-from {source}")
