import numpy as np
import pytest

from study.engine.config import MnistConfig, PcamConfig
from study.errors import StudyError


def test_round_trip_and_tune_types():
    cfg = MnistConfig(target="var", lr=0.01, batch_size=64)
    assert MnistConfig.from_dict(cfg.to_dict()) == cfg
    # Tune/JSON hand back ints for whole floats and numpy ints for grid values.
    assert MnistConfig.from_dict({"lr": 1, "batch_size": np.int64(16)}).batch_size == 16


@pytest.mark.parametrize("values, message", [
    ({"learning_rate": 0.1}, "unknown MnistConfig keys: learning_rate"),
    ({"batch_size": "32"}, "batch_size must be int"),
    ({"batch_size": 2.0}, "batch_size must be int"),
    ({"noise_scale": 1}, "noise_scale must be bool"),
    ({"target": "mode"}, "unknown target"),
    ({"optimizer": "rmsprop"}, "unknown optimizer"),
    ({"lr": 0.0}, "positive"),
    ({"lr": float("nan")}, "positive"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"lr_scaling": "cubic"}, "unknown lr_scaling"),
])
def test_mnist_config_refuses_bad_values(values, message):
    with pytest.raises(StudyError, match=message):
        MnistConfig.from_dict(values)


def test_config_is_frozen():
    with pytest.raises(Exception):
        MnistConfig().lr = 1.0


def test_pcam_config_checks():
    assert PcamConfig.from_dict({"data_dir": "/d", "optimizer": "adam", "lr": 1e-4}).momentum == 0.9
    with pytest.raises(StudyError, match="data_dir"):
        PcamConfig()
    with pytest.raises(StudyError, match="zoom"):
        PcamConfig(data_dir="/d", zoom=1.5)
    with pytest.raises(StudyError, match="unknown PcamConfig keys: colour"):
        PcamConfig.from_dict({"data_dir": "/d", "colour": True})


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

    assert mnist.trial_base(mnist.parse_args(["--noise-scale", "off"]), "")["noise_scale"] is False
    assert mnist.trial_base(mnist.parse_args([]), "")["noise_scale"] is True


def test_noise_every_reaches_every_trial_and_must_be_positive():
    from study.mnist import command as mnist
    from study.pcam import command as pcam
    from study.engine.config import NOISE_EVERY

    assert mnist.trial_base(mnist.parse_args(["--noise-every", "8"]), "")["noise_every"] == 8
    assert mnist.trial_base(mnist.parse_args([]), "")["noise_every"] == MnistConfig().noise_every
    assert pcam.parse_args(["--smoke"]).noise_every == 1
    assert pcam.parse_args([]).noise_every == PcamConfig(data_dir="x").noise_every == NOISE_EVERY
    with pytest.raises(StudyError, match="noise_every must be >= 1, got 0"):
        MnistConfig(noise_every=0)
