"""Workload studies end to end through `python -m study run` (study.__main__.main, in this process on one small
Ray): the two examples, mnist-cnn and cifar10-resnet8 smoke studies, what they store, TensorBoard's HPARAMS; and
mnist-cnn on real MNIST reaching under 2 % validation error (without Ray). The other shipped workloads' smoke
studies: tests/test_pcam_workload.py (pcam) and tests/test_mnist_workload.py (mnist-regression, with --lr-search)."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from study.__main__ import main
from study.workload import resolve
from tensorboard_checks import session_groups

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def study_rows(study: Path) -> dict:
    """trial folder -> its result rows."""
    return {p.parent.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in study.glob("sweep/*/result.json")}


def check_stored(study: Path, name: str, trials: int, epochs: int) -> dict:
    saved = json.loads((study / "study.json").read_text())
    assert saved["study"] == name and saved["kind"] == "workload"
    described = json.loads((study / "workload.json").read_text())
    assert described["name"] == name and described["primary"] == "val_error"
    assert {"name": "val_error", "higher_is_better": False} in described["metrics"]
    rows = study_rows(study)
    assert len(rows) == trials
    for trial, trial_rows in rows.items():
        assert [r["epoch"] for r in trial_rows] == list(range(epochs + 1)), trial
        last = trial_rows[-1]
        assert last["status"] == "done" and 0 <= last["val_error"] <= 1 and 0 <= last["test_error"] <= 1
        assert last["step"] > 0 and last["examples"] == epochs * saved["data"]["train"]
        assert last["config"]["workload"] and last["config"]["seed"] == last["config"]["run"]
    return described


def test_list_names_the_shipped_workloads(capsys):
    assert main(["list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert len(names) >= 2 and {"mnist-cnn", "cifar10-resnet8"} <= set(names)


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["run", "no-such-workload"]) == 2
    assert main(["run", "mnist-cnn", "--storage-path", str(tmp_path), "--name", "x"]) == 2  # no data
    assert main(["run", "mnist-cnn", "--smoke", "--optimizers", "lamb", "--storage-path", str(tmp_path)]) == 2
    assert main(["run", "mnist-cnn", "--smoke", "--batch-sizes", "8", "8", "--storage-path", str(tmp_path)]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all(e.startswith("error: ") for e in errors), errors
    assert "unknown workload" in errors[0] and "--data-dir" in errors[1] and "lamb" in errors[2]
    assert "more than once" in errors[3] and not any(tmp_path.iterdir())


def test_example_study_stores_results_and_tensorboard_lists_axes_and_metrics(local_ray, tmp_path,
                                                                             tensorboard_api):
    argv = ["run", "examples/digits_workload.py", "--smoke", "--storage-path", str(tmp_path), "--name", "digits"]
    assert main(argv) == 0
    study = tmp_path / "digits"
    described = check_stored(study, "digits-cnn", trials=2, epochs=3)
    assert described["axes"]["batch_size"] == [16, 64] and described["goals"][0]["value"] == 0.05
    best = min(rows[-1]["val_error"] for rows in study_rows(study).values())
    assert best < 0.5  # chance is 0.9: the smoke grid learns something in three epochs
    # A second start refuses to overwrite; --resume of a finished study changes nothing.
    before = {k: len(v) for k, v in study_rows(study).items()}
    assert main(argv) == 2
    assert main(["run", "examples/digits_workload.py", "--storage-path", str(tmp_path), "--name", "digits",
                 "--resume"]) == 0
    assert {k: len(v) for k, v in study_rows(study).items()} == before

    api = tensorboard_api(study)
    experiment = api("/data/plugin/hparams/experiment", {"experimentName": ""})
    columns = {h["name"] for h in experiment["hparamInfos"]}
    assert {"batch_size", "optimizer", "lr", "seed"} <= columns
    assert next(h for h in experiment["hparamInfos"] if h["name"] == "batch_size")["differs"]
    tags = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert tags[0] == "val/error" and {"val/loss", "test/error"} <= set(tags)
    groups = session_groups(api, 2)
    assert len(groups) == 2 and all(g["sessions"][0]["status"] == "STATUS_SUCCESS" for g in groups)
    for group in groups:
        values = {m["name"]["tag"]: float(m["value"]) for m in group["metricValues"]}
        assert 0 <= values["val/error"] <= 1 and 0 <= values["test/error"] <= 1
    report = REPO / "analysis" / "workload_report.py"
    if report.exists():  # the generic report (issue 20's analysis part) where it is merged
        done = subprocess.run([sys.executable, "-m", "analysis.report", str(study)], cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "val_error" in (study / "report" / "report.md").read_text()


def test_tabular_example_end_to_end_with_its_option_and_auc_in_tensorboard_and_the_report(local_ray, tmp_path,
                                                                                          tensorboard_api):
    """examples/tabular_workload.py: no prepare, float32 features, an AUC metric and its own option --width, given
    a value other than its default: the option reaches the trials, TensorBoard's HPARAMS and the report's header,
    and the AUC the report's tables."""
    assert main(["run", "examples/tabular_workload.py", "--smoke", "--width", "16", "--storage-path", str(tmp_path),
                 "--name", "tab"]) == 0
    study = tmp_path / "tab"
    described = check_stored(study, "breast-cancer-mlp", trials=4, epochs=3)
    assert {"name": "val_auc", "higher_is_better": True} in described["metrics"]
    rows = study_rows(study)
    assert all(r[-1]["config"]["options"] == {"width": 16} for r in rows.values())
    assert max(r[-1]["val_auc"] for r in rows.values()) > 0.95  # three epochs learn the table

    api = tensorboard_api(study)
    experiment = api("/data/plugin/hparams/experiment", {"experimentName": ""})
    width = next(h for h in experiment["hparamInfos"] if h["name"] == "width")
    assert width["domainDiscrete"] == [16] and not width.get("differs")
    assert "val/auc" in [m["name"]["tag"] for m in experiment["metricInfos"]]
    groups = session_groups(api, 4)
    assert len(groups) == 4 and all(g["hparams"]["width"] == 16 for g in groups)

    done = subprocess.run([sys.executable, "-m", "analysis.report", str(study)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    text = (study / "report" / "report.md").read_text()
    assert "the workload's own options: `width` 16" in text
    assert "## Other declared metrics" in text and "| final val_auc | best val_auc |" in text
    metrics = {r.batch_size: r for r in pd.read_csv(study / "report" / "metrics.csv").itertuples()}
    for batch in (16, 64):
        finals = [r[-1]["val_auc"] for r in rows.values() if r[-1]["config"]["batch_size"] == batch]
        assert metrics[batch].final_val_auc == pytest.approx(np.mean(finals))
        assert metrics[batch].final_val_auc_low < metrics[batch].final_val_auc_high  # two seeds: an interval


def test_mnist_cnn_smoke_study_from_python_with_a_tune_callback(local_ray, tmp_path, result_recorder):
    import study

    seen = result_recorder()
    uri = study.run_study("mnist-cnn", smoke=True, storage_path=str(tmp_path), name="m",  # as a notebook would
                          callbacks=[seen])
    assert Path(uri) == tmp_path / "m"
    described = check_stored(tmp_path / "m", "mnist-cnn", trials=2, epochs=2)
    assert described["goals"] == [{"metric": "val_error", "value": 0.01, "higher_is_better": False}]
    assert described["chance"]["val_error"] == 0.9
    # The user's callback saw every row the study stored, with its values; the study's own callbacks ran too
    # (the TensorBoard files are theirs), and study.json holds flags, not callbacks.
    stored = sorted((r["trial_id"], r["training_iteration"], r["val_error"])
                    for rows in study_rows(tmp_path / "m").values() for r in rows)
    assert len(stored) == 2 * 3 and sorted((r["trial_id"], r["training_iteration"], r["val_error"])
                                           for r in seen.results) == stored
    assert all(list(p.parent.glob("events.out.tfevents.*")) for p in (tmp_path / "m").glob("sweep/*/result.json"))
    assert "callbacks" not in json.loads((tmp_path / "m" / "study.json").read_text())["args"]

    # A resumed study runs with the callbacks given now, not those Tune pickled at the start: one trial, marked
    # running in Tune's last snapshot with its latest checkpoint gone, trains again and reports to the new one.
    sweep = tmp_path / "m" / "sweep"
    snapshot = max(sweep.glob("experiment_state-*.json"))
    state = json.loads(snapshot.read_text())
    trial = json.loads(state["trial_data"][0][0])
    trial["status"] = "RUNNING"
    state["trial_data"][0][0] = json.dumps(trial)
    snapshot.write_text(json.dumps(state))
    (folder,) = [p.parent for p in sweep.glob("*/result.json") if trial["trial_id"] in p.read_text()]
    shutil.rmtree(max(folder.glob("checkpoint_*")))
    again = result_recorder()
    study.run_study("mnist-cnn", storage_path=str(tmp_path), name="m", resume=True, callbacks=[again])
    rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2] and len(seen.results) == 2 * 3
    assert [(r["trial_id"], r["epoch"], r["val_error"]) for r in again.results] == \
        [(r["trial_id"], r["epoch"], r["val_error"]) for r in rows]


def test_cifar10_resnet8_smoke_study_with_no_data(local_ray, tmp_path):
    """--smoke writes a generated set in CIFAR-10's own files to a temporary folder and reads it back through the
    CIFAR reader (study.data.cifar.load_synthetic): no --data-dir needed."""
    assert main(["run", "cifar10-resnet8", "--smoke", "--storage-path", str(tmp_path), "--name", "c"]) == 0
    described = check_stored(tmp_path / "c", "cifar10-resnet8", trials=2, epochs=2)
    assert described["goals"][0] == {"metric": "val_error", "value": 0.3, "higher_is_better": False}
    saved = json.loads((tmp_path / "c" / "study.json").read_text())
    assert saved["data"] == {"train": 256, "val": 128, "test": 100}
    assert saved["args"]["synthetic"] is True and saved["args"]["data_dir"] == ""


def test_least_squares_smoke_study_learns_towards_the_exact_floor(local_ray, tmp_path):
    """The known-answer workload through Tune: it stores what it declares, and SGD's loss falls from its exact
    start (sum h_i w*_i^2 / 2 + noise^2 / 2) towards the floor noise^2 / 2, never below it by more than noise."""
    from study.workloads import least_squares as ls

    assert main(["run", "least-squares", "--smoke", "--storage-path", str(tmp_path), "--name", "ls"]) == 0
    described = json.loads((tmp_path / "ls" / "workload.json").read_text())
    assert described["primary"] == "val_loss" and described["splits"] == ["val"]
    assert len(study_rows(tmp_path / "ls")) == 2
    options = resolve("least-squares").option_values({"train_size": 4096, "val_size": 1024})
    h, w_star = ls.problem(options)
    start, floor = ls.population_loss(-w_star, h, 0.25), 0.25 / 2
    for trial_rows in study_rows(tmp_path / "ls").values():
        assert [r["epoch"] for r in trial_rows] == [0, 1] and trial_rows[-1]["status"] == "done"
        first, last = trial_rows[0]["val_loss"], trial_rows[-1]["val_loss"]
        assert first == pytest.approx(start, rel=0.15)  # zero weights on 1,024 validation examples
        assert 0.8 * floor < last < first / 2


def test_mnist_cnn_reaches_two_percent_validation_error_on_real_mnist(mnist_dir):
    from study.engine.config import TrainConfig
    from study.engine.run_workload import run_workload
    from study.workloads.mnist_cnn import workload

    options = workload.option_values({"data_dir": str(mnist_dir), "train_limit": 12000, "val_size": 2000})
    splits = workload.load(options)
    rows = []
    cfg = TrainConfig.from_dict({"workload": "mnist-cnn", "options": options, "batch_size": 32, "lr": 0.03,
                                 "optimizer": "nesterov", "epochs": 2, "schedule": "cosine",
                                 "noise_scale": False})
    run_workload(cfg, workload, splits, torch.device("cpu"), lambda metrics, state: rows.append(metrics))
    assert rows[0]["val_error"] > 0.5  # the untrained network is at chance
    assert rows[-1]["val_error"] < 0.02, rows[-1]["val_error"]
    assert math.isfinite(rows[-1]["test_error"]) and rows[-1]["test_error"] < 0.03
