"""Wrong, extreme and hostile input to both study CLIs: every refusal is one line on stderr starting "error:",
exit status 2, before Ray starts, with nothing written (no study folder, no storage root). Also the data errors
that must name the right thing, and data preparation (Kaggle conversion, PCam download, decompression, conversion)
leaving no lock file behind. No training here."""

import gzip
import json
import threading
import time
from pathlib import Path

import h5py

import pytest
import ray

from study.commands import cli_checks

from study.mnist import command as mnist_cli

from study.pcam import command as pcam_cli

from study.pcam import trainable as pcam_trainable
from study.pcam import stored
from study.pcam import kaggle
from study.pcam import data as pcam_data, writer as pcam_writer
from study.data.locks import step_lock
from study.errors import StudyError
from tests.test_kaggle import make_folder


def pcam_config(**values):
    """A trial of python -m study.pcam, given in its stored layout (the layout's defaults for the rest)."""
    return stored.train_config(values)


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    ray.shutdown()  # a case that wrongly got as far as Ray must not leave it for the next one


def refused(capsys, tmp_path, cli, argv, *, name=True) -> str:
    """Run the CLI; assert it refused in one line with exit 2, before Ray, leaving the storage root absent."""
    store = tmp_path / "store"
    code = cli.main([*argv, "--storage-path", str(store), *(["--name", "s"] if name else [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not ray.is_initialized() and not store.exists()
    return err


MNIST_CASES = [
    (["--runs", "1000000000"], "the grid has 4,000,000,012 trials"),  # counted, never built
    (["--runs", "3", "--max-trials", "5"], "more than the limit of 5"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number in [0, 2], got nan"),
    (["--warmup-epochs", "3"], "--warmup-epochs must be a finite number in [0, 2], got 3"),
    (["--momentum", "nan"], "--momentum must be a finite number"),
    (["--momentum", "1"], "--momentum must be a finite number in [0, 1)"),
    (["--gpus-per-trial", "nan"], "--gpus-per-trial must be a finite number, got nan"),
    (["--gpus-per-trial", "inf"], "--gpus-per-trial must be a finite number, got inf"),
    (["--gpus-per-trial", "2"], "--gpus-per-trial must be at most 1 (a trial trains on one GPU"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial must be at most 1"),
    (["--cpus-per-trial", "nan"], "--cpus-per-trial must be a finite number, got nan"),
    (["--lr", "nan"], "positive"),
    (["--fine-factors", "inf"], "positive"),
    (["--batch-sizes", "64", "64"], "--batch-sizes lists 64 more than once"),
    (["--targets", "mean", "mean"], "--targets lists mean more than once"),
    (["--lr-grid", "0.01", "0.01"], "--lr-grid lists 0.01 more than once"),
    (["--fine-factors", "1", "1.0"], "--fine-factors lists 1.0 more than once"),
    (["--lr-scaling", "sqrt", "sqrt"], "--lr-scaling lists sqrt more than once"),
    (["--train-limit", "-1"], "--train-limit must be >= 0"),
    (["--test-limit", "-5"], "--test-limit must be >= 0"),
    (["--val-size", "-1"], "--val-size must be >= 0"),
    (["--lr-search-batch", "0"], "--lr-search-batch must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--noise-every", "0"], "--noise-every must be >= 1"),
    (["--lr-reference-batch", "0"], "--lr-reference-batch must be >= 1"),
    (["--num-cpus", "0"], "--num-cpus must be >= 1"),
    (["--max-trials", "0"], "--max-trials must be >= 1"),
    (["--max-failures", "-1"], "--max-failures must be >= 0"),
    (["--address", "not-an-address"], "--address 'not-an-address' is not auto or HOST:PORT"),
    (["--address", "10.0.0.1:port"], "is not auto or HOST:PORT"),
]


@pytest.mark.parametrize("argv, message", MNIST_CASES)
def test_mnist_refuses_bad_flags(capsys, tmp_path, argv, message):
    assert message in refused(capsys, tmp_path, mnist_cli, ["--smoke", *argv])


def test_max_trials_raises_the_limit():
    args = mnist_cli.parse_args(["--smoke", "--runs", "3", "--max-trials", "5"])
    with pytest.raises(StudyError, match="12 batch sweep"):  # 2 targets x 2 batch sizes x 3 runs + 12 lr search
        mnist_cli.check_flags(args)
    mnist_cli.check_flags(mnist_cli.parse_args(["--smoke", "--runs", "3", "--max-trials", "24"]))


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "a/b", "..", ".", " s", "x" * 256])
def test_name_is_one_folder(capsys, tmp_path, name):
    err = refused(capsys, tmp_path, mnist_cli, ["--smoke", "--name", name], name=False)
    assert "is not one folder name" in err
    err = refused(capsys, tmp_path, mnist_cli, ["--smoke", "--resume", "--name", name], name=False)
    assert "is not one folder name" in err


@pytest.mark.parametrize("storage, message", [("s3://", "names no bucket"), ("s3:///prefix", "names no bucket"),
                                              ("gs://", "names no bucket"), ("", "--storage-path is empty")])
def test_a_storage_path_that_names_nothing(capsys, storage, message):
    code = mnist_cli.main(["--smoke", "--storage-path", storage, "--name", "s"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_an_unreachable_address_fails_fast_and_leaves_nothing(capsys, tmp_path):
    started = time.monotonic()
    err = refused(capsys, tmp_path, mnist_cli, ["--smoke", "--address", "127.0.0.1:1"])
    assert "no Ray cluster answers at 127.0.0.1:1" in err
    assert time.monotonic() - started < 60  # ray.init alone retried this address for more than 7 minutes


def test_an_unreachable_address_times_out():
    # 192.0.2.0/24 is TEST-NET-1, never routed: where packets are dropped only the timeout ends the wait
    started = time.monotonic()
    with pytest.raises(StudyError, match="no Ray cluster answers at 192.0.2.1:6379"):
        cli_checks.reachable("192.0.2.1:6379", timeout=0.5)
    assert time.monotonic() - started < 5


def test_resume_without_a_study_says_so_before_asking_for_data(capsys, tmp_path):
    err = refused(capsys, tmp_path, mnist_cli, ["--resume"])
    assert "--resume: no study at" in err and "no data" not in err
    err = refused(capsys, tmp_path, pcam_cli, ["--resume"])
    assert "--resume: no study at" in err


def test_a_corrupt_study_record_is_named_on_resume(capsys, tmp_path):
    folder = tmp_path / "store" / "s"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text('{"study": "mnist", "ar')
    code = mnist_cli.main(["--resume", "--storage-path", str(tmp_path / "store"), "--name", "s"])
    err = capsys.readouterr().err
    assert code == 2 and "study.json is not valid JSON" in err and err.count("\n") == 1
    (folder / "study.json").write_text('["mnist"]')
    code = mnist_cli.main(["--resume", "--storage-path", str(tmp_path / "store"), "--name", "s"])
    err = capsys.readouterr().err
    assert code == 2 and "study.json is not a readable study record" in err and err.count("\n") == 1
    assert [p.name for p in folder.iterdir()] == ["study.json"]


def test_data_paths_that_point_the_wrong_way(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in refused(capsys, tmp_path, mnist_cli, ["--data-dir", str(a_file)])
    assert "is a file" in refused(capsys, tmp_path, pcam_cli, ["--data-dir", str(a_file)])
    data = tmp_path / "mnist"
    data.mkdir()
    for name in mnist_cli.mnist_data.FILES.values():
        (data / f"{name}.gz").write_bytes(gzip.compress(b"x"))
    (data / "t10k-labels-idx1-ubyte.gz").unlink()
    (data / "t10k-labels-idx1-ubyte").mkdir()  # a folder where the file belongs
    err = refused(capsys, tmp_path, mnist_cli, ["--data-dir", str(data)])
    assert "t10k-labels-idx1-ubyte is not a file" in err


PCAM_CASES = [
    (["--noise-every", "0"], "--noise-every must be >= 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["--seeds", "100000000"], "the grid has 400,000,000 trials"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number"),
    (["--momentum", "inf"], "--momentum must be a finite number"),
    (["--val-fraction", "nan"], "--val-fraction must be a finite number in (0, 1)"),
    (["--val-fraction", "1"], "--val-fraction must be a finite number in (0, 1)"),
    (["--zoom", "nan"], "--zoom must be a finite number in [0, 1)"),
    (["--brightness", "-0.1"], "--brightness must be a finite number in [0, 1)"),
    (["--batch-sizes", "8", "8"], "--batch-sizes lists 8 more than once"),
    (["--optimizers", "sgd", "sgd"], "--optimizers lists sgd more than once"),
    (["--adam-lrs", "1e-4", "0.0001"], "--adam-lrs lists 0.0001 more than once"),
    (["--train-limit", "-1"], "--train-limit must be >= 0"),
    (["--split-seed", "-1"], "--split-seed must be >= 0"),
    (["--freeze-blocks", "6"], "--freeze-blocks must be in 0..5"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--weights", "/nonexistent.pt"], "--weights /nonexistent.pt is not a file"),
    (["--gpus-per-trial", "4"], "--gpus-per-trial must be at most 1"),
]


@pytest.mark.parametrize("argv, message", PCAM_CASES)
def test_pcam_refuses_bad_flags(capsys, tmp_path, argv, message):
    assert message in refused(capsys, tmp_path, pcam_cli, ["--smoke", *argv])


def test_pcam_weights_that_are_not_a_state_dict(capsys, tmp_path):
    text = tmp_path / "weights.txt"
    text.write_text("hello\n")
    err = refused(capsys, tmp_path, pcam_cli, ["--smoke", "--weights", str(text)])
    assert "cannot be read as a state_dict" in err and "torch.save" in err


def test_kaggle_conversion_leaves_no_lock_file(tmp_path):
    src = make_folder(tmp_path / "kaggle")
    (src / "train_labels.csv").write_text("id,label\n")  # fails: lists no images
    with pytest.raises(StudyError, match="lists no images"):
        kaggle.prepare_kaggle(src, src / "prepared-h5")
    assert sorted(p.name for p in src.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(StudyError, match="is a file; pass a new or empty folder"):
        kaggle.prepare_kaggle(src, src / "train_labels.csv")
    good = make_folder(tmp_path / "kaggle2")
    kaggle.prepare_kaggle(good, good / "prepared-h5")
    assert sorted(p.name for p in good.iterdir() if p.name.startswith(".")) == []


def _fetch_gzipped_pcam_with_a_chunked_train_x(root) -> Path:
    """A stand-in for PCam's download (no network): the official layout, gzipped, its train patches stored in
    chunks so that loading converts them into the cache (the second locked step)."""
    out = pcam_writer.make_synthetic(Path(root) / "pcam", 8, 4, 4)
    x = out / pcam_data.file_name("train", "x")
    with h5py.File(x, "r") as f:
        patches = f["x"][()]
    with h5py.File(x, "w") as f:
        f.create_dataset("x", data=patches, chunks=(2, 96, 96, 3))
    for h5 in out.glob("*.h5"):
        with h5.open("rb") as src, gzip.open(f"{h5}.gz", "wb") as dst:
            dst.write(src.read())
        h5.unlink()
    return out


def test_pcam_download_decompress_and_convert_leave_no_lock_file(monkeypatch, tmp_path):
    fetched = []
    monkeypatch.setattr(pcam_data, "download", lambda root: fetched.append(root) or
                        _fetch_gzipped_pcam_with_a_chunked_train_x(root))
    cfg = pcam_config(data_dir=str(tmp_path / "data"), download=True)
    files = pcam_trainable.locate_or_fetch(cfg)
    x, y = pcam_data.load_split(*files["train"])
    assert len(fetched) == 1 and x.shape == (8, 96, 96, 3) and len(y) == 8
    assert any(tmp_path.rglob("*.npy")) and any(tmp_path.rglob("*.h5"))  # every locked step ran
    assert sorted(str(p) for p in tmp_path.rglob("*lock*")) == []
    assert pcam_trainable.locate_or_fetch(cfg) == files and len(fetched) == 1  # found again, not fetched again
    assert sorted(str(p) for p in tmp_path.rglob("*lock*")) == []


def test_a_step_lock_removed_by_its_holder_still_excludes_the_waiters(tmp_path):
    """Four threads (each its own lock file descriptor, as separate processes have) run a step 40 times under
    one lock path whose file each holder deletes: the steps never overlap and no lock file is left."""
    lock, inside, overlaps, done = tmp_path / ".step.lock", [], [], []

    def worker():
        for _ in range(10):
            with step_lock(lock):
                inside.append(1)
                if len(inside) > 1:
                    overlaps.append(len(inside))
                time.sleep(0.002)
                inside.pop()
                done.append(1)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(done) == 40 and overlaps == [] and not lock.exists()


def test_a_refusal_after_ray_started_leaves_no_storage_root(capsys, tmp_path):
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # the resource check runs after Ray is up
    store = tmp_path / "new" / "store"
    code = mnist_cli.main(["--smoke", "--cpus-per-trial", "3", "--storage-path", str(store), "--name", "s"])
    err = capsys.readouterr().err
    assert code == 2 and "--cpus-per-trial 3 is more than any node has" in err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()  # a storage root that was there before is left alone
    code = mnist_cli.main(["--smoke", "--cpus-per-trial", "3", "--storage-path", str(tmp_path / "kept"),
                           "--name", "s"])
    assert code == 2 and list(tmp_path.iterdir()) == [tmp_path / "kept"] and not any((tmp_path / "kept").iterdir())


def test_resume_of_a_study_stored_before_a_flag_existed_takes_its_default(monkeypatch, tmp_path):
    """A study.json written by an older version lacks the flags added since (e.g. --noise-every): --resume gives
    them this version's defaults instead of failing with a traceback."""
    args = mnist_cli.parse_args(["--smoke", "--storage-path", str(tmp_path), "--name", "old"])
    stored = {k: v for k, v in vars(args).items() if k not in ("noise_every", "tf32", "max_trials", "verbose")}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "study.json").write_text(json.dumps({"study": "mnist", "args": stored}))
    seen = {}
    monkeypatch.setattr(mnist_cli, "run", lambda a: seen.setdefault("args", a) and 0)
    assert mnist_cli.main(["--resume", "--storage-path", str(tmp_path), "--name", "old", "--num-cpus", "1"]) == 0
    resumed = seen["args"]
    assert resumed.noise_every == args.noise_every and resumed.tf32 is False and resumed.smoke is True
    assert resumed.num_cpus == 1 and resumed.resume is True


def test_resume_honours_a_new_max_trials(capsys, monkeypatch, tmp_path):
    """--max-trials is among the flags a resume may change (docs/faults.md): the stored grid is checked against the value
    given now, and a refusal leaves the study as it was."""
    args = mnist_cli.parse_args(["--smoke", "--storage-path", str(tmp_path), "--name", "s"])
    (tmp_path / "s").mkdir()
    record = json.dumps({"study": "mnist", "args": vars(args)})
    (tmp_path / "s" / "study.json").write_text(record)
    code = mnist_cli.main(["--resume", "--storage-path", str(tmp_path), "--name", "s", "--max-trials", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "more than the limit of 5" in err and err.count("\n") == 1, err
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["study.json"]
    assert (tmp_path / "s" / "study.json").read_text() == record and not ray.is_initialized()
    seen = {}
    monkeypatch.setattr(mnist_cli, "run", lambda a: seen.setdefault("args", a) and 0)
    assert mnist_cli.main(["--resume", "--storage-path", str(tmp_path), "--name", "s", "--max-trials", "50"]) == 0
    assert seen["args"].max_trials == 50
