"""Processes the cluster tests start (Ray heads and workers, jobs, an S3 API server), found again and stopped by pid.

Every process a test starts gets a marker variable in its environment, and Ray hands its environment down to
everything it spawns (GCS, raylets, dashboard, job drivers, trial workers, the autoscaler's fake nodes), even to
the processes that put themselves in new sessions. `stop_tagged` finds them all by that marker in
/proc/PID/environ and SIGKILLs them by pid: never `ray stop`, never by name, so the Ray instances of other users
of this machine are left alone.
"""

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


def stop_tagged(tag: str, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process carrying `tag` until none is left; returns the pids that survived (none, normally)."""
    deadline = time.monotonic() + timeout
    while (left := tagged_pids(tag)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    return tagged_pids(tag)


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    """Poll condition() until it returns something truthy; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
