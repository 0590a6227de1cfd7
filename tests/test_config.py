"""The one trial config (TrainConfig), the papers' stored layouts mapped to it (study/{mnist,pcam}/stored.py), and
each check in its layer: TrainConfig's invariants, the workloads' options, the papers' flags."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from study.engine.config import TrainConfig
from study.errors import StudyError
from study.mnist import stored as mnist_stored
from study.pcam import stored as pcam_stored

DATA = Path(__file__).resolve().parent / "data"


def test_round_trip_and_tune_types():
    cfg = TrainConfig(workload="w", options={"a": 1}, lr=0.01, batch_size=64)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    # Tune/JSON hand back ints for whole floats and numpy ints for grid values.
    assert TrainConfig.from_dict({"workload": "w", "lr": 1, "batch_size": np.int64(16)}).batch_size == 16


@pytest.mark.parametrize("values, message", [
    ({"learning_rate": 0.1}, "unknown TrainConfig keys: learning_rate"),
    ({"batch_size": "32"}, "batch_size must be int"),
    ({"batch_size": 2.0}, "batch_size must be int"),
    ({"noise_scale": 1}, "noise_scale must be bool"),
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'"),
    ({"lr": 0.0}, "positive"),
    ({"lr": float("nan")}, "positive"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"noise_every": 0}, "noise_every must be >= 1, got 0"),
    ({"lr_scaling": "cubic"}, "unknown lr_scaling"),
    ({"momentum": 1.0}, "momentum must be in"),
    ({"warmup_epochs": 11.0}, "warmup_epochs must be in"),
    ({"workload": ""}, "workload is empty"),
])
def test_train_config_refuses_bad_values(values, message):
    with pytest.raises(StudyError, match=message):
        TrainConfig.from_dict({"workload": "w", **values})


def test_config_is_frozen():
    with pytest.raises(Exception):
        TrainConfig(workload="w").lr = 1.0


def stored_params(study: str) -> list:
    """Every trial config a study stored before the workload redesign: params.json and Tune's snapshots."""
    found = [json.loads(p.read_text()) for p in sorted((DATA / study).glob("*/*/params.json"))]
    for state in sorted((DATA / study).glob("*/experiment_state-*.json")):
        found += [json.loads(entry[0])["config"] for entry in json.loads(state.read_text())["trial_data"]]
    assert len(found) >= 2
    return found


@pytest.mark.parametrize("stored", stored_params("mnist-v1"))
def test_a_stored_mnist_trial_maps_to_the_train_config_it_ran(stored):
    cfg = mnist_stored.train_config(stored)
    assert cfg.workload == "mnist-regression" and cfg.schedule == "constant" and cfg.weight_decay == 0
    assert not cfg.amp  # the paper's trials never autocast
    assert cfg.options == {k: stored[k] for k in ("target", "input_scale", "target_scale", "val_size")}
    for key in ("lr", "batch_size", "epochs", "optimizer", "momentum", "seed", "run", "stage", "eval_batch_size",
                "noise_scale", "noise_every", "lr_scaling", "lr_reference_batch", "warmup_epochs", "tf32"):
        assert getattr(cfg, key) == stored[key], key
    assert mnist_stored.stored_config(cfg, stored["lr_factor"]) == stored  # what a new study stores is the same


@pytest.mark.parametrize("stored", stored_params("pcam-v1"))
def test_a_stored_pcam_trial_maps_to_the_train_config_it_ran(stored):
    cfg = pcam_stored.train_config(stored)
    assert cfg.workload == "pcam" and cfg.stage == "grid" and cfg.schedule == "constant" and cfg.weight_decay == 0
    assert cfg.options["no_flip"] is (not stored["flip"]) and cfg.options["no_rot90"] is (not stored["rot90"])
    for key in ("data_dir", "download", "train_limit", "weights", "freeze_blocks", "zoom", "brightness"):
        assert cfg.options[key] == stored[key], key
    for key in ("lr", "batch_size", "epochs", "optimizer", "momentum", "seed", "run", "amp", "eval_batch_size",
                "noise_scale", "noise_every", "lr_scaling", "lr_reference_batch", "warmup_epochs", "tf32"):
        assert getattr(cfg, key) == stored[key], key
    assert pcam_stored.checkpoint_every(stored) == stored["checkpoint_every"]
    assert pcam_stored.stored_config(cfg, stored["checkpoint_every"]) == stored


def test_a_layout_with_flips_off_maps_to_the_options_that_turn_them_off():
    cfg = pcam_stored.train_config({"data_dir": "/d", "flip": False, "rot90": True})
    assert cfg.options["no_flip"] is True and cfg.options["no_rot90"] is False


@pytest.mark.parametrize("layout, values, message", [
    (mnist_stored, {"learning_rate": 0.1}, "unknown MNIST trial config keys: learning_rate"),
    (mnist_stored, {"batch_size": "32"}, "batch_size must be int"),
    (mnist_stored, {"lr": -1.0}, "positive"),
    (pcam_stored, {"colour": True}, "unknown PCam trial config keys: colour"),
    (pcam_stored, {"momentum": 1.5}, "momentum must be in"),
])
def test_a_stored_layout_refuses_unknown_keys_and_bad_values(layout, values, message):
    with pytest.raises(StudyError, match=message):
        layout.train_config(values)
    with pytest.raises(StudyError, match="checkpoint_every must be an int >= 1, got 0"):
        pcam_stored.checkpoint_every({"checkpoint_every": 0})


def test_the_workloads_refuse_their_own_bad_options():
    from study.mnist.workload import workload as mnist_regression
    from study.pcam import workload as pcam

    with pytest.raises(StudyError, match="option target must be one of mean, median, std, var, got 'mode'"):
        mnist_regression.option_values({"target": "mode"})
    good = pcam.workload.option_values({"weights": "none"})
    pcam.check_options(good)
    for name, value, message in (("zoom", 1.5, "--zoom must be a finite number in [0, 1), got 1.5"),
                                 ("brightness", float("nan"), "--brightness must be a finite number in [0, 1)"),
                                 ("val_fraction", 1.0, "--val-fraction must be a finite number in (0, 1)"),
                                 ("freeze_blocks", 6, "--freeze-blocks must be in 0..5"),
                                 ("train_limit", -1, "--train-limit must be >= 0"),
                                 ("weights", "/nonexistent.pt", "--weights /nonexistent.pt is not a file")):
        with pytest.raises(StudyError, match=re.escape(message)):
            pcam.check_options(dict(good, **{name: value}))


def test_the_commands_store_the_layouts_of_before():
    """A new study's trials store every key of the layout stored before the workload redesign, and nothing else."""
    from study.mnist import command as mnist
    from study.pcam import command as pcam

    old_mnist = json.loads(next((DATA / "mnist-v1").glob("batch_sweep/*/params.json")).read_text())
    assert mnist_stored.stored_config(mnist.trial_base(mnist.parse_args(["--smoke"]), "v")).keys() == old_mnist.keys()
    old_pcam = json.loads(next((DATA / "pcam-v1").glob("grid/*/params.json")).read_text())
    base = pcam.config_of(pcam.parse_args(["--smoke"]), "/d", "v")
    assert pcam_stored.stored_config(base).keys() == old_pcam.keys()
    assert base.options["data_dir"] == "/d" and base.code_version == "v" and base.stage == "grid"


def test_cli_defaults_are_the_papers_grids():
    from study.mnist import command as mnist
    from study.pcam import command as pcam

    m = mnist.parse_args([])
    assert m.targets == ["mean", "median", "std", "var"] and m.lr_grid == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert m.fine_factors == [0.25, 0.5, 0.75, 1.0, 1.5, 1.75, 2.0] and m.lr_search_batch == 32
    assert m.batch_sizes == [16, 32, 64, 128, 256, 512, 1024] and m.runs == 10 and m.epochs == 10
    assert m.optimizer == "adam" and m.select_on == "val" and m.val_size == 10_000
    assert (m.input_scale, m.target_scale, m.gpus_per_trial) == ("raw", "raw", 0.125)
    p = pcam.parse_args([])
    assert p.batch_sizes == [32, 64, 128, 256, 512] and sorted(p.optimizers) == ["adam", "sgd"]
    assert p.sgd_lrs == [0.002, 0.0002] and p.adam_lrs == [0.001, 0.0001] and p.momentum == 0.9
    assert p.epochs == 55 and p.seeds == 1 and p.weights == "imagenet" and p.gpus_per_trial == 0.25
    assert p.freeze_blocks == 2 and p.zoom == 0.1 and p.brightness == 0.1


def test_select_on_test_chooses_by_test_mse():
    from types import SimpleNamespace

    from study import metrics as M
    from study.mnist.command import choose_lr

    def result(lr, val, test):
        return SimpleNamespace(config={"target": "mean", "lr": lr, "epochs": 2}, error=None,
                               metrics={M.EPOCH: 2, M.VAL_MSE: val, M.TEST_MSE: test, M.DIVERGED: False})

    results = [result(1e-3, val=1.0, test=5.0), result(1e-2, val=2.0, test=3.0)]
    assert choose_lr(results, "val")["mean"]["lr"] == 1e-3
    chosen = choose_lr(results, "test")["mean"]
    assert chosen["lr"] == 1e-2 and chosen["selected_on"] == M.TEST_MSE


def test_noise_scale_off_reaches_every_trial():
    from study.mnist import command as mnist

    assert mnist.trial_base(mnist.parse_args(["--noise-scale", "off"]), "").noise_scale is False
    assert mnist.trial_base(mnist.parse_args([]), "").noise_scale is True


def test_noise_every_reaches_every_trial_and_must_be_positive():
    from study.mnist import command as mnist
    from study.pcam import command as pcam
    from study.engine.config import NOISE_EVERY

    assert mnist.trial_base(mnist.parse_args(["--noise-every", "8"]), "").noise_every == 8
    assert mnist.trial_base(mnist.parse_args([]), "").noise_every == NOISE_EVERY
    assert pcam.parse_args(["--smoke"]).noise_every == 1
    assert pcam.parse_args([]).noise_every == NOISE_EVERY
    assert pcam.config_of(pcam.parse_args(["--noise-every", "4"]), "/d", "").noise_every == 4
