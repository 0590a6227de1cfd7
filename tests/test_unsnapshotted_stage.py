"""A stage whose driver stopped between Tune's tuner.pkl and its first experiment snapshot is started again from
scratch on --resume, with one line saying so, instead of Tune's traceback and a restart on top of the old rows.

`python -m pytest tests/test_unsnapshotted_stage.py -q` (slow: two tiny MNIST studies, about a minute). The state is
made from a finished study: its snapshots removed, one trial folder removed, the other kept with its rows.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from study import metrics as M

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 2
STUDY = ["--smoke", "--targets", "mean", "--lr", "1e-3", "--batch-sizes", "16", "32", "--runs", "1", "--epochs", str(EPOCHS),
         "--num-cpus", "2", "--name", "s"]


def mnist(store: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "study.mnist", *STUDY, "--storage-path", str(store), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def epochs_per_trial(stage: Path) -> dict[str, list[int]]:
    return {f.parent.name: [json.loads(line)[M.EPOCH] for line in f.read_text().splitlines() if line.strip()]
            for f in sorted(stage.glob("*/result.json"))}


def test_a_stage_stopped_before_its_first_snapshot_starts_again_from_scratch(tmp_path):
    mnist(tmp_path)
    stage = tmp_path / "s" / "batch_sweep"
    trial_dirs = sorted(p for p in stage.iterdir() if p.is_dir() and (p / "result.json").exists())
    assert len(trial_dirs) == 2 and (stage / "tuner.pkl").exists()
    for snapshot in stage.glob("experiment_state-*.json"):
        snapshot.unlink()
    shutil.rmtree(trial_dirs[0])  # the state a stop leaves: one trial had not started, one had stored rows
    done = mnist(tmp_path, "--resume")
    output = done.stdout + done.stderr
    notes = [line for line in output.splitlines() if "starts again from scratch" in line]
    assert len(notes) == 1 and str(stage) in notes[0], output[-3000:]
    assert "Failed to restore the run state" not in output, output[-3000:]  # Tune's traceback, then a restart
    assert epochs_per_trial(stage) == {d.name: list(range(EPOCHS + 1)) for d in trial_dirs}  # each epoch once
    assert list(stage.glob("experiment_state-*.json"))
