"""The README's LUNA16 commands (train with a fold held out, evaluate it with the official protocol,
export) run as written on a tiny LUNA16 in its real format: five phantom scans exported as
MetaImage into subset0 (3 scans, the test fold), subset1 (validation) and subset2 (training), with
annotations.csv and annotations_excluded.csv. The one change: training lasts 2 steps, not 2000."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("SimpleITK")
torch = pytest.importorskip("torch")

from test_data_luna16 import nodule_row, phantom_to_mhd, uid_of, write_csv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FULL_TRAINING = "--epochs 10 --steps-per-epoch 200"
SHORT_TRAINING = "--epochs 1 --steps-per-epoch 2 --batch-size 2 --crop 128"


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Your own CT") :]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_luna16_commands_run(tmp_path: Path) -> None:
    root = tmp_path / "luna16"
    layout = [(0, 12), (0, 14), (0, 16), (1, 11), (2, 15)]  # (subset, phantom seed)
    truths = {seed: phantom_to_mhd(seed, tmp_path / "ph", root / f"subset{sub}" / f"{uid_of(seed)}.mhd") for sub, seed in layout}
    write_csv(root / "annotations.csv", [nodule_row(uid_of(s), t) for s, t in truths.items() if s != 16])
    write_csv(root / "annotations_excluded.csv", [[uid_of(16), 0.0, 0.0, -180.0, -1]])

    block = readme_block()
    assert FULL_TRAINING in block and block.count("ctlesion ") == 3
    work = tmp_path / "run"
    work.mkdir()
    env = {**os.environ, "LUNA16": str(root), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", block.replace(FULL_TRAINING, SHORT_TRAINING)],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    meta = torch.load(work / "work/luna16/fold0/best.pt", map_location="cpu", weights_only=True)["meta"]
    assert meta["train_config"]["data"] == f"luna16:{root}" and meta["train_config"]["test_fold"] == 0
    metrics = json.loads((work / "work/luna16/eval0/metrics.json").read_text())
    assert metrics["protocol"] == "luna16 fold 0" and metrics["froc_all"]["scans"] == 3
    assert metrics["froc_all"]["nodules"] == 2  # subset0's annotated scans; the excluded finding is not truth
    assert "the LUNA16 figure" in run.stdout
    with open(work / "work/luna16/eval0/candidates.csv") as f:
        assert next(csv.reader(f)) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert (work / "work/luna16/fold0.onnx").stat().st_size > 1_000_000
