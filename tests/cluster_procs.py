"""Processes the cluster tests start (Ray heads and workers, jobs, an S3 API server), found again and stopped by pid.

Every process a test starts gets a marker variable in its environment, and Ray hands its environment down to
everything it spawns (GCS, raylets, dashboard, job drivers, trial workers, the autoscaler's fake nodes), even to
the processes that put themselves in new sessions. `stop_tagged` finds them all by that marker in
/proc/PID/environ and SIGKILLs them by pid: never `ray stop`, never by name, so the Ray instances of other users
of this machine are left alone.
"""

import contextlib
import os
import signal
import socket
import time
import uuid
from pathlib import Path

MARKER = "BATCHSIZE_STUDY_TEST_TAG"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_tag() -> str:
    return uuid.uuid4().hex


def tagged_env(tag: str, **extra: str) -> dict:
    """This process's environment plus the marker (and `extra`), for a process the test starts."""
    return {**os.environ, MARKER: tag, **extra}


def tagged_pids(tag: str) -> list[int]:
    """Live processes whose environment carries the marker `tag` (zombies are dead and skipped)."""
    needle = f"{MARKER}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle not in Path("/proc", entry, "environ").read_bytes().split(b"\0"):
                continue
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:  # ended while we looked, or not ours to read
            continue
        if stat[stat.rindex(")") + 2] not in "ZX":
            found.append(int(entry))
    return found


def kill_until_gone(pids, timeout: float = 30.0, poll: float = 0.2) -> list[int]:
    """SIGKILL what pids() lists until it lists nothing (processes may spawn others as they die); returns the
    pids that survived the timeout (none, normally)."""
    deadline = time.monotonic() + timeout
    while (left := pids()) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(poll)
    return pids()


def stop_tagged(tag: str, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process carrying `tag` until none is left; returns the pids that survived (none, normally)."""
    return kill_until_gone(lambda: tagged_pids(tag), timeout)


@contextlib.contextmanager
def running(cluster):
    """A test cluster (start(), stop() -> surviving pids) started for a block and always stopped after it."""
    try:
        cluster.start()
        yield cluster
    finally:
        assert cluster.stop() == []


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    """Poll condition() until it returns something truthy; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
