"""A workload's bugs found before any trial starts (study.commands.preflight): each broken workload file is refused in one
line that names the file, the function and the fix, with exit status 2, before Ray starts and with nothing written;
the shipped workloads and the example pass. No training here."""

import re
import sys
import time

import numpy as np
import pytest
import ray
import torch

from study.__main__ import main
from study.commands.preflight import FEW, pick

# A workload file with one piece to break: {features}, {labels}, {forward} and {evaluate} are filled per case.
TEMPLATE = '''
import numpy as np
import torch
from torch import nn

from study.workload import Metric, Workload


def load(options):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 2)){features}
    y = (x[:, 0] > 0){labels}
    return {{"train": (x[:200], y[:200]), "val": (x[200:], y[200:])}}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x):
        {forward}
        return self.linear(x)


def evaluate(outputs, y):
    error = (outputs.argmax(1) != y).float().mean().item()
    return {{"error": {evaluate}}}


workload = Workload(name="points", summary="2-D points", load=load, model=lambda options: Net(),
                    loss=nn.functional.cross_entropy, evaluate=evaluate, metrics=(Metric("error", False),),
                    primary="val_error", smoke=dict(batch_sizes=[16], lrs=[0.1], epochs=1, seeds=[0]))
'''
GOOD = dict(features=".astype(np.float32)", labels=".astype(np.int64)", forward="pass", evaluate="error")

BROKEN = [
    ("evaluate-str", dict(evaluate='f"{error:.3f}"'),
     "evaluate() returned 'error' as a str ('"),
    ("forward-raises", dict(forward='raise ValueError("no such layer")'),
     "the model's forward raised ValueError: no such layer at {file}:{line} in forward (on a few training examples)"),
    ("float64-labels", dict(labels=".astype(np.float64)"),
     # {torch}: torch's own words, which change between releases ("expected scalar type Long but found Double")
     "load() returned float64 labels, which loss() refuses ({torch}): return int64 labels (y.astype(np.int64))"),
    ("float64-features", dict(features=""),
     "load() returned float64 features, which the model's float32 weights refuse: return float32 "
     "(x.astype(np.float32), or convert it in prepare())"),
    ("evaluate-nan", dict(evaluate='float("nan")'),
     "evaluate() returned nan for 'error' on a few val examples of a freshly initialised model"),
]


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    ray.shutdown()  # a case that wrongly got as far as Ray must not leave it for the next one


def workload_file(tmp_path, name: str, **changes) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(TEMPLATE.format(**{**GOOD, **changes}))
    return str(path)


def refused(capsys, tmp_path, argv: list) -> str:
    store = tmp_path / "store"
    started = time.monotonic()
    code = main([*argv, "--storage-path", str(store), "--name", "s"])
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not ray.is_initialized() and not store.exists()
    assert seconds < 15, f"{seconds:.1f} s"
    return err


@pytest.mark.parametrize("name, changes, message", BROKEN, ids=[case[0] for case in BROKEN])
def test_a_broken_workload_is_one_line_before_any_trial(capsys, tmp_path, monkeypatch, name, changes, message):
    monkeypatch.chdir(tmp_path)  # the file is then named as typed: relative to the working folder
    path = workload_file(tmp_path, name, **changes)
    err = refused(capsys, tmp_path, ["run", f"{name}.py", "--smoke"])
    assert f"workload points ({name}.py): " in err, err
    line = TEMPLATE.splitlines().index("        {forward}") + 1
    expected = re.escape(message.format(file=f"{name}.py", line=line, torch="TORCH")).replace("TORCH", ".+")
    assert re.search(expected, err), err
    assert path


def test_steps_runs_the_same_checks(capsys, tmp_path):
    path = workload_file(tmp_path, "labels", labels=".astype(np.float64)")
    err = refused(capsys, tmp_path, ["steps", path, "--smoke", "--goal", "val_error=0.1"])
    assert "load() returned float64 labels" in err and "labels.py" in err, err


def test_uint8_images_without_a_prepare_name_load_and_prepare(capsys, tmp_path):
    path = workload_file(tmp_path, "pixels", features=".astype(np.uint8)")
    err = refused(capsys, tmp_path, ["run", path, "--smoke"])
    assert "load() returned uint8 features, which the model's float32 weights refuse: return float32 " \
           "(x.astype(np.float32), or convert it in prepare())" in err, err


def test_splits_of_different_shapes_are_refused(capsys, tmp_path):
    path = tmp_path / "shapes.py"
    path.write_text(TEMPLATE.format(**GOOD).replace('"val": (x[200:], y[200:])', '"val": (x[200:, :1], y[200:])'))
    err = refused(capsys, tmp_path, ["run", str(path), "--smoke"])
    assert "load() returned val features of shape (1,) float32 per example, but train's are shape (2,) " \
           "float32" in err, err


@pytest.mark.parametrize("spec", ["examples/digits_workload.py", "mnist-cnn", "mnist-regression"])
def test_shipped_workloads_and_the_example_pass(spec):
    from study.commands import preflight
    from study.commands import run_command
    from study.workload import resolve

    workload = resolve(spec)
    options = workload.option_values(workload.smoke.get("options", {}))
    splits = run_command.check_splits(workload.load(options), workload)
    started = time.monotonic()
    preflight.check(workload, splits, options)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("value", ["0.5", None, True, [0.5]])
def test_evaluate_must_return_a_number_for_every_metric(tmp_path, value):
    from study.commands import preflight
    from study.commands import run_command
    from study.errors import StudyError
    from study.workload import resolve

    path = workload_file(tmp_path, "kinds", evaluate="VALUE")
    workload = resolve(path)
    splits = run_command.check_splits(workload.load({}), workload)
    for good in (0.5, 1, np.float32(0.5), np.array(0.5), torch.tensor([0.5])):
        sys.modules[workload.load.__module__].VALUE = good
        preflight.check(workload, splits, {})
    sys.modules[workload.load.__module__].VALUE = value
    with pytest.raises(StudyError, match=f"evaluate\\(\\) returned 'error' as a {type(value).__name__} "):
        preflight.check(workload, splits, {})


def test_the_few_rows_hold_every_class_when_they_can():
    y = np.zeros(10_000, dtype=np.uint8)
    y[7_000:7_300] = 1  # a rare class away from the start, 3 % of the rows (the candidates are 1.6 % apart)
    rows = pick(y, len(y))
    assert len(rows) == FEW and rows == sorted(rows) and set(y[rows]) == {0, 1}
    assert pick(None, 3) == [0, 1, 2] and len(pick(np.arange(100.0), 100)) == FEW


def test_the_command_refuses_within_seconds(tmp_path):
    """As a user runs it, in a process of its own (imports included)."""
    import subprocess
    import sys
    from pathlib import Path

    path = workload_file(tmp_path, "features", features="")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "study", "run", path, "--smoke", "--storage-path",
                           str(tmp_path / "store")], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "load() returned float64 features" in done.stderr and not (tmp_path / "store").exists()
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_memory_mapped_splits_give_up_a_few_rows(tmp_path, dtype):
    """A memory-mapped workload's splits are read a few rows at a time, as the engine streams them: uint8 patches,
    float32 labels (study.data.batches.PatchBatches)."""
    from study.commands import preflight
    from study.errors import StudyError
    from study.workload import Metric, Workload

    def mapped(name, shape, kind):
        array = np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+", dtype=kind, shape=shape)
        array[:] = np.arange(np.prod(shape)).reshape(shape) % 2
        return np.load(tmp_path / f"{name}.npy", mmap_mode="r")

    splits = {s: (mapped(f"{s}_x", (50, 4, 4, 3), dtype), mapped(f"{s}_y", (50,), np.uint8)) for s in ("train", "val")}
    seen = []

    def evaluate(outputs, y):
        seen.append(y.dtype)
        return {"auc": 0.5}

    workload = Workload(name="patches", summary="", load=lambda o: splits, memory_mapped=True,
                        model=lambda o: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 1)),
                        prepare=lambda x: x.float().flatten(1) / 255,
                        loss=lambda out, y: torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), y),
                        evaluate=evaluate, metrics=(Metric("auc", True),), primary="val_auc")
    if dtype is np.uint8:
        preflight.check(workload, splits, {})
        assert seen == [torch.float32]
    else:
        with pytest.raises(StudyError, match="load\\(\\) returned float32 train features of a memory-mapped "
                                             "workload: return uint8"):
            preflight.check(workload, splits, {})
