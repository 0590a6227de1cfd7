"""A study stored on S3 through the real S3 protocol: moto's S3 API server on 127.0.0.1 stands in for AWS.

`python -m pytest tests/test_s3_storage.py -q` (2-3 min on two cores). The MNIST smoke study runs with
`--storage-path 's3://studies/prefix?endpoint_override=http://127.0.0.1:PORT'`, the form pyarrow and Ray accept
for MinIO and every other S3-compatible store; it is killed in its second stage, `--resume` finishes it there
without re-running the finished first stage, a second start into it is refused and changes nothing, and
`python -m analysis.report` writes the same report from S3 (endpoint in the URI, or in AWS_ENDPOINT_URL) as from
a local copy. Every process started here (the S3 server, the study drivers and their Ray) is SIGKILLed by pid.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster_procs import free_port, new_tag, stop_tagged, tagged_env, wait_for
from study import metrics as M

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
BUCKET, PREFIX, NAME = "studies", "prefix", "mn-s3"
# moto takes any credentials; pyarrow and boto3 still want some, and a region.
AWS = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
# The smoke study with both stages of stage 1; one CPU runs its trials one after another.
STUDY = ["--smoke", "--targets", "mean", "--batch-sizes", "64", "--runs", "1", "--num-cpus", "1"]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free port of 127.0.0.1 with an empty bucket; yields its endpoint URL."""
    import boto3

    tag, port = new_tag(), free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env=tagged_env(tag, **AWS), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in AWS.items()
                                                                if k != "AWS_DEFAULT_REGION"},
                              region_name=AWS["AWS_DEFAULT_REGION"])
        wait_for(lambda: _answers(client), 60, "moto's S3 server")
        client.create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.kill()
        server.wait(30)
        assert stop_tagged(tag) == []


def _answers(client) -> bool:
    try:
        client.list_buckets()
        return True
    except Exception:  # connection refused until the server listens
        return False


def storage(endpoint: str) -> str:
    return f"s3://{BUCKET}/{PREFIX}?endpoint_override={endpoint}"


def study_uri(endpoint: str) -> str:
    return f"s3://{BUCKET}/{PREFIX}/{NAME}?endpoint_override={endpoint}"


def s3fs(endpoint: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(storage(endpoint))[0]


def listing(endpoint: str) -> dict[str, int]:
    """Every file of the study on S3 with its size."""
    infos = s3fs(endpoint).get_file_info(pafs.FileSelector(f"{BUCKET}/{PREFIX}/{NAME}", recursive=True,
                                                                     allow_not_found=True))
    return {i.path: i.size for i in infos if i.type == pafs.FileType.File}


def run(tmp: Path, argv: list[str], *, env: dict | None = None, until=None, timeout: float = 400):
    """Run a command with every process it starts tagged; with `until`, SIGKILL all of them once until() holds.
    Returns (exit status, output); a kill gives -SIGKILL."""
    tag, log = new_tag(), tmp / f"run-{new_tag()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=tagged_env(tag, **AWS, **(env or {})), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if until is not None:
            wait_for(lambda: until() or proc.poll() is not None, timeout, "the point to kill the study at")
            assert proc.poll() is None, log.read_text()[-3000:]
            stop_tagged(tag)
        code = proc.wait(timeout)
    finally:
        proc.kill()
        proc.wait(30)
        assert stop_tagged(tag) == []
    return code, log.read_text(errors="replace")


def study(tmp: Path, endpoint: str, *extra: str, until=None):
    return run(tmp, [sys.executable, "-m", "study.mnist", *STUDY, "--storage-path", storage(endpoint), "--name",
                     NAME, *extra], until=until)


def rows_per_trial(endpoint: str, stage: str) -> dict[str, list[dict]]:
    fs, root = s3fs(endpoint), f"{BUCKET}/{PREFIX}/{NAME}/{stage}"
    out = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.base_name == "result.json":
            with fs.open_input_stream(info.path) as src:
                out[info.path] = [json.loads(line) for line in src.read().decode().splitlines() if line.strip()]
    return out


@pytest.fixture(scope="module")
def stored(s3, tmp_path_factory):
    """The study, killed in its second stage (lr_fine) and resumed; returns the rows of the finished first stage
    (lr_coarse) as they were at the kill."""
    tmp = tmp_path_factory.mktemp("s3")
    # Killed once lr_fine has stored its first experiment state: from then on --resume continues that stage.
    code, out = study(tmp, s3, until=lambda: any("/lr_fine/experiment_state-" in p for p in listing(s3)))
    assert code == -signal.SIGKILL, out[-3000:]
    coarse = rows_per_trial(s3, "lr_coarse")
    code, out = study(tmp, s3, "--resume")
    assert code == 0, out[-3000:]
    assert f"resuming s3://{BUCKET}/{PREFIX}/{NAME}/lr_coarse?endpoint_override={s3}" in out, out[-3000:]
    assert f"python -m analysis.report '{study_uri(s3)}'" in out  # quoted: a shell takes it as printed
    return coarse


def test_resume_on_s3_finishes_the_study_without_rerunning_the_finished_stage(s3, stored):
    files = listing(s3)
    assert f"{BUCKET}/{PREFIX}/{NAME}/study.json" in files
    assert f"{BUCKET}/{PREFIX}/{NAME}/chosen_lr.json" in files
    assert stored and rows_per_trial(s3, "lr_coarse") == stored  # the finished stage was not run again
    for stage, trials in (("lr_coarse", 3), ("lr_fine", 3), ("batch_sweep", 1)):
        rows = rows_per_trial(s3, stage)
        assert len(rows) == trials, (stage, sorted(files))
        for path, trial in rows.items():
            epochs = [r[M.EPOCH] for r in trial]
            if trial[-1][M.STATUS] == M.STATUS_DIVERGED:  # the smoke grid's lr 1e3, in lr_coarse
                continue
            assert trial[-1][M.STATUS] == M.STATUS_DONE, path
            # The stage that was killed may repeat the epoch in flight at the kill, never skip one.
            assert sorted(set(epochs)) == [0, 1, 2] and epochs[-1] == 2, (path, epochs)
            if stage != "lr_fine":
                assert epochs == [0, 1, 2], path
    assert any("/batch_sweep/" in p and "/checkpoint_" in p for p in files), "no checkpoint reached S3"


def test_a_second_start_into_the_s3_study_is_refused_and_changes_nothing(s3, stored, tmp_path):
    before = listing(s3)
    code, out = study(tmp_path, s3)
    assert code == 2, out[-3000:]
    assert "already holds a study" in out and "--resume" in out
    assert listing(s3) == before


def test_the_report_from_s3_equals_the_report_from_a_local_copy(s3, stored, tmp_path):
    local = tmp_path / "copy"
    pafs.copy_files(f"{BUCKET}/{PREFIX}/{NAME}", str(local), source_filesystem=s3fs(s3),
                    destination_filesystem=pafs.LocalFileSystem())
    reports = {}
    for label, uri, env in (("query", study_uri(s3), None),
                            ("env", f"s3://{BUCKET}/{PREFIX}/{NAME}", {"AWS_ENDPOINT_URL": s3}),
                            ("local", str(local), None)):
        out_dir = tmp_path / f"report-{label}"
        code, out = run(tmp_path, [sys.executable, "-m", "analysis.report", uri, "--out", str(out_dir)], env=env)
        assert code == 0, out[-3000:]
        reports[label] = {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in out_dir.rglob("*") if p.is_file()}
    assert any(name.endswith(".png") for name in reports["local"]) and "report.md" in reports["local"]
    for label in ("query", "env"):
        assert reports[label].keys() == reports["local"].keys(), label
        for name, content in reports["local"].items():
            if name == "report.md":  # it names the folder it was made from, and nothing else differs
                content, other = (_without_folder_line(c) for c in (content, reports[label][name]))
                assert other == content, label
            else:
                assert reports[label][name] == content, (label, name)


def _without_folder_line(report: bytes) -> list[bytes]:
    return [line for line in report.splitlines() if not line.startswith(b"Study folder:")]


def test_a_rewrite_on_s3_is_one_upload_and_never_deletes_first(s3, monkeypatch):
    """study.atomic on the S3 protocol: a --resume's trimming of a trial's files and a study file's rewrite replace
    each object by writing the new one, never by deleting the old one first (a stopped upload leaves the old)."""
    from study.atomic import replace_file
    from study.commands.resume import trim_trial_folder
    from tests.test_atomic_writes import V1, Dying

    for key, value in AWS.items():  # signed requests, as the study's own processes make them
        monkeypatch.setenv(key, value)
    fs, root = s3fs(s3), f"{BUCKET}/rewrite"
    source = next((V1 / "batch_sweep").glob("mean_*run=0_00000"))
    for path in source.iterdir():
        with fs.open_output_stream(f"{root}/trial/{path.name}") as out:
            out.write(path.read_bytes())
    store = Dying(fs, type_name=fs.type_name)
    trim_trial_folder(store, f"{root}/trial", 1.0)
    replace_file(store, f"{root}/study.json", b'{"study": "mnist"}')
    replace_file(store, f"{root}/study.json", b'{"study": "mnist", "args": {}}')
    assert "delete_file" not in store.ops and "move" not in store.ops
    with fs.open_input_stream(f"{root}/trial/result.json") as src:
        assert [json.loads(line)[M.EPOCH] for line in src.read().decode().splitlines()] == [0, 1]
    with fs.open_input_stream(f"{root}/study.json") as src:
        assert json.loads(src.read()) == {"study": "mnist", "args": {}}
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)))
    assert names == sorted(["study.json", "trial", *(p.name for p in source.iterdir())])
