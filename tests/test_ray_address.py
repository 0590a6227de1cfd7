"""--address where no Ray answers is refused in bounded time with one line, before anything is written.

`python -m pytest tests/test_ray_address.py -q` (about 30 s). Covered: a port where a server that is not Ray
listens (silent, or answering HTTP), `--address auto` resolved to a dead cluster through a stale record of the last
`ray start` or through RAY_ADDRESS, and a real Ray GCS, which must pass. Every listener here binds 127.0.0.1 on a
port the OS picks and is closed in a finally.
"""

import contextlib
import socket
import threading
import time

import pytest
import ray

from study.commands import cli_checks

from study.mnist import command as mnist_cli
from study.errors import StudyError
from tests.cluster_procs import free_port


@pytest.fixture(autouse=True)
def no_ray_left():
    yield
    ray.shutdown()


@contextlib.contextmanager
def not_ray(reply: bytes = b""):
    """A TCP server on 127.0.0.1 that is not Ray: it accepts, sends `reply` (if any) and keeps the connection open
    until closed, as a stuck or foreign service would. Yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:  # the timeout, or the socket closed
                continue
            accepted.append(conn)
            if reply:
                conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        server.close()


@pytest.fixture(autouse=True)
def short_timeout(monkeypatch):
    monkeypatch.setattr(cli_checks, "ADDRESS_TIMEOUT_S", 2.0)  # the CLI's wait for an answer (10 s by default)


def refused_in_time(capsys, tmp_path, *argv) -> str:
    store = tmp_path / "store"
    started = time.monotonic()
    code = mnist_cli.main(["--smoke", *argv, "--storage-path", str(store), "--name", "s"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no Ray cluster answers at ") and err.count("\n") == 1, err
    assert time.monotonic() - started < 15  # ray.init alone waits for minutes
    assert not ray.is_initialized() and not store.exists()
    return err


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"],
                         ids=["silent", "http"])
def test_a_port_where_something_else_listens_is_refused(capsys, tmp_path, reply):
    with not_ray(reply) as port:
        started = time.monotonic()
        with pytest.raises(StudyError, match=f"no Ray cluster answers at 127.0.0.1:{port} "):
            cli_checks.reachable(f"127.0.0.1:{port}", timeout=2)
        assert time.monotonic() - started < 10
        err = refused_in_time(capsys, tmp_path, "--address", f"127.0.0.1:{port}")
        assert "Ray" in err.split("(", 1)[1]  # says what answered is not Ray


def test_auto_with_a_stale_record_of_the_last_ray_start_is_refused(capsys, monkeypatch, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))  # Ray's own lookup reads RAY_TMPDIR/ray/...
    record = tmp_path / "tmp" / "ray" / "ray_current_cluster"
    record.parent.mkdir(parents=True)
    record.write_text(dead + "\n")
    err = refused_in_time(capsys, tmp_path, "--address", "auto")
    assert f"answers at {dead} (--address auto, from {record}; " in err


def test_auto_takes_ray_address_first(capsys, monkeypatch, tmp_path):
    with not_ray(b"SSH-2.0-OpenSSH_9.6\r\n") as port:
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "none"))
        err = refused_in_time(capsys, tmp_path, "--address", "auto")
        assert f"answers at 127.0.0.1:{port} (--address auto, from RAY_ADDRESS; " in err


def test_auto_with_nothing_recorded_is_left_to_ray(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert cli_checks.auto_address() == (None, "")
    cli_checks.reachable("auto")  # ray.init's own search follows, and fails at once if it finds nothing


@pytest.mark.slow
def test_a_running_ray_passes():
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    cli_checks.reachable(ray.get_runtime_context().gcs_address, timeout=10)
