"""Bad input to `python -m study.mnist`: one clear message, exit 2, before Ray starts, nothing written."""

import gzip

import pytest
import torch
import ray

from study.mnist import command as cli


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    ray.shutdown()  # a failing case must not leave a Ray behind for the next one


@pytest.fixture
def store(tmp_path):
    return tmp_path / "store"


def run(capsys, store, *argv):
    code = cli.main([*argv, "--storage-path", str(store), "--name", "s"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--smoke", "--batch-sizes", "0"], "batch size 0 is outside 1..640"),
    (["--smoke", "--batch-sizes", "100000"], "batch size 100000 is outside"),
    (["--smoke", "--lr", "0"], "positive"),
    (["--smoke", "--lr-grid", "-0.001"], "positive"),
    (["--smoke", "--targets", "mode"], "option target must be one of mean, median, std, var, got 'mode'"),
    (["--smoke", "--optimizer", "rmsprop"], "unknown optimizer 'rmsprop'"),
    (["--smoke", "--targets"], "empty grid"),
    (["--smoke", "--val-size", "0"], "--val-size must be in 1..511"),
    (["--smoke", "--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
    (["--smoke", "--gpus-per-trial", "1.5"], "--gpus-per-trial must be at most 1"),
    ([], "no data"),
])
def test_bad_grids_fail_before_ray(capsys, store, argv, message):
    if argv == ["--smoke", "--targets"]:
        pytest.raises(SystemExit, cli.main, argv)  # argparse: --targets needs a value
        return
    code, err = run(capsys, store, *argv)
    assert code == 2 and message in err and err.startswith("error: ")
    assert not ray.is_initialized() and not store.exists()


def test_missing_and_bad_data_dir(capsys, store, tmp_path):
    code, err = run(capsys, store, "--data-dir", str(tmp_path / "none"))
    assert code == 2 and "does not exist" in err and "--download" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in cli.mnist_data.FILES.values():
        (bad / f"{name}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    code, err = run(capsys, store, "--data-dir", str(bad))
    assert code == 2 and ("too short" in err or "header" in err)
    assert not ray.is_initialized() and not store.exists()


def test_existing_study_is_never_touched(capsys, store):
    folder = store / "s"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text('{"study": "mnist"}')
    code, err = run(capsys, store, "--smoke")
    assert code == 2 and "already holds a study" in err and "--resume" in err
    assert [p.name for p in folder.iterdir()] == ["study.json"]
    assert (folder / "study.json").read_text() == '{"study": "mnist"}'


def test_resume_needs_a_study(capsys, store):
    code, err = run(capsys, store, "--smoke", "--resume")
    assert code == 2 and "no study at" in err


def test_unwritable_storage(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        code = cli.main(["--smoke", "--storage-path", str(locked), "--name", "s"])
        assert code == 2 and "not writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_storage_on_a_file_is_not_writable(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = cli.main(["--smoke", "--storage-path", str(blocker), "--name", "s"])
    err = capsys.readouterr().err
    assert code == 2 and "not writable" in err and blocker.read_text() == "x"


def test_resources_beyond_the_cluster_fail_and_leave_nothing(capsys, store):
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False)  # a node declaring one GPU
    code, err = run(capsys, store, "--smoke", "--cpus-per-trial", "3")
    assert code == 2 and "--cpus-per-trial 3 is more than any node has" in err
    assert not (store / "s").exists()


def test_cuda_out_of_memory_ends_the_trial_with_its_clear_message(monkeypatch):
    from study.engine import bridge

    @bridge.trial_entry
    def train(config, data):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    reported = []
    monkeypatch.setattr(bridge.tune, "report", lambda metrics, **_: reported.append(metrics))
    assert train({"batch_size": 512}, None) is None  # returned, not raised: Tune would retry an exception
    assert reported[-1]["status"] == "out_of_memory"
    assert "batch size 512: give each trial a larger GPU share" in reported[-1]["message"]
    assert train.__name__ == "train"


def test_every_flag_is_checked_before_ray(capsys, store):
    code, err = run(capsys, store, "--smoke", "--momentum", "-1", "--optimizer", "sgd")
    assert code == 2 and "--momentum must be a finite number in [0, 1), got -1.0" in err
    assert not ray.is_initialized() and not store.exists()


def test_resume_needs_a_name_and_the_right_study(capsys, store):
    with pytest.raises(SystemExit):
        cli.main(["--smoke", "--resume", "--storage-path", str(store)])
    assert "--resume needs --name" in capsys.readouterr().err
    (store / "s").mkdir(parents=True)
    (store / "s" / "study.json").write_text('{"study": "pcam", "args": {}}')
    code, err = run(capsys, store, "--smoke", "--resume")
    assert code == 2 and "holds a pcam study; resume it with python -m study.pcam --resume" in err


def test_an_empty_folder_is_not_a_study(store):
    from study.commands.study_folder import StudyFolder

    (store / "s").mkdir(parents=True)  # e.g. left by a start that died while connecting to Ray
    StudyFolder(str(store), "s").prepare(resume=False)  # accepted: nothing in it to protect
    (store / "s" / "study.json").write_text("{}")
    with pytest.raises(cli.StudyError, match="already holds a study"):
        StudyFolder(str(store), "s").prepare(resume=False)


def test_download_is_skipped_when_the_files_are_there(monkeypatch, mnist_dir):
    monkeypatch.setattr(cli.mnist_data, "download", lambda root: pytest.fail("downloaded although present"))
    args = cli.parse_args(["--data-dir", str(mnist_dir), "--download", "--train-limit", "10", "--test-limit", "5"])
    data, _ = cli.load_data(args)
    assert len(data.train_x) == 10 and len(data.test_x) == 5
