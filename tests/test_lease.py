"""One driver per study (study.commands.lease): a live lease refuses a second driver and changes nothing; a stale one (no
heartbeat, or its driver on this machine gone) is taken over; a lost lease stops its driver. On a local folder and
on S3 through moto's S3 API server (in this process, on a free port of 127.0.0.1).

The two-driver tests run real processes: a driver holding the study, a second one refused, the first SIGKILLed
and its lease taken over; the slow one refuses real `python -m study run ... --resume` (and the other commands'
resumes) while the study is held, before Ray starts, leaving every file as it was.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cluster_procs import free_port
from study.commands import lease, lease_file
from study.errors import StudyError
from study.metrics import LEASE_FILE, STUDY_FILE
from study.commands.study_folder import StudyFolder

REPO = Path(__file__).resolve().parents[1]
AWS = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
FAST = dict(every=0.1, missed=5, settle=0.2)  # stale after 0.5 s without a heartbeat
# A driver's start, as open_study takes the lease: holds the folders named, prints "held", renews every 0.1 s.
HOLDER = textwrap.dedent("""
    import sys, time
    from study.commands import lease, lease_file
    from study.commands.study_folder import StudyFolder
    held = [lease.take(StudyFolder(sys.argv[1], name), every=0.1) for name in sys.argv[2:]]
    print("held", flush=True)
    time.sleep(600)
""")


def files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_lease(folder: StudyFolder, **fields) -> None:
    held = dict(host="elsewhere", pid=1, job=None, machine="", token="theirs", started=time.time(),
                heartbeat=time.time())
    held.update(fields)
    folder.fs.create_dir(folder.path, recursive=True)
    # In one piece, as a driver's lease never is seen half written (a PUT on S3, a rename here).
    with folder.fs.open_output_stream(f"{folder.path}/{LEASE_FILE}.new") as out:
        out.write(json.dumps(held).encode())
    folder.fs.move(f"{folder.path}/{LEASE_FILE}.new", f"{folder.path}/{LEASE_FILE}")


def read_lease(folder: StudyFolder) -> dict | None:
    if "://" not in folder.uri:  # as drivers read it: under its lock (a renewal rewrites it in place)
        with lease_file.locked(f"{folder.path}/{LEASE_FILE}") as fd:
            return None if fd is None else json.loads(os.pread(fd, 1 << 16, 0))
    for attempt in range(20):  # S3 through pyarrow: a size, then byte ranges; a renewal in between reads torn
        try:
            with folder.fs.open_input_stream(f"{folder.path}/{LEASE_FILE}") as src:
                return json.loads(src.read())
        except FileNotFoundError:
            return None
        except ValueError:
            if attempt == 19:
                raise
            time.sleep(0.02)


def exited_pid() -> int:
    """The pid of a process of this machine that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def s3_store():
    """An empty bucket on moto's S3 server; yields the storage path URI (endpoint in its query)."""
    import boto3
    from moto.server import ThreadedMotoServer

    old = {k: os.environ.get(k) for k in AWS}
    os.environ.update(AWS)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name=AWS["AWS_DEFAULT_REGION"]).create_bucket(Bucket="leases")
        yield f"s3://leases/studies?endpoint_override={endpoint}"
    finally:
        server.stop()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_store")


def test_a_lease_names_its_driver_and_is_given_back(store, request):
    folder = StudyFolder(store, f"give-back-{request.node.callspec.id}")
    held = lease.take(folder, **FAST)
    stored = read_lease(folder)
    assert (stored["host"], stored["pid"], stored["token"]) == (held.mine["host"], os.getpid(), held.mine["token"])
    deadline = time.monotonic() + 10
    while read_lease(folder)["heartbeat"] == stored["heartbeat"]:  # the heartbeat thread renews it
        assert time.monotonic() < deadline, "no heartbeat in 10 s"
        time.sleep(0.05)
    held.release()
    assert read_lease(folder) is None
    if "://" not in store:  # the folders it created are taken back with it
        assert not Path(store).exists()


@pytest.mark.parametrize("case", ["live elsewhere", "live here", "unreadable and new"])
def test_a_live_lease_refuses_in_one_line_and_changes_nothing(store, case, request):
    folder = StudyFolder(store, f"live-{request.node.callspec.id}")
    if case == "unreadable and new":  # e.g. a driver that created it this instant
        folder.fs.create_dir(folder.path, recursive=True)
        with folder.fs.open_output_stream(f"{folder.path}/{LEASE_FILE}") as out:
            out.write(b"")
    else:
        mine = lease.Lease(folder)
        here = dict(host=mine.mine["host"], machine=mine.mine["machine"], pid=os.getppid())  # alive
        write_lease(folder, **(here if case == "live here" else dict(heartbeat=time.time() - 30)))
    before = folder.fs.get_file_info(f"{folder.path}/{LEASE_FILE}")
    with pytest.raises(StudyError) as refused:
        lease.take(folder, **dict(FAST, missed=600))  # stale after 60 s
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"study folder {folder.uri} is in use by ")
    if case == "live elsewhere":
        assert re.search(r"by elsewhere pid 1 \(heartbeat 3\ds ago\); ", message), message
    elif case == "live here":
        assert re.search(rf"by {re.escape(mine.mine['host'])} pid {os.getppid()} \(heartbeat \ds ago\); ", message)
    else:
        assert "unreadable" in message
    after = folder.fs.get_file_info(f"{folder.path}/{LEASE_FILE}")
    assert (after.size, after.mtime) == (before.size, before.mtime)


@pytest.mark.parametrize("case", ["no heartbeat", "driver exited", "unreadable and old"])
def test_a_stale_lease_is_taken_over(store, case, request, capsys):
    folder = StudyFolder(store, f"stale-{request.node.callspec.id}")
    mine = lease.Lease(folder)
    if case == "no heartbeat":
        write_lease(folder, heartbeat=time.time() - 1)  # 0.5 s is stale here
    elif case == "driver exited":  # killed: it could not give the lease back; its heartbeat is fresh
        write_lease(folder, host=mine.mine["host"], machine=mine.mine["machine"], pid=exited_pid())
    else:
        folder.fs.create_dir(folder.path, recursive=True)
        with folder.fs.open_output_stream(f"{folder.path}/{LEASE_FILE}") as out:
            out.write(b'{"host": "elsew')  # cut short by a crash
        time.sleep(0.6 if "://" in store else 0)
        if "://" not in store:
            os.utime(f"{folder.path}/{LEASE_FILE}", (time.time() - 5, time.time() - 5))
    held = lease.take(folder, **FAST)
    try:
        assert read_lease(folder)["token"] == held.mine["token"]
        assert "took over the lease of" in capsys.readouterr().out
    finally:
        held.release()


def test_of_drivers_starting_at_once_exactly_one_holds_the_study(store, request):
    folder = StudyFolder(store, f"race-{request.node.callspec.id}")
    for round_ in range(3):
        start, won, refused = threading.Barrier(6), [], []

        def driver():
            start.wait()
            try:
                won.append(lease.take(folder, **FAST))
            except StudyError as err:
                refused.append(str(err))

        threads = [threading.Thread(target=driver) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(won) == 1 and len(refused) == 5, (round_, refused)
        assert read_lease(folder)["token"] == won[0].mine["token"]
        won[0].release()


def test_a_study_folder_holding_only_a_lease_is_no_study(tmp_path):
    folder = StudyFolder(str(tmp_path), "s")
    held = lease.take(folder, **FAST)
    try:
        assert folder.prepare(resume=False)  # new: only this driver's lease is in it
        (tmp_path / "s" / STUDY_FILE).write_text("{}")
        with pytest.raises(StudyError, match="already holds a study"):
            folder.prepare(resume=False)
    finally:
        held.release()


def test_the_report_reads_a_held_study_as_it_reads_it_free(tmp_path):
    from analysis.load import open_study

    shutil.copytree(REPO / "tests" / "data" / "mnist-v1", tmp_path / "s")
    free = open_study(str(tmp_path / "s"))
    (tmp_path / "s" / LEASE_FILE).write_text('{"host": "elsew')  # even one cut short: never read
    held = open_study(str(tmp_path / "s"))
    assert (held.kind, held.meta, held.files, sorted(held.stages)) == (free.kind, free.meta, free.files,
                                                                        sorted(free.stages))
    assert [t.trial_id for t in held.trials()] == [t.trial_id for t in free.trials()]


def test_leases_taken_inside_a_driver_are_given_back_when_it_raises(tmp_path):
    folder = StudyFolder(str(tmp_path), "s")

    @lease.released_at_end()
    def driver():
        lease.take(folder, **FAST)
        raise KeyboardInterrupt  # Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        driver()
    assert read_lease(folder) is None
    lease.take(folder, **FAST).release()  # free again


def test_a_driver_that_lost_its_lease_stops(tmp_path):
    """A driver that missed its heartbeats (suspended) and was taken over stops at its next heartbeat."""
    folder = StudyFolder(str(tmp_path), "s")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), "s"], cwd=REPO, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "held\n"
        write_lease(folder, token="the new driver's")
        assert proc.wait(30) == 2
        assert "lost the study's lease to elsewhere pid 1" in proc.stderr.read()
        assert read_lease(folder)["token"] == "the new driver's"  # and it wrote nothing more
    finally:
        proc.kill()
        proc.wait(30)


def holder(store: Path, *names: str) -> tuple[subprocess.Popen, list[str]]:
    """A driver holding the study folders `names`, and what it printed before it held them."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store), *names], cwd=REPO, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE)
    printed = []
    while (line := proc.stdout.readline()) not in ("held\n", ""):
        printed.append(line.strip())
    assert line == "held\n", printed
    return proc, printed


def test_two_drivers_the_second_refused_while_the_first_lives_then_taking_over(tmp_path):
    first, _ = holder(tmp_path, "s")
    try:
        second = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path), "s"], cwd=REPO, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, timeout=60)
        assert second.returncode == 1 and f"is in use by {os.uname().nodename} pid {first.pid}" in second.stderr
        first.kill()  # SIGKILL: no chance to give the lease back
        first.wait(30)
        assert read_lease(StudyFolder(str(tmp_path), "s"))["pid"] == first.pid
        third, printed = holder(tmp_path, "s")
        try:
            assert printed == [f"note: {tmp_path / 's'}: took over the lease of {os.uname().nodename} pid {first.pid} "
                               f"(exited), a driver that is gone"]
            assert read_lease(StudyFolder(str(tmp_path), "s"))["pid"] == third.pid
        finally:
            third.kill()
            third.wait(30)
    finally:
        first.kill()
        first.wait(30)


def stored_studies(store: Path) -> dict[str, list[str]]:
    """One stored study per command, and how to resume it."""
    for name in ("mnist-v1", "pcam-v1"):
        shutil.copytree(REPO / "tests" / "data" / name, store / name)
    for name, kind in (("cnn", "workload"), ("cnn-steps", "steps")):
        (store / name / "sweep").mkdir(parents=True)
        (store / name / STUDY_FILE).write_text(json.dumps(
            {"study": "mnist-cnn", "kind": kind, "args": {"workload": "mnist-cnn", "smoke": True}}))
        # What a second driver would delete: a stage stopped between Tune's tuner.pkl and its first snapshot.
        (store / name / "sweep" / "tuner.pkl").write_bytes(b"tuner")
    common = ["--storage-path", str(store), "--resume", "--num-cpus", "1"]
    return {"cnn": ["-m", "study", "run", "mnist-cnn", "--name", "cnn", *common],
            "cnn-steps": ["-m", "study", "steps", "mnist-cnn", "--name", "cnn-steps", *common],
            "mnist-v1": ["-m", "study.mnist", "--name", "mnist-v1", *common],
            "pcam-v1": ["-m", "study.pcam", "--name", "pcam-v1", *common]}


@pytest.mark.slow
def test_every_command_resumes_no_study_another_driver_holds(tmp_path):
    """Real resumes, each in its own process: refused in one line, exit 2, before Ray, every file as it was."""
    store = tmp_path / "store"
    commands = stored_studies(store)
    first, _ = holder(store, *commands)
    try:
        before = files(store)
        for name, argv in commands.items():
            done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                                  env=dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS="local"))
            assert done.returncode == 2, (name, done.stdout[-2000:], done.stderr[-2000:])
            (line,) = done.stderr.strip().splitlines()
            assert re.fullmatch(
                re.escape(f"error: study folder {store / name} is in use by {os.uname().nodename} pid {first.pid} ")
                + r"\(heartbeat \ds ago\); " + re.escape(
                    "a second driver would overwrite its results: stop that driver first or wait for it to end (a "
                    "lease without a heartbeat for 120 s, or whose driver on this machine exited, is taken over)"),
                line), (name, line)
        assert {k: v for k, v in files(store).items() if not k.endswith(LEASE_FILE)} == \
               {k: v for k, v in before.items() if not k.endswith(LEASE_FILE)}
        assert {read_lease(StudyFolder(str(store), name))["pid"] for name in commands} == {first.pid}
    finally:
        first.kill()
        first.wait(30)
