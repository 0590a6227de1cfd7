"""A resumed stage stores each epoch once and retries out-of-memory trials (study.commands.resume).

The trimming of stored files is checked on constructed files; the out-of-memory retry in a real MNIST study run in
this process on a Ray node that declares one GPU (the trials run on CPU), with out-of-memory simulated by a worker
setup hook (tests/oom_hook.py). Slow part: `pytest tests/test_resume.py -m slow` (two short studies, ~1 minute).
"""

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tensorboard_checks import stored_steps
from study import metrics as M
from study.commands.resume import trim_trial_folder, trimmed_progress, trimmed_results

TESTS = Path(__file__).resolve().parent


def rows_of(epochs, status=M.STATUS_RUNNING):
    return [{M.EPOCH: e, M.STATUS: status, "training_iteration": e + 1} for e in epochs]


def test_result_rows_after_the_restart_epoch_are_dropped_and_the_rest_kept_byte_for_byte():
    lines = [json.dumps(r) + "\n" for r in rows_of(range(5))]
    text = "".join(lines) + '{"epoch": 5, "sta'  # a row cut short by a killed driver
    assert trimmed_results(text, 2) == "".join(lines[:3])
    assert trimmed_results(text, -1) == ""  # restarted from scratch: every row comes again
    assert trimmed_results("".join(lines), 4) == "".join(lines)


def test_progress_rows_after_the_restart_epoch_are_dropped():
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, ["training_iteration", M.EPOCH, M.MESSAGE])  # as Tune's CSV logger writes it
    writer.writeheader()
    for row in rows_of(range(4)):
        writer.writerow({"training_iteration": row["training_iteration"], M.EPOCH: row[M.EPOCH],
                         M.MESSAGE: "a, quoted\nmessage"})
    text = out.getvalue()
    kept = list(csv.DictReader(io.StringIO(trimmed_progress(text, 1), newline="")))
    assert [int(r[M.EPOCH]) for r in kept] == [0, 1] and kept[0][M.MESSAGE] == "a, quoted\nmessage"
    assert trimmed_progress(text, 3) == text
    assert trimmed_progress(text + "5,4,cut sh", 3) == text  # a row cut short by a killed driver


def test_a_trial_folder_is_trimmed_to_its_restart_epoch(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    (tmp_path / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows_of(range(4))))
    writer = SummaryWriter(str(tmp_path))
    for epoch in range(4):
        writer.add_scalar("train/loss", 1.0 / (epoch + 1), epoch)
    writer.close()
    (tmp_path / "params.json").write_text("{}")
    trim_trial_folder(pafs.LocalFileSystem(), str(tmp_path), 1)
    assert [r[M.EPOCH] for r in map(json.loads, (tmp_path / "result.json").read_text().splitlines())] == [0, 1]
    assert stored_steps(tmp_path) == {"train/loss": [0, 1]}
    assert (tmp_path / "params.json").read_text() == "{}"


def test_a_steps_trial_with_fractional_epochs_keeps_its_rows_and_events_up_to_its_checkpoint(tmp_path):
    """Steps rows carry epoch = step / steps per epoch and TensorBoard's step is the training step: a restart at
    step 6 of 4-step epochs (epoch 1.5) keeps every row and event up to step 6, and drops only those after it."""
    from types import SimpleNamespace
    from torch.utils.tensorboard import SummaryWriter
    from study.commands.resume import restart_point

    steps = [0, 2, 4, 6, 8, 10]
    rows = [{M.EPOCH: s / 4, M.STEP: s, "steps_to_result": float("nan"), M.STATUS: M.STATUS_RUNNING}
            for s in steps]
    (tmp_path / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    writer = SummaryWriter(str(tmp_path))
    for s in steps:
        writer.add_scalar("val/error", 1.0 / (s + 1), s)
    writer.close()
    trial = SimpleNamespace(latest_checkpoint_result=SimpleNamespace(metrics=rows[3]))
    assert restart_point(trial) == (1.5, 6)
    trim_trial_folder(pafs.LocalFileSystem(), str(tmp_path), *restart_point(trial))
    kept = [r[M.STEP] for r in map(json.loads, (tmp_path / "result.json").read_text().splitlines())]
    assert kept == [0, 2, 4, 6]
    assert stored_steps(tmp_path) == {"val/error": [0, 2, 4, 6]}
    # A workload trial's rows also carry a step, but its events are keyed by the epoch.
    workload = SimpleNamespace(latest_checkpoint_result=SimpleNamespace(metrics={M.EPOCH: 2, M.STEP: 40}))
    assert restart_point(workload) == (2.0, None)


# ---- a real study: out of memory, then --resume --retry-errored with a larger share --------------------------

@pytest.fixture
def ray_with_oom(tmp_path):
    """A local Ray whose node declares one GPU, with every worker running oom_hook.setup."""
    import ray

    flag = tmp_path / "oom-flag"
    flag.touch()
    ray.shutdown()
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(TESTS.parent), str(TESTS)) if p)
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "oom_hook.setup",
                          "env_vars": {"PYTHONPATH": path, "OOM_FLAG": str(flag), "OOM_BATCH": "64"}})
    yield flag
    ray.shutdown()


def stored(stage: Path) -> dict[int, list[dict]]:
    """batch size -> result.json rows of the stage's trials."""
    out = {}
    for params in stage.glob("*/params.json"):
        rows = [json.loads(line) for line in (params.parent / "result.json").read_text().splitlines()]
        out[json.loads(params.read_text())["batch_size"]] = rows
    return out


@pytest.mark.slow
def test_an_out_of_memory_trial_is_retried_with_the_new_share_on_retry_errored(ray_with_oom, tmp_path):
    from analysis.load import open_study
    from study.mnist import command as mnist

    argv = ["--smoke", "--lr", "1e-3", "--targets", "mean", "--batch-sizes", "16", "64", "--runs", "1",
            "--epochs", "3", "--storage-path", str(tmp_path), "--name", "s"]
    stage = tmp_path / "s" / "batch_sweep"
    assert mnist.main([*argv, "--gpus-per-trial", "0.5"]) == 1  # the study reports its out-of-memory trial
    first = stored(stage)
    assert [(r[M.EPOCH], r[M.STATUS]) for r in first[64]] == [(0, "running"), (1, "running"), (2, M.STATUS_OOM)]
    assert first[16][-1][M.STATUS] == M.STATUS_DONE
    kept = (next(p.parent for p in stage.glob("*/params.json") if json.loads(p.read_text())["batch_size"] == 16)
            / "result.json").read_bytes()
    assert {t.outcome for t in open_study(str(tmp_path / "s")).trials("batch_sweep")} == {"done", "error"}

    ray_with_oom.unlink()  # the larger share fits
    assert mnist.main([*argv, "--resume", "--gpus-per-trial", "0.5"]) == 1  # a plain resume does not retry it
    assert stored(stage)[64] == first[64]
    assert mnist.main([*argv, "--resume", "--retry-errored", "--gpus-per-trial", "1"]) == 0
    after = stored(stage)
    rows = after[64]
    assert [r[M.EPOCH] for r in rows] == [0, 1, 2, 3]  # on from epoch 1's checkpoint, each epoch once
    assert rows[:2] == first[64][:2] and rows[-1][M.STATUS] == M.STATUS_DONE
    assert [r[M.GPU_SHARE] for r in rows] == [0.5, 0.5, 1.0, 1.0]  # the retry ran in the share given now
    assert (stage.parent / "batch_sweep" / next(
        p.parent.name for p in stage.glob("*/params.json") if json.loads(p.read_text())["batch_size"] == 16)
        / "result.json").read_bytes() == kept  # the finished trial was not run again
    trials = open_study(str(tmp_path / "s")).trials("batch_sweep")
    assert {t.outcome for t in trials} == {"done"}
    assert json.loads((stage / "errored_trials.json").read_text()) == []
    steps = stored_steps(next(p.parent for p in stage.glob("*/params.json")
                              if json.loads(p.read_text())["batch_size"] == 64))
    assert steps["train/loss"] == [1, 2, 3]  # epoch 0 has no training loss; each epoch once


@pytest.mark.slow
def test_a_trial_whose_snapshot_names_a_deleted_checkpoint_starts_again_from_scratch(local_ray, tmp_path, capsys):
    from study.mnist import command as mnist

    argv = ["--smoke", "--lr", "1e-3", "--targets", "mean", "--batch-sizes", "16", "64", "--runs", "1",
            "--epochs", "2", "--noise-scale", "off", "--storage-path", str(tmp_path), "--name", "s"]
    stage = tmp_path / "s" / "batch_sweep"
    assert mnist.main(argv) == 0
    folders = {json.loads(p.read_text())["batch_size"]: p.parent for p in stage.glob("*/params.json")}
    first = stored(stage)
    kept = (folders[16] / "result.json").read_bytes()
    # What a driver stopped at the wrong moment leaves: Tune keeps two checkpoints per trial, so the one its last
    # snapshot names can be deleted before the next snapshot. Here: batch 64's trial, still running in the
    # snapshot, whose latest checkpoint is gone.
    snapshot = max(stage.glob("experiment_state-*.json"))
    state = json.loads(snapshot.read_text())
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        if trial["trial_id"] == first[64][-1]["trial_id"]:
            trial["status"] = "RUNNING"
            entry[0] = json.dumps(trial)
    snapshot.write_text(json.dumps(state))
    shutil.rmtree(max(folders[64].glob("checkpoint_*")))

    capsys.readouterr()
    assert mnist.main([*argv, "--resume"]) == 0  # Tune alone fails the trial: "Could not recover from checkpoint"
    assert "starts again from scratch" in capsys.readouterr().out
    rows = stored(stage)[64]
    assert [r[M.EPOCH] for r in rows] == [0, 1, 2] and rows[-1][M.STATUS] == M.STATUS_DONE  # each epoch once
    assert {r["pid"] for r in rows}.isdisjoint(r["pid"] for r in first[64])  # all of them trained again
    assert [r[M.TEST_MSE] for r in rows] == pytest.approx([r[M.TEST_MSE] for r in first[64]], rel=1e-5)  # same seed
    assert (folders[16] / "result.json").read_bytes() == kept  # the finished trial was not run again
    assert stored_steps(folders[64])["test/mse"] == [0, 1, 2]
