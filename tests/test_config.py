import numpy as np
import pytest

from study.config import MnistConfig, PcamConfig
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
