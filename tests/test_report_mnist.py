"""`python -m analysis.report` on real stored MNIST studies: the smoke study (its lr 1e3 diverges in lr_coarse) run
in a subprocess, and a real Tune experiment with an errored and a diverged trial built in-process. Every checked
number is recomputed here from the raw result.json files, not through analysis.load."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import report
from analysis.load import Study, open_study
from study.errors import StudyError

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def raw_trials(stage_dir: Path) -> list:
    """(config, rows, has_error) of every trial folder, read with plain json."""
    out = []
    for folder in sorted(p for p in stage_dir.iterdir() if (p / "params.json").is_file()):
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]
        out.append((json.loads((folder / "params.json").read_text()), rows, (folder / "error.txt").is_file()))
    return out


def finished(rows) -> bool:
    return bool(rows) and rows[-1]["status"] == "done"


def run_report(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis.report", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def check_report_folder(out: Path) -> None:
    """Every PNG is a real image that report.md embeds; every CSV is linked from it."""
    text = (out / "report.md").read_text()
    pngs = sorted(out.glob("*.png"))
    assert pngs
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as image:
            image.verify()
        assert f"]({png.name})" in text, f"{png.name} not embedded in report.md"
    for csv in out.glob("*.csv"):
        assert f"]({csv.name})" in text, f"{csv.name} not linked from report.md"


@pytest.fixture(scope="module")
def smoke(mnist_smoke) -> Path:
    """The MNIST smoke study, run once per session in a subprocess (conftest; tests/test_mnist_study.py reads it
    too). Read only: a test that changes it copies it first."""
    return mnist_smoke[0]


@pytest.fixture(scope="module")
def smoke_report(smoke, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert report.main([str(smoke), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_smoke_report_is_complete_and_reproducible(smoke, smoke_report, tmp_path):
    check_report_folder(smoke_report)
    names = {p.name for p in smoke_report.iterdir()}
    for name in ("lr_search.png", "convergence.png", "sensitivity.png", "spread.png", "time.png", "timeline.png",
                 "target_distributions.png", "spread.csv", "convergence.csv", "failures.csv", "timing.csv"):
        assert name in names
    assert "PARTIAL" not in (smoke_report / "report.md").read_text()
    # Same results, another run (and through a file:// URI): the same bytes, figures included.
    again = tmp_path / "again"
    assert run_report("file://" + str(smoke), "--out", again).returncode == 0
    for path in sorted(smoke_report.iterdir()):
        if path.name != "report.md":
            assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    first = (smoke_report / "report.md").read_text().replace(str(smoke), "<study>")
    assert (again / "report.md").read_text().replace("file://" + str(smoke), "<study>") == first
    assert report.main([str(smoke), "--out", str(tmp_path / "third")]) == 0
    assert (tmp_path / "third" / "report.md").read_bytes() == (smoke_report / "report.md").read_bytes()


@pytest.mark.slow
def test_sweep_tables_match_raw_results(smoke, smoke_report):
    final = {}
    for config, rows, _ in raw_trials(smoke / "batch_sweep"):
        if finished(rows):
            final.setdefault((config["target"], config["batch_size"]), []).append(rows[-1]["test_mse"])
    spread = pd.read_csv(smoke_report / "spread.csv")
    assert len(spread) == len(final) == 4
    for row in spread.itertuples():
        values = np.array(final[(row.target, row.batch_size)])
        assert row.finished == len(values) == 2
        assert row.min == pytest.approx(values.min()) and row.max == pytest.approx(values.max())
        assert row.mean == pytest.approx(values.mean())
        assert row.cv == pytest.approx(values.std(ddof=1) / values.mean())
    curve = pd.read_csv(smoke_report / "convergence.csv")
    assert sorted(curve["epoch"].unique()) == [0, 1, 2]  # epoch 0: before training
    epoch0 = [rows[0]["test_mse"] for config, rows, _ in raw_trials(smoke / "batch_sweep")
              if (config["target"], config["batch_size"]) == ("mean", 16)]
    got = curve[(curve.target == "mean") & (curve.batch_size == 16) & (curve.epoch == 0)]["mean_test_mse"]
    assert got.item() == pytest.approx(np.mean(epoch0))


@pytest.mark.slow
def test_lr_search_shows_diverged_trials_and_chosen_rate(smoke, smoke_report):
    chosen = json.loads((smoke / "chosen_lr.json").read_text())
    table = pd.read_csv(smoke_report / "lr_search.csv")
    raw = raw_trials(smoke / "lr_coarse") + raw_trials(smoke / "lr_fine")
    assert len(table) == len(raw)
    diverged = table[table["lr"] == 1000.0]
    assert len(diverged) == 2 and set(diverged["outcome"]) == {"diverged"} and diverged["val_mse"].isna().all()
    for row in table.itertuples():
        assert row.chosen == math.isclose(row.lr, chosen[row.target]["lr"])
    failures = pd.read_csv(smoke_report / "failures.csv")
    assert sorted(failures["lr"]) == [1000.0, 1000.0] and set(failures["outcome"]) == {"diverged"}
    assert failures["reason"].str.contains("NaN").all()
    stats = json.loads((smoke / "target_stats.json").read_text())
    boxes = pd.read_csv(smoke_report / "target_stats.csv").set_index("target")
    assert boxes.loc["std", "med"] == pytest.approx(stats["std"]["med"])


@pytest.mark.slow
def test_timing_matches_tune_times(smoke, smoke_report):
    timing = pd.read_csv(smoke_report / "timing.csv")
    raw = raw_trials(smoke / "lr_coarse") + raw_trials(smoke / "lr_fine") + raw_trials(smoke / "batch_sweep")
    assert len(timing) == len(raw)
    totals = sorted(rows[-1]["time_total_s"] for _, rows, _ in raw)
    assert sorted(timing["wall_seconds"]) == pytest.approx(totals)
    assert (timing["gpu_seconds"] == timing["gpu_share"] * timing["wall_seconds"]).all()
    cost = pd.read_csv(smoke_report / "cost.csv").set_index("stage")
    assert cost.loc["study total", "trial_seconds"] == pytest.approx(sum(totals))
    assert cost.loc["study total", "trials"] == len(raw)
    probes = sorted(sum(r["probe_seconds"] for r in rows) for _, rows, _ in raw)
    assert sorted(timing["probe_seconds"]) == pytest.approx(probes) and max(probes) > 0  # the sweep probes


@pytest.mark.slow
def test_time_to_reach_matches_raw_results(smoke, smoke_report):
    raw = raw_trials(smoke / "batch_sweep")
    best = {}
    for config, rows, _ in raw:
        if finished(rows):
            best[config["target"]] = min(best.get(config["target"], math.inf), rows[-1]["test_mse"])
    reached = {}  # (target, batch) -> [(epoch, train seconds) of the first epoch at most 1.1 x the target's best]
    for config, rows, _ in raw:
        hit = [r for r in rows if r["test_mse"] <= 1.1 * best[config["target"]]]
        if hit:
            reached.setdefault((config["target"], config["batch_size"]), []).append(
                (hit[0]["epoch"], hit[0]["train_seconds"]))
    time = pd.read_csv(smoke_report / "time.csv")
    assert len(time) == 4
    for row in time.itertuples():
        got = reached.get((row.target, row.batch_size), [])
        assert row.threshold_mse == pytest.approx(1.1 * best[row.target])
        assert row.runs_reached == len(got)
        if got:
            assert row.median_epoch_reached == pytest.approx(np.median([e for e, _ in got]))
            assert row.median_seconds_to_reach == pytest.approx(np.median([t for _, t in got]))


@pytest.mark.slow
def test_stage_folder_and_default_output(smoke, tmp_path):
    copy = tmp_path / "study"
    shutil.copytree(smoke, copy, ignore=shutil.ignore_patterns("checkpoint_*"))
    assert report.main([str(copy / "batch_sweep")]) == 0  # study.json read from the parent
    text = (copy / "batch_sweep" / "report" / "report.md").read_text()
    assert "stage batch_sweep only" in text and "Stage 1" in text and "PARTIAL" not in text
    assert report.main([str(copy)]) == 0
    check_report_folder(copy / "report")


@pytest.fixture(scope="module")
def own_ray():
    """A 2-CPU Ray started for this module (address="local": never another process's instance)."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def errored(own_ray, tmp_path_factory) -> Path:
    """An MNIST-shaped study (--lr given, so only batch_sweep) with one errored and one diverged trial.
    The trainable is defined in here so that Ray ships it by value (workers cannot import a test module)."""
    from ray import tune

    def fake_mnist(config):
        """The MNIST metric keys; batch 64 run 1 raises in epoch 1 (a real Tune error record); lr 10 diverges."""
        for epoch in range(config["epochs"] + 1):
            if (config["batch_size"], config["run"], epoch) == (64, 1, 1):
                raise ValueError("injected failure for the report test")
            diverged = config["lr"] > 1 and epoch >= 1
            mse = math.nan if diverged else 100.0 / (1 + epoch) * config["batch_size"] / 16 + config["run"]
            tune.report({"epoch": epoch, "train_loss": mse, "epoch_seconds": 0.1 * (epoch > 0),
                         "train_seconds": 0.1 * epoch, "images_per_second": 1000.0, "noise_scale": 40.0 + epoch,
                         "diverged": diverged, "lr": config["lr"], "val_mse": math.nan, "test_mse": mse,
                         "status": "diverged" if diverged else ("done" if epoch == config["epochs"] else "running"),
                         "device": "cpu", "gpu_ids": "", "gpu_share": 0.0})
            if diverged:
                return

    root = tmp_path_factory.mktemp("errored") / "study"
    root.mkdir()
    (root / "study.json").write_text(json.dumps({"study": "mnist", "args": {"lr": 0.01, "targets": ["mean"]},
                                                 "code_version": "test", "resources_per_trial": {"cpu": 1}}))
    space = {"target": "mean", "epochs": 2, "stage": "batch_sweep", "batch_size": tune.grid_search([16, 64]),
             "run": tune.grid_search([0, 1]), "lr": tune.grid_search([0.01, 10.0])}
    tune.Tuner(tune.with_resources(fake_mnist, {"cpu": 1}), param_space=space,
               run_config=tune.RunConfig(name="batch_sweep", storage_path=str(root), verbose=0,
                                         failure_config=tune.FailureConfig(max_failures=0))).fit()
    return root


@pytest.mark.slow
def test_errored_and_diverged_trials_are_listed_not_dropped(errored, tmp_path):
    study = open_study(str(errored))
    assert sorted(t.outcome for t in study.trials()).count("error") == 2  # batch 64 run 1, at both rates
    out = tmp_path / "out"
    assert report.main([str(errored), "--out", str(out)]) == 0
    check_report_folder(out)
    text = (out / "report.md").read_text()
    assert "did not store target_stats.json" in text and "--lr 0.01" in text
    assert "stored before probes were timed apart" in text  # this trainable reports no probe_seconds
    failures = pd.read_csv(out / "failures.csv")
    errors = failures[failures["outcome"] == "error"]
    assert len(errors) == 2 and (errors["batch_size"] == 64).all() and (errors["run"] == 1).all()
    assert (errors["reason"] == "ValueError: injected failure for the report test").all()
    assert set(failures[failures["outcome"] == "diverged"]["lr"]) == {10.0}
    sweep = pd.read_csv(out / "sweep_trials.csv")
    assert len(sweep) == 8 and sweep.loc[sweep["outcome"] != "done", "final_test_mse"].isna().all()
    # The errored trial reported epoch 0 before failing: it must not count as a finished run.
    spread = pd.read_csv(out / "spread.csv").set_index("batch_size")
    raw = [(c, rows) for c, rows, _ in raw_trials(errored / "batch_sweep") if finished(rows)]
    assert spread.loc[64, "finished"] == sum(c["batch_size"] == 64 for c, _ in raw) == 1
    assert spread.loc[64, "not_finished"] == 3
    finals = [rows[-1]["test_mse"] for c, rows in raw if c["batch_size"] == 64]
    assert spread.loc[64, "mean"] == pytest.approx(np.mean(finals))
    noise = pd.read_csv(out / "noise_scale.csv").set_index("batch_size")
    for batch, errors in ((16, 0), (64, 2)):  # a trial's B_simple: its last finite trained epoch's (not epoch 0's)
        trained = [[r["noise_scale"] for r in rows if r["epoch"] >= 1 and math.isfinite(r["noise_scale"])]
                   for c, rows, _ in raw_trials(errored / "batch_sweep") if c["batch_size"] == batch]
        last = [values[-1] for values in trained if values]
        assert len(last) == 4 - errors  # the errored trials stored epoch 0 alone
        assert noise.loc[batch, "median"] == pytest.approx(np.median(last)) and noise.loc[batch, "trials"] == len(last)
    assert (out / "noise_over_training.png").is_file()


def test_cli_errors_exit_2_with_a_message(tmp_path):
    missing = run_report(tmp_path / "nothing")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and missing.stdout == ""
    assert report.main([str(tmp_path)]) == 2  # empty
    (tmp_path / "notes.txt").write_text("not a study")
    other = run_report(tmp_path)
    assert other.returncode == 2 and "not a study folder" in other.stderr


def test_remote_study_needs_out(tmp_path):
    import pyarrow.fs as pafs

    remote = pafs.SubTreeFileSystem("/", pafs.LocalFileSystem())  # any filesystem that is not the local one
    study = Study(uri="s3://bucket/study", fs=remote, path="/", kind="mnist", meta={}, stages={}, files={})
    with pytest.raises(StudyError, match="--out"):
        report.output_dir(study, "s3://bucket/study", None)
    assert report.output_dir(study, "s3://bucket/study", str(tmp_path)) == tmp_path


@pytest.mark.slow  # its fixture runs the MNIST smoke study
def test_report_never_deletes_files_it_did_not_write(smoke, smoke_report, tmp_path):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "my_data.csv").write_text("keep")
    (out / "photo.png").write_bytes(b"keep")
    assert report.main([str(smoke), "--out", str(out)]) == 0
    written = set((out / report.MANIFEST).read_text().split())
    (out / "stale.csv").write_text("a table an earlier run wrote")
    (out / report.MANIFEST).write_text("\n".join(sorted(written | {"stale.csv"})) + "\n")
    assert report.main([str(smoke), "--out", str(out)]) == 0
    assert (out / "my_data.csv").read_text() == "keep" and (out / "photo.png").read_bytes() == b"keep"
    assert not (out / "stale.csv").exists() and all((out / name).exists() for name in written)
