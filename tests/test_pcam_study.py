"""The PCam study: model and trainable without Ray, CLI errors before Ray, end-to-end smoke and Kaggle runs."""

import io
import json
import math
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from sklearn.metrics import roc_auc_score

from analysis import report as analysis_report
from study import metrics as M
from study.pcam import command as cli
from study.pcam import stored
from study.pcam import data as pcam_data, writer as pcam_writer
from study.errors import StudyError
from study.pcam.model import VGG16_BLOCK_ENDS, VGG16Patches, vgg16_features_state
from study.pcam.trainable import auc, bce, run_pcam
from tests.conftest import SHARED_KAGGLE
from tests.tensorboard_checks import check_study


def pcam_config(**values):
    """A trial of python -m study.pcam, given in its stored layout (the layout's defaults for the rest)."""
    return stored.train_config(values)


@pytest.fixture(scope="module")
def tiny_pcam(tmp_path_factory):
    return pcam_writer.make_synthetic(tmp_path_factory.mktemp("pcam"), n_train=16, n_valid=8, n_test=8, seed=1)


def test_auc_hand_checked():
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5) (0.8>0.1) (0.4<0.5) (0.4>0.1) -> 3/4
    assert auc(np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.5, 0.1])) == 0.75
    assert math.isnan(auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_bce_hand_checked():
    assert bce(np.array([1, 0]), np.array([0.8, 0.4], dtype=np.float32)) == pytest.approx(
        -(math.log(0.8) + math.log(0.6)) / 2, rel=1e-6)
    assert bce(np.array([1]), np.array([0.9])) == pytest.approx(-math.log(0.9))  # one class in the split
    assert 15 < bce(np.array([1]), np.array([0.0], dtype=np.float32)) < 17  # clipped at float32's epsilon
    assert math.isnan(bce(np.array([1, 0]), np.array([math.nan, 0.2])))


@pytest.mark.slow  # trains VGG16 on CPU
def test_frozen_blocks_receive_no_updates(tiny_pcam):
    cfg = pcam_config(data_dir=str(tiny_pcam), weights="none", epochs=1, batch_size=8, lr=0.05, eval_batch_size=8)
    torch.manual_seed(cfg.seed)
    before = VGG16Patches(None, cfg.options["freeze_blocks"]).state_dict()  # the same init run_pcam draws for this seed
    rows, states = [], []
    run_pcam(cfg, None, torch.device("cpu"), lambda m, s, f: (rows.append(m), states.append(s)))
    after = states[-1]["model"]
    frozen = VGG16_BLOCK_ENDS[cfg.options["freeze_blocks"] - 1]
    for name, value in after.items():
        layer = int(name.split(".")[1]) if name.startswith("features.") else None
        if layer is not None and layer < frozen:
            assert torch.equal(value, before[name]), f"{name} changed but its block is frozen"
        elif name.endswith("weight"):
            assert not torch.equal(value, before[name]), f"{name} is trained but did not change"
    assert [r[M.EPOCH] for r in rows] == [0, 1]
    assert 0 <= rows[-1][M.TEST_AUC] <= 1 and rows[-1][M.BEST_EPOCH] == 1  # never the untrained epoch 0
    assert states[-1]["best_model"] is not None


def test_weights_from_a_file_and_bad_files(tmp_path, monkeypatch):
    model = VGG16Patches(None)
    good = tmp_path / "vgg.pt"
    torch.save({f"features.{k}": v for k, v in model.features.state_dict().items()}, good)
    loaded = vgg16_features_state(str(good))
    assert torch.equal(loaded["0.weight"], model.features[0].weight)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(StudyError, match="cannot be read as a state_dict"):
        vgg16_features_state(str(tmp_path / "junk.pt"))
    torch.save({"0.weight": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(StudyError, match="does not fit VGG16"):
        vgg16_features_state(str(tmp_path / "wrong.pt"))
    with pytest.raises(StudyError, match="absent.pt is not a file"):
        vgg16_features_state(str(tmp_path / "absent.pt"))

    from torchvision.models import VGG16_Weights

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(StudyError, match="--weights PATH.*--weights none"):
        vgg16_features_state("imagenet")


@pytest.mark.parametrize("extra, message", [
    (["--batch-sizes", "100"], "batch size 100 is outside 1..48"),
    (["--sgd-lrs", "0"], "positive"),
    (["--adam-lrs", "inf"], "positive"),
    (["--optimizers", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--weights", "/nonexistent/vgg.pt"], "--weights /nonexistent/vgg.pt is not a file"),
])
def test_bad_grids_fail_before_ray(capsys, tmp_path, extra, message):
    code = cli.main(["--smoke", *extra, "--storage-path", str(tmp_path / "s"), "--name", "x"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not ray.is_initialized() and not (tmp_path / "s").exists()


def test_missing_and_corrupt_data(capsys, tmp_path, tiny_pcam):
    code = cli.main(["--data-dir", str(tmp_path / "none"), "--storage-path", str(tmp_path / "s")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_pcam.glob("*.h5"):
        (broken / f.name).write_bytes(f.read_bytes())
    target = broken / pcam_data.file_name("valid", "x")
    target.write_bytes(target.read_bytes()[:5000])
    code = cli.main(["--data-dir", str(broken), "--weights", "none", "--storage-path", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and target.name in err
    assert not ray.is_initialized() and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_smoke_study_end_to_end(tmp_path, tensorboard_api):
    done = subprocess.run([sys.executable, "-m", "study.pcam", "--smoke", "--storage-path", str(tmp_path),
                           "--name", "smoke", "--num-cpus", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = json.loads((tmp_path / "smoke" / "study.json").read_text())
    _, test_y = pcam_data.load_split(*pcam_data.locate(study["data"]["dir"])["test"])
    trials = sorted(p for p in (tmp_path / "smoke" / "grid").iterdir() if p.is_dir())
    grid = cli.SMOKE
    assert len(trials) == len(grid["batch_sizes"]) * (len(grid["sgd_lrs"]) + len(grid["adam_lrs"]))
    configs, stored_auc, noise = set(), {}, {}
    for trial in trials:
        rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
        cfg = json.loads((trial / "params.json").read_text())
        configs.add((cfg["optimizer"], cfg["lr"], cfg["batch_size"]))
        assert [r[M.EPOCH] for r in rows] == list(range(grid["epochs"] + 1))
        assert all(math.isfinite(r[M.VAL_ACC]) and math.isfinite(r[M.VAL_LOSS]) for r in rows)
        last = rows[-1]
        # the best model is chosen among trained epochs only (epoch 0 is the untrained network)
        assert last[M.STATUS] == M.STATUS_DONE and last[M.BEST_VAL_ACC] == max(r[M.VAL_ACC] for r in rows[1:])
        assert last[M.BEST_EPOCH] >= 1
        checkpoint = trial / last["checkpoint_dir_name"]
        state = torch.load(checkpoint / M.STATE_FILE, weights_only=True)
        assert state["best"]["epoch"] == last[M.BEST_EPOCH] and state["best_model"] is not None
        predictions = pd.read_csv(checkpoint / M.PREDICTIONS_FILE)
        assert predictions["label"].tolist() == test_y.tolist()
        assert last[M.TEST_AUC] == pytest.approx(roc_auc_score(predictions["label"], predictions["probability"]))
        assert cfg["weights"] == "none" and cfg["code_version"]
        # Every step of these 3-6 step epochs is a probe. At random init B_simple is ~100-600 patches (measured),
        # so at batch 8-16 the |G|^2 estimate of a few probes can still be <= 0: the report must then say so.
        assert cfg["noise_every"] == 1 and all(r[M.NOISE_PROBES] >= 3 for r in rows[1:])
        noise[last["trial_id"]] = [r[M.NOISE_SCALE] for r in rows[1:]]
        stored_auc[(cfg["optimizer"], cfg["lr"], cfg["batch_size"])] = last[M.TEST_AUC]
    assert ("sgd", 0.01, 8) in configs and ("adam", 1e-4, 16) in configs
    # The report, from what this real study stored: one AUC table per optimizer, values as stored.
    out = tmp_path / "report"
    assert analysis_report.main([str(tmp_path / "smoke"), "--out", str(out)]) == 0
    summary = pd.read_csv(out / "auc_summary.csv")
    assert len(summary) == len(stored_auc)
    assert any(math.isfinite(v) and v > 0 for values in noise.values() for v in values)
    coverage = pd.read_csv(out / "noise_coverage.csv", keep_default_na=False)
    assert len(coverage) == len(noise)
    for row in coverage.itertuples():
        values = noise[row.trial_id]  # trial folders are named by what they run, not by id
        assert row.finite_epochs == sum(map(math.isfinite, values))
        assert (row.why_none == "") == (row.finite_epochs > 0)
        assert row.finite_epochs > 0 or "<= 0" in row.why_none
    for row in summary.itertuples():
        assert row.mean_test_auc == pytest.approx(stored_auc[(row.optimizer, row.lr, row.batch_size)])
    assert (out / "auc_sgd.csv").is_file() and (out / "auc_adam.csv").is_file()
    assert (out / "validation_val_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # TensorBoard: optimizer and learning rate are columns and in the run names (SGD and Adam told apart)
    groups = check_study(tensorboard_api(tmp_path / "smoke"), tmp_path / "smoke", "pcam", expect_diverged=False)
    for name, group in groups.items():
        assert name.split("/")[1].startswith(f"{group['hparams']['optimizer']}_lr={group['hparams']['lr']:g}_")


@pytest.mark.slow
def test_kaggle_layout_study_writes_submissions(tmp_path, monkeypatch, local_ray):
    if not SHARED_KAGGLE.is_dir():
        pytest.skip("../shared/data/pcam-kaggle-sample is absent")
    # main() in this process, on the module's small Ray (the smoke study above runs `python -m study.pcam` itself);
    # RAY_ADDRESS=local as a user's run without --address.
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert cli.main(["--data-dir", str(SHARED_KAGGLE), "--prepared-dir", str(tmp_path / "h5"), "--weights", "none",
                     "--epochs", "1", "--batch-sizes", "4", "--optimizers", "sgd", "--sgd-lrs", "0.01",
                     "--storage-path", str(tmp_path), "--name", "kaggle", "--num-cpus", "2"]) == 0
    (trial,) = [p for p in (tmp_path / "kaggle" / "grid").iterdir() if p.is_dir()]
    last = json.loads((trial / "result.json").read_text().splitlines()[-1])
    submission = pd.read_csv(trial / last["checkpoint_dir_name"] / M.SUBMISSION_FILE, dtype={"id": str})
    test_ids = sorted(p.stem for p in (SHARED_KAGGLE / "test").glob("*.tif"))
    assert sorted(submission["id"]) == test_ids and list(submission.columns) == ["id", "label"]
    assert submission["label"].between(0, 1).all()
    assert M.TEST_AUC not in last  # the Kaggle test split has no labels


def test_a_node_without_the_files_fetches_them_once(tmp_path, monkeypatch, tiny_pcam):
    """--download on a cluster: concurrent trials on a node that lacks the data download it once, under a lock."""
    import shutil
    import threading

    from study.pcam.trainable import locate_or_fetch

    calls = []

    def fake_download(root):  # stands in for torchvision's PCAM download (no network here)
        calls.append(root)
        shutil.copytree(tiny_pcam, root / "pcam")
        return root / "pcam"

    monkeypatch.setattr(pcam_data, "download", fake_download)
    cfg = pcam_config(data_dir=str(tmp_path / "node-local"), download=True)
    found = []
    threads = [threading.Thread(target=lambda: found.append(locate_or_fetch(cfg))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(found) == 4 and all(f == found[0] for f in found)
    with pytest.raises(StudyError, match="does not exist"):
        locate_or_fetch(pcam_config(data_dir=str(tmp_path / "elsewhere"), download=False))


def test_download_uses_files_already_there(tmp_path, monkeypatch, tiny_pcam):
    def no_network(root):
        raise AssertionError("--download fetched PCam although its files were there")

    monkeypatch.setattr(pcam_data, "download", no_network)
    args = cli.parse_args(["--data-dir", str(tiny_pcam), "--download"])
    folder, sizes = cli.prepare_data(args)
    assert Path(folder) == Path(tiny_pcam).resolve() and sizes["train"] > 0


@pytest.mark.slow  # trains VGG16 on CPU, three times
def test_resumed_from_a_checkpoint_ends_exactly_like_an_uninterrupted_run(tiny_pcam):
    cfg = pcam_config(data_dir=str(tiny_pcam), weights="none", epochs=2, batch_size=8, lr=0.01, eval_batch_size=8)
    cpu = torch.device("cpu")
    full = []
    run_pcam(cfg, None, cpu, lambda m, s, f: full.append(m))

    class Killed(Exception):
        pass

    saved = io.BytesIO()

    def killed_after_epoch_1(metrics, state, files):
        if metrics[M.EPOCH] == 1:
            torch.save(state, saved)  # what the trial's checkpoint holds
            raise Killed

    with pytest.raises(Killed):
        run_pcam(cfg, None, cpu, killed_after_epoch_1)
    saved.seek(0)
    resumed = []
    run_pcam(cfg, None, cpu, lambda m, s, f: resumed.append(m), start=torch.load(saved, weights_only=True))
    assert [m[M.EPOCH] for m in resumed] == [2]
    for key in (M.TRAIN_LOSS, M.VAL_LOSS, M.VAL_ACC, M.VAL_AUC, M.BEST_EPOCH, M.BEST_VAL_ACC, M.TEST_AUC,
                M.TEST_ACC, M.NOISE_SCALE, M.LR):
        a, b = full[-1][key], resumed[-1][key]
        assert a == b or (math.isnan(a) and math.isnan(b)), (key, a, b)
