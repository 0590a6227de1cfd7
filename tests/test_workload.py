"""Workloads without Ray: resolving one, the shared training config, optimizers and lr schedules, the CIFAR-10
reader and augmentation, and the generic trial on fake data (the loss falls)."""

import math
import pickle

import numpy as np
import pytest
import torch

from study import metrics as M
from study.engine.config import TrainConfig
from study.data import cifar
from study.errors import StudyError
from study.engine.lr_scaling import lr_at, schedule_factor
from study.engine.run_workload import run_workload
from study.engine.train import make_optimizer
from study.workload import WORKLOADS, Goal, Metric, Option, Workload, describe, resolve
from study.workloads import cifar10_resnet8, mnist_cnn

CPU = torch.device("cpu")
EXAMPLE = "examples/digits_workload.py"
TABULAR = "examples/tabular_workload.py"


def tiny_workload(**changes) -> Workload:
    """A linear classifier of 2-D points: enough to watch a loss fall in a few steps."""
    def load(options):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(600, 2)).astype(np.float32)
        y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
        return {"train": (x[:400], y[:400]), "val": (x[400:500], y[400:500]), "test": (x[500:], y[500:])}

    fields = dict(name="tiny", summary="points", load=load, model=lambda o: torch.nn.Linear(2, 2),
                  loss=torch.nn.functional.cross_entropy,
                  evaluate=lambda out, y: {"error": (out.argmax(1) != y).float().mean().item()},
                  metrics=(Metric("error", False),), primary="val_error", goals=(Goal("val_error", 0.1),),
                  options=(Option("width", int, 4),))
    return Workload(**{**fields, **changes})


def test_resolve_shipped_file_and_module():
    assert set(WORKLOADS) >= {"mnist-cnn", "cifar10-resnet8"}
    assert resolve("mnist-cnn") is mnist_cnn.workload
    assert resolve("study.workloads.cifar10_resnet8:workload") is cifar10_resnet8.workload
    assert resolve(EXAMPLE).name == "digits-cnn"


@pytest.mark.parametrize("spec, message", [
    ("no-such", "unknown workload 'no-such'"), ("missing/file.py", "does not exist"),
    ("no_such_module_x:workload", "cannot import module"), ("study.workload:nothing", "has no 'nothing'"),
    ("study.workload:Metric", "not a study.workload.Workload"), (":x", "not module:name"), ("", "no workload"),
])
def test_resolve_refuses(spec, message):
    with pytest.raises(StudyError, match=message):
        resolve(spec)


def test_resolve_refuses_broken_files(tmp_path):
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(StudyError, match="defines no `workload`"):
        resolve(str(tmp_path / "empty.py"))
    with pytest.raises(StudyError, match="importing workload file .* failed: ModuleNotFoundError"):
        resolve(str(tmp_path / "broken.py"))


def test_declared_metrics_are_checked(tmp_path):
    from study.workload import check

    with pytest.raises(StudyError, match="'val_acc' is no declared metric"):
        check(tiny_workload(primary="val_acc"), "tiny")
    with pytest.raises(StudyError, match="'error' is no declared metric"):
        check(tiny_workload(goals=(Goal("error", 0.1),)), "tiny")
    with pytest.raises(StudyError, match="option width needs"):
        check(tiny_workload(options=(Option("width", list, []),)), "tiny")
    w = tiny_workload()
    assert w.option_values({"width": 8}) == {"width": 8}
    with pytest.raises(StudyError, match="no option depth"):
        w.option_values({"depth": 2})
    with pytest.raises(StudyError, match="must be int"):
        w.option_values({"width": "8"})
    stored = describe(w, {"train": 0, "val": 0})
    assert stored["metrics"] == [{"name": "val_error", "higher_is_better": False}]
    assert stored["goals"] == [{"metric": "val_error", "value": 0.1, "higher_is_better": False}]


def test_a_goal_takes_its_metric_s_direction_and_says_whether_a_value_reaches_it():
    from study.workload import check

    lower = tiny_workload().goals[0]  # written Goal("val_error", 0.1): error is lower-is-better
    assert lower == Goal("val_error", 0.1, higher_is_better=False) and str(lower) == "val_error <= 0.1"
    assert lower.reached(0.1) and lower.reached(0.05) and not lower.reached(0.2) and not lower.reached(math.nan)
    higher = tiny_workload(metrics=(Metric("error", False), Metric("acc", True)), goals=(Goal("val_acc", 0.9),))
    (goal,) = higher.goals
    assert goal.higher_is_better and goal.reached(0.95) and not goal.reached(0.5) and not goal.reached(math.nan)
    assert higher.goal("val_error", 0.2) == Goal("val_error", 0.2, higher_is_better=False)
    assert Goal.from_dict(goal.to_dict()) == goal and goal.to_dict() == {"metric": "val_acc", "value": 0.9,
                                                                         "higher_is_better": True}
    assert resolve("mnist-cnn").goals and all(g.higher_is_better is False for g in resolve("mnist-cnn").goals)
    with pytest.raises(ValueError, match="no direction"):
        Goal("val_error", 0.1).reached(0.0)  # not held by a Workload: nothing said which way is better
    with pytest.raises(StudyError, match="says higher_is_better=True, its metric error False"):
        check(tiny_workload(goals=(Goal("val_error", 0.1, higher_is_better=True),)), "tiny")
    with pytest.raises(StudyError, match="value must be a finite number"):
        check(tiny_workload(goals=(Goal("val_error", math.nan),)), "tiny")


def test_train_config_round_trip_and_refusals():
    cfg = TrainConfig.from_dict({"workload": "mnist-cnn", "optimizer": "adamw", "weight_decay": 1, "lr": 1,
                                 "options": {"val_size": 10}})
    assert cfg.weight_decay == 1.0 and TrainConfig.from_dict(cfg.to_dict()) == cfg
    for values, message in [({"optimizer": "rmsprop"}, "unknown optimizer"), ({"schedule": "step"}, "schedule"),
                             ({"batch_size": 0}, "batch_size must be >= 1"), ({"lr": math.nan}, "learning rate"),
                             ({"optimizer": "nesterov", "momentum": 0.0}, "nesterov needs a momentum"),
                             ({"final_lr_factor": 2.0}, "final_lr_factor"), ({"bogus": 1}, "unknown TrainConfig"),
                             ({"epochs": "3"}, "must be int"), ({"weight_decay": -1.0}, "weight_decay")]:
        with pytest.raises(StudyError, match=message):
            TrainConfig.from_dict({"workload": "w", **values})
    with pytest.raises(StudyError, match="workload is empty"):
        TrainConfig()


def test_lr_schedules():
    # 10 steps, 2 of warmup, decay over steps 2..9 from 1.0 to 0.1.
    assert [lr_at(s, 1.0, 2, 10, "constant") for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 1.0]
    linear = [lr_at(s, 1.0, 2, 10, "linear", 0.1) for s in range(10)]
    assert linear[:3] == [0.5, 1.0, 1.0] and linear[9] == pytest.approx(0.1)
    assert linear[5] == pytest.approx(1 - 0.9 * 3 / 7)
    cosine = [lr_at(s, 2.0, 0, 9, "cosine", 0.0) for s in range(9)]
    assert cosine[0] == 2.0 and cosine[4] == pytest.approx(1.0) and cosine[8] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
    assert schedule_factor(3, 0, 1, "linear", 0.5) == 0.5  # a one-step trial ends at the final factor


def test_optimizers():
    params = [torch.nn.Parameter(torch.ones(3))]
    sgd = make_optimizer("nesterov", params, 0.1, 0.9, CPU)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    adamw = make_optimizer("adamw", params, 0.1, 0.0, CPU, weight_decay=0.01)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lamb", params, 0.1, 0.0, CPU)


def run_tiny(cfg_changes, workload=None):
    rows = []
    w = workload or tiny_workload()
    cfg = TrainConfig.from_dict({"workload": "tiny", "batch_size": 50, "epochs": 4, "lr": 0.5, "optimizer": "sgd",
                                 "noise_scale": False, **cfg_changes})
    run_workload(cfg, w, w.load({}), CPU, lambda metrics, state: rows.append(metrics))
    return rows


def test_generic_trial_learns_and_reports_the_spec_names():
    rows = run_tiny({"schedule": "cosine", "final_lr_factor": 0.1, "warmup_epochs": 1.0})
    assert [r[M.EPOCH] for r in rows] == [0, 1, 2, 3, 4]
    assert [r[M.STEP] for r in rows] == [0, 8, 16, 24, 32] and rows[-1][M.EXAMPLES] == 4 * 400
    assert rows[-1][M.TRAIN_LOSS] < rows[1][M.TRAIN_LOSS]
    assert rows[-1]["val_error"] < 0.1 < rows[0]["val_error"] and 0 <= rows[-1]["test_error"] < 0.1
    assert all(math.isnan(r["test_error"]) for r in rows[:-1])  # the test split is judged once, at the end
    assert rows[-1][M.LR] == pytest.approx(0.05)  # the cosine's end: 0.1 x 0.5
    assert rows[-1][M.STATUS] == M.STATUS_DONE


def test_generic_trial_marks_divergence_with_nan_metrics():
    quartic = tiny_workload(loss=lambda out, y: (out ** 4).mean())  # explodes at a large lr
    rows = run_tiny({"lr": 10.0}, quartic)
    assert rows[-1][M.STATUS] == M.STATUS_DIVERGED and math.isnan(rows[-1]["val_error"])


def test_cifar_reader_and_workload_load(tmp_path):
    folder = tmp_path / cifar.FOLDER
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in (*cifar.TRAIN_FILES, cifar.TEST_FILE):
        cifar.write_batch(folder / name, rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 20))
    data = cifar.load(tmp_path)
    assert data["train"][0].shape == (100, 3, 32, 32) and data["test"][1].shape == (20,)
    options = cifar10_resnet8.workload.option_values({"data_dir": str(folder), "val_size": 30})
    splits = cifar10_resnet8.load(options)
    assert [len(splits[s][0]) for s in ("train", "val", "test")] == [70, 30, 20]
    assert not np.array_equal(splits["val"][0], data["train"][0][70:])  # a random sample (tests/test_validation_split)
    tail = cifar10_resnet8.load(dict(options, val_split="tail"))
    assert np.array_equal(tail["val"][0], data["train"][0][70:])


def test_cifar_smoke_set_is_cifars_own_files(tmp_path):
    """make_synthetic writes what torchvision's cifar-10-batches-py holds: five training batches, test_batch and
    batches.meta, each a plain dict with bytes keys, the images a uint8 array, labels and file names lists; the
    classes are learnable (a nearest-mean-colour rule gets the test batch right)."""
    folder = cifar.make_synthetic(tmp_path / cifar.FOLDER, per_batch=30, n_test=40, seed=1)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*cifar.TRAIN_FILES, cifar.TEST_FILE, "batches.meta"])
    for name in (*cifar.TRAIN_FILES, cifar.TEST_FILE):
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        assert set(batch) == {b"batch_label", b"data", b"labels", b"filenames"}
        assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (40 if name == cifar.TEST_FILE else 30,
                                                                             3072)
        assert all(type(v) is int for v in batch[b"labels"]) and all(type(v) is bytes for v in batch[b"filenames"])
    with open(folder / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    assert meta == {b"num_cases_per_batch": 30, b"label_names": [n.encode() for n in cifar.LABEL_NAMES],
                    b"num_vis": 3072}
    data = cifar.load(folder)
    (x, y), (tx, ty) = data["train"], data["test"]
    means = np.stack([x[y == c].reshape(-1, 3, 1024).mean(axis=(0, 2)) for c in range(10)])
    guess = np.argmin(((tx.reshape(-1, 3, 1024).mean(axis=2)[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (guess == ty).mean() > 0.9
    again = cifar.load_synthetic(per_batch=30, n_test=40, seed=1)
    assert np.array_equal(again["train"][0], x) and np.array_equal(again["test"][1], ty)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_every_shipped_workload_loads_its_smoke_data_without_a_data_dir(name):
    """What --smoke sets reads the workload's generated data (none of the user's), enough for its smoke batch
    sizes; each workload's smoke study runs end to end in tests/test_workload_studies.py (mnist-cnn,
    cifar10-resnet8), test_pcam_workload.py and test_mnist_workload.py."""
    from study.commands.run_command import check_splits

    workload = resolve(name)
    options = workload.option_values(workload.smoke.get("options", {}))
    # the data's own generated files, none of the user's; least-squares is generated data whatever the options
    assert options.get("data_dir", "") == "" and options.get("synthetic", name == "least-squares") is True
    splits = check_splits(workload.load(options), workload)
    assert max(workload.smoke["batch_sizes"]) <= len(splits["train"][0])


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p.write_bytes(b"\x80\x04truncated"), "cannot read"),
    (lambda p: p.write_bytes(pickle.dumps([1, 2])), "not a CIFAR-10 batch"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})),
     "expected uint8"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})), "2 images but"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [12]})), "label 12"),
    (lambda p: p.unlink(), "missing in"),
])
def test_cifar_reader_refuses_corrupt_files(tmp_path, corrupt, message):
    for name in (*cifar.TRAIN_FILES, cifar.TEST_FILE):
        cifar.write_batch(tmp_path / name, np.zeros((2, 3, 32, 32), np.uint8), [0, 1])
    corrupt(tmp_path / "data_batch_3")
    with pytest.raises(StudyError, match=message):
        cifar.load(tmp_path)


def test_cifar_reader_refuses_missing_folder(tmp_path):
    with pytest.raises(StudyError, match="does not exist"):
        cifar.load(tmp_path / "nope")
    with pytest.raises(StudyError, match="no CIFAR-10 batch files"):
        cifar.load(tmp_path)


def test_cifar_augment_is_a_shifted_maybe_flipped_crop():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) + 1
    gen = torch.Generator().manual_seed(0)
    out = cifar10_resnet8.augment(x, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for b in range(2):  # each output is one 32x32 window of the padded image, flipped or not
        windows = [padded[b, :, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        assert any(torch.equal(out[b], w) or torch.equal(out[b], w.flip(2)) for w in windows)


def test_shipped_models_shapes():
    assert mnist_cnn.model({})(mnist_cnn.prepare(torch.zeros(3, 28, 28, dtype=torch.uint8))).shape == (3, 10)
    net = cifar10_resnet8.model({"blocks": 1})
    assert net(cifar10_resnet8.prepare(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))).shape == (2, 10)
    convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules())
    assert convs == 7  # ResNet-8: 7 convolutions of 3x3 and the final fully connected layer (+ 2 1x1 shortcuts)


def test_run_study_finds_a_workload_object_again():
    from study.commands.driver import spec_of

    assert spec_of(mnist_cnn.workload) == "study.workloads.mnist_cnn:workload"
    example = resolve(EXAMPLE)
    assert resolve(EXAMPLE) is example and resolve(spec_of(example)) is example
    with pytest.raises(StudyError, match="not defined at the top level"):
        spec_of(tiny_workload())


def test_run_study_refuses_unknown_flags(tmp_path):
    from study import run_study

    with pytest.raises(StudyError, match="unknown flags bogus"):
        run_study("mnist-cnn", bogus=1, storage_path=str(tmp_path))
    for bad in (print, [print], ["MLflowLoggerCallback"]):  # a Tune callback object is wanted, not its name
        with pytest.raises(StudyError, match=r"callbacks must be a list of ray.tune.Callback objects"):
            run_study("mnist-cnn", smoke=True, storage_path=str(tmp_path), callbacks=bad)
    assert not any(tmp_path.iterdir())


def test_resume_names_the_command_of_the_study_kind(tmp_path, capsys):
    import json

    from study.__main__ import main
    from study.mnist.command import main as mnist_main

    for name, saved in (("w", {"study": "mnist-cnn", "kind": "workload", "args": {}}),
                        ("m", {"study": "mnist", "args": {}})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "study.json").write_text(json.dumps(saved))
    assert mnist_main(["--storage-path", str(tmp_path), "--name", "w", "--resume"]) == 2
    assert main(["run", "mnist-cnn", "--storage-path", str(tmp_path), "--name", "m", "--resume"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert "resume it with python -m study run mnist-cnn --resume" in errors[0]
    assert "not a workload study; resume it with python -m study.mnist --resume" in errors[1]


def test_workload_files_stay_short_and_free_of_ray():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {root / EXAMPLE: 60, root / TABULAR: 60, **{p: 150 for p in (root / "study" / "workloads").glob("*.py")},
             root / "study" / "mnist" / "workload.py": 150, root / "study" / "pcam" / "workload.py": 150}
    for path, limit in files.items():
        text = path.read_text()
        assert len(text.splitlines()) <= limit, path
        assert "import ray" not in text and "from ray" not in text, path
    assert "study.workload" not in (root / "study" / "engine" / "train.py").read_text()  # the loop imports no workload


def test_tabular_example_loads_float32_features_and_int64_labels_and_learns_without_prepare():
    example = resolve(TABULAR)
    assert example.prepare is None and example.metric("val_auc").higher_is_better
    options = example.option_values({"width": 16})
    splits = example.load(options)
    for x, y in splits.values():
        assert x.dtype == np.float32 and x.shape[1] == 30 and y.dtype == np.int64
    assert abs(splits["train"][0].mean(0)).max() < 1e-5  # standardised on the training rows
    rows = []
    cfg = TrainConfig.from_dict({"workload": TABULAR, "options": options, "batch_size": 32, "lr": 0.003,
                                 "optimizer": "adam", "epochs": 2, "noise_scale": False})
    run_workload(cfg, example, splits, CPU, lambda metrics, state: rows.append(metrics))
    assert rows[-1]["val_error"] < rows[0]["val_error"] and rows[-1]["val_auc"] > 0.95
    assert math.isfinite(rows[-1]["test_auc"]) and math.isnan(rows[0]["test_auc"])  # the test split: at the end
