"""The study's TensorBoard writer and console, without Ray: fake trials through the Tune callbacks, read back
with TensorBoard's own event reader. (The HTTP API of a real TensorBoard is checked on the smoke studies in
test_mnist_study.py and test_pcam_study.py.)"""

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from study import metrics as M
from study.commands.console import StudyConsole, tune_console
from study.mnist import board as mnist_board
from study.pcam import board as pcam_board
from study.commands.tensorboard import RunName, StudyTensorBoard, applies, experiment_summary, session_start


class Trial(SimpleNamespace):
    __hash__ = object.__hash__  # Tune's trials are dict keys in its callbacks


def fake_trial(folder: Path, config: dict, trial_id="abcde_00007"):
    folder.mkdir(parents=True)
    return Trial(local_path=str(folder), config=config, trial_id=trial_id, last_result={})


def epoch(e, **values):
    return {M.EPOCH: e, M.DIVERGED: False, M.STATUS: M.STATUS_RUNNING, "done": False,
            "iterations_since_restore": e + 1, **values}


def read(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def end_status(acc) -> int:
    content = acc.SummaryMetadata(metadata.SESSION_END_INFO_TAG).plugin_data.content
    return metadata.parse_session_end_info_plugin_data(content).status


def test_diverged_trial_ends_failed_with_no_finite_key_metric(tmp_path):
    writer = StudyTensorBoard("mnist", "lr_coarse", key_metrics=mnist_board.KEY_METRICS)
    cfg = {"stage": "lr_coarse", "target": "mean", "lr": 1e3, "lr_factor": 1.0, "batch_size": 32, "run": 0,
           "seed": 32, "optimizer": "adam", "momentum": 0.0}
    trial = fake_trial(tmp_path / "driver_artifacts" / "t", cfg)
    writer.log_trial_start(trial)
    writer.log_trial_result(1, trial, epoch(0, test_mse=40.0, val_mse=41.0, train_loss=math.nan))
    trial.last_result = epoch(1, test_mse=math.nan, val_mse=39.0, train_loss=math.inf, diverged=True)
    writer.log_trial_result(2, trial, trial.last_result)
    writer.log_trial_end(trial)
    acc = read(trial.local_path)
    assert end_status(acc) == api_pb2.STATUS_FAILURE
    for tag in ("test/mse", "val/mse"):  # the last value is what HPARAMS shows: never epoch 0's
        assert math.isnan(acc.Scalars(tag)[-1].value)
    assert [e.step for e in acc.Scalars("test/mse")] == [0, 1]
    assert acc.Scalars("train/diverged")[-1].value == 1.0
    assert not any(t.startswith(("done", "iterations")) for t in acc.Tags()["scalars"])  # Tune's bookkeeping
    start = metadata.parse_session_start_info_plugin_data(
        acc.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content)
    assert start.group_name == "lr_coarse/t"
    assert "momentum" not in start.hparams and "lr_factor" not in start.hparams and "run" not in start.hparams
    assert start.hparams["lr"].number_value == 1e3 and start.hparams["target"].string_value == "mean"


def test_finished_and_errored_trials(tmp_path):
    writer = StudyTensorBoard("pcam", "grid", key_metrics=pcam_board.KEY_METRICS)
    base = {"optimizer": "sgd", "lr": 0.002, "momentum": 0.9, "batch_size": 32, "run": 0, "seed": 0}
    done, failed = fake_trial(tmp_path / "a", base), fake_trial(tmp_path / "b", dict(base, optimizer="adam"))
    for trial in (done, failed):
        writer.log_trial_start(trial)
        writer.log_trial_result(1, trial, epoch(1, val_auc=0.7, val_acc=0.6, best_val_acc=0.6, best_epoch=1))
    done.last_result = epoch(2, val_auc=0.65, val_acc=0.5, best_val_acc=0.6, best_epoch=1, test_auc=0.8)
    writer.log_trial_result(2, done, done.last_result)
    writer.log_trial_end(done)
    writer.log_trial_end(failed, failed=True)
    ok, bad = read(done.local_path), read(failed.local_path)
    assert end_status(ok) == api_pb2.STATUS_SUCCESS and end_status(bad) == api_pb2.STATUS_FAILURE
    assert ok.Scalars("test/auc")[-1].value == pytest.approx(0.8)  # float32 in the event file
    assert ok.Scalars("val/best_auc")[-1].value == pytest.approx(0.7)  # the best-accuracy epoch's AUC, not the last epoch's
    assert math.isnan(bad.Scalars("val/best_auc")[-1].value) and math.isnan(bad.Scalars("val/best_acc")[-1].value)


def test_diverged_pcam_trial_keeps_the_result_of_its_tested_best_epoch(tmp_path):
    """The report counts a diverged PCam trial's test of its best-on-validation weights (from before it diverged);
    TensorBoard shows the same result, its status still failure. Diverging in epoch 1 leaves nothing tested."""
    writer = StudyTensorBoard("pcam", "grid", key_metrics=pcam_board.KEY_METRICS)
    base = {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "batch_size": 32, "run": 0, "seed": 0}
    late, early = fake_trial(tmp_path / "late", base), fake_trial(tmp_path / "early", dict(base, run=1))
    for trial in (late, early):
        writer.log_trial_start(trial)
        writer.log_trial_result(0, trial, epoch(0, val_auc=0.5, val_acc=0.5, best_val_acc=math.nan, best_epoch=-1))
    writer.log_trial_result(1, late, epoch(1, val_auc=0.7, val_acc=0.6, best_val_acc=0.6, best_epoch=1))
    late.last_result = epoch(2, val_auc=0.5, val_acc=0.5, best_val_acc=0.6, best_epoch=1, test_auc=0.75,
                             test_acc=0.66, train_loss=math.nan, diverged=True, status=M.STATUS_DIVERGED)
    early.last_result = epoch(1, val_auc=0.5, val_acc=0.5, best_val_acc=math.nan, best_epoch=-1,
                              train_loss=math.nan, diverged=True, status=M.STATUS_DIVERGED)
    for trial in (late, early):
        writer.log_trial_result(2, trial, trial.last_result)
        writer.log_trial_end(trial)
    kept, blank = read(late.local_path), read(early.local_path)
    assert end_status(kept) == end_status(blank) == api_pb2.STATUS_FAILURE
    assert kept.Scalars("test/auc")[-1].value == pytest.approx(0.75)
    assert kept.Scalars("val/best_acc")[-1].value == pytest.approx(0.6)
    assert math.isnan(blank.Scalars("val/best_auc")[-1].value) and math.isnan(blank.Scalars("test/auc")[-1].value)


def test_experiment_ticks_the_telling_hyperparameters_first():
    domains = dict(stage=["lr_coarse", "batch_sweep"], target=["mean", "std"], lr=[1e-3, 1e-2], lr_factor=[0.5, 1],
                   batch_size=[16, 32], run=[0, 1], seed=[16, 17, 32], optimizer=["adam"], lr_scaling=["none"])
    summary = experiment_summary("mnist", domains, mnist_board.KEY_METRICS, order=mnist_board.HPARAMS)
    data = metadata.parse_experiment_plugin_data(summary.value[0].metadata.plugin_data.content)
    differs = {h.name for h in data.hparam_infos if h.differs}
    assert differs == {"stage", "target", "batch_size", "lr", "run"}  # TensorBoard ticks five
    assert {h.name for h in data.hparam_infos} == set(domains)
    assert [m.name.tag for m in data.metric_infos][:2] == ["test/mse", "val/mse"]


def test_hyperparameters_that_apply():
    assert applies("momentum", {"optimizer": "sgd"}) and not applies("momentum", {"optimizer": "adam"})
    assert applies("lr_factor", {"stage": "lr_fine"}) and not applies("lr_factor", {"stage": "batch_sweep"})
    assert applies("run", {"stage": "batch_sweep"}) and not applies("run", {"stage": "lr_fine"})
    summary = session_start({"optimizer": "adam", "momentum": 0.9, "amp": True, "lr": 1e-4}, "grid/x")
    hparams = metadata.parse_session_start_info_plugin_data(summary.value[0].metadata.plugin_data.content).hparams
    assert set(hparams) == {"optimizer", "amp", "lr"} and hparams["amp"].bool_value is True


def test_a_workloads_own_options_are_hyperparameters_beside_the_grid():
    from study.commands.tensorboard import option_hparams

    config = {"batch_size": 16, "lr": 0.1, "stage": "sweep", "options": {"width": 32, "stage": "x", "scale": True}}
    summary = session_start(config, "sweep/t")
    hparams = metadata.parse_session_start_info_plugin_data(summary.value[0].metadata.plugin_data.content).hparams
    assert hparams["width"].number_value == 32 and hparams["scale"].bool_value is True
    assert hparams["stage"].string_value == "sweep" and hparams["options.stage"].string_value == "x"  # no clash
    assert "options" not in hparams
    own = option_hparams(config["options"], config)
    domains = {"batch_size": [16, 64], "lr": [0.1], **{name: [value] for name, value in own.items()}}
    data = metadata.parse_experiment_plugin_data(experiment_summary("digits-mlp", domains).value[0].metadata
                                                 .plugin_data.content)
    assert [h.name for h in data.hparam_infos] == ["batch_size", "lr", "width", "options.stage", "scale"]


def test_run_names_say_what_the_trial_is():
    placeholder = ("__fn_ph", "0123")  # what Tune holds for a sample_from value when it names the folder
    sweep = SimpleNamespace(trial_id="abcde_00012", config={"stage": "batch_sweep", "target": "std", "lr": placeholder,
                                                            "lr_factor": 1.0, "batch_size": 64, "run": 3})
    assert mnist_board.run_names({"std": 0.002})(sweep) == "std_lr=0.002_batch=64_run=3_00012"
    fine = SimpleNamespace(trial_id="abcde_00001", config={"stage": "lr_fine", "target": "mean", "lr": placeholder,
                                                           "lr_factor": 0.5, "batch_size": 32, "run": 0})
    assert mnist_board.run_names({"mean": 0.01})(fine) == "mean_lr=0.005_batch=32_00001"
    pcam = SimpleNamespace(trial_id="abcde_00002", config={"optimizer": "adam", "lr": 1e-4, "lr_scaling": "sqrt",
                                                           "batch_size": 128, "run": 1, "seed": placeholder})
    assert RunName()(pcam) == "adam_lr=0.0001_scaling=sqrt_batch=128_seed=1_00002"
    # A RunName unpickled from a study stored before it took lead and repeat (its state: lrs alone) names as it did.
    for lrs, trial, name in (({"std": 0.002}, sweep, "std_lr=0.002_batch=64_run=3_00012"),
                             ({"mean": 0.01}, fine, "mean_lr=0.005_batch=32_00001"),
                             ({}, pcam, "adam_lr=0.0001_scaling=sqrt_batch=128_seed=1_00002")):
        old = RunName.__new__(RunName)
        old.__setstate__({"lrs": lrs})
        assert old(trial) == name


def test_the_stored_studies_run_names_unpickle_and_name_their_trials_as_stored():
    """The RunName pickled in each stored v1 stage's tuner.pkl, found in the pickle and rebuilt from its state,
    names every stored trial of the stage as its folder is named (what a --resume relies on for new trials)."""
    import pickletools

    root = Path(__file__).parent / "data"
    for stage in [*(root / "mnist-v1").iterdir(), *(root / "pcam-v1").iterdir()]:
        if not (stage / "tuner.pkl").is_file():
            continue
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops((stage / "tuner.pkl").read_bytes())]
        names = [arg for name, arg in ops if isinstance(arg, str)]
        assert "RunName" in names and names[names.index("RunName") - 1] == "study.tensorboard", stage
        for folder in (p for p in stage.iterdir() if (p / "params.json").is_file()):
            config = json.loads((folder / "params.json").read_text())
            old = RunName.__new__(RunName)
            old.__setstate__({"lrs": {}})
            trial = SimpleNamespace(trial_id="x_" + folder.name.rsplit("_", 1)[-1], config=config)
            assert old(trial) == folder.name


def test_console_table_and_progress():
    console = StudyConsole("batch_sweep", ["target", "batch_size", "run"], [M.TEST_MSE])
    console.setup(total_num_samples=3)
    trials = [Trial(config={"target": "mean", "batch_size": b, "run": 0, "epochs": 4}, last_result={})
              for b in (64, 16, 32)]
    for t in trials:
        console.on_trial_start(0, trials, t)
    console.on_trial_result(0, trials, trials[0], epoch(4, test_mse=2.5))
    console.on_trial_complete(0, trials, trials[0])
    console.on_trial_result(0, trials, trials[1], epoch(1, test_mse=9.0))
    console.on_trial_error(0, trials, trials[2])
    lines = console.table()
    assert lines[0].split() == ["target", "batch_size", "run", "status", M.TEST_MSE]
    rows = [line.split() for line in lines[1:]]
    assert [r[1] for r in rows] == ["16", "32", "64"]  # numeric order, not text order
    assert rows[0][3:] == ["epoch", "1/4", "9"] and rows[1][3:] == ["error", "-"] and rows[2][3:] == ["done", "2.5"]
    progress = console.progress()
    assert "2/3 trials finished, 1 running" in progress and "left" in progress  # 9 of 12 epochs: an estimate


def test_console_counts_repeats_together_when_the_grid_is_long(monkeypatch):
    console = StudyConsole("grid", ["optimizer", "seed"], [M.TEST_AUC])
    trials = [Trial(config={"optimizer": o, "seed": s, "epochs": 1}, last_result={})
              for o in ("sgd", "adam") for s in range(40)]
    for t in trials:
        console.on_trial_start(0, trials, t)
        console.on_trial_complete(0, trials, t)
    lines = console.table()
    assert len(lines) == 3 and lines[1].split() == ["adam", "40", "done", "-"]


def test_tune_console_quiets_ray_only_while_a_stage_runs(monkeypatch):
    import logging

    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    logger = logging.getLogger("ray.tune")
    before = logger.level
    with tune_console(verbose=False):
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0" and logger.level == logging.ERROR
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1" and logger.level == before  # other Tuners in this process
    with tune_console(verbose=True):
        assert logger.level == logging.INFO


def test_an_out_of_memory_trial_is_a_failure_in_tensorboard_and_finished_on_the_console(tmp_path):
    """Out of memory is reported as a last row (no exception, see bridge.trial_entry), so Tune calls the trial
    complete: TensorBoard and the console must still show it failed."""
    writer = StudyTensorBoard("pcam", "grid", key_metrics=pcam_board.KEY_METRICS)
    trial = fake_trial(tmp_path / "oom", {"optimizer": "sgd", "lr": 0.002, "batch_size": 512, "seed": 0})
    writer.log_trial_start(trial)
    writer.log_trial_result(1, trial, epoch(0, val_auc=0.5, val_acc=0.5, best_val_acc=math.nan, best_epoch=-1))
    trial.last_result = {M.EPOCH: 1, M.STATUS: M.STATUS_OOM, M.DIVERGED: False, M.MESSAGE: "CUDA out of memory"}
    writer.log_trial_result(2, trial, trial.last_result)
    writer.log_trial_end(trial)
    assert end_status(read(trial.local_path)) == api_pb2.STATUS_FAILURE

    console = StudyConsole("grid", ["optimizer", "batch_size"], [M.TEST_AUC])
    console.setup(total_num_samples=1)
    console.on_trial_start(0, [trial], trial)
    console.on_trial_result(0, [trial], trial, trial.last_result)
    console.on_trial_complete(0, [trial], trial)
    assert console.table()[1].split()[2:5] == ["out", "of", "memory"]
    assert "1/1 trials finished" in console.progress()
