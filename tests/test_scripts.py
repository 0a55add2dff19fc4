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
