"""One driver per study: a lease file in the study folder (lease.json) names the driver that holds the folder.

A driver takes the lease before anything in the folder is created or trimmed (study.commands.driver.open_study) and
gives it back when it ends (`released_at_end` around every driver), also on an error, Ctrl-C or SIGTERM (Ray's
driver turns SIGTERM into SystemExit). While it runs, a daemon thread renews the lease's heartbeat every EVERY_S
seconds. A second driver of the same folder is refused in one line while the lease is live; it takes the lease
over when the lease is stale: no heartbeat for MISSED x EVERY_S seconds, or, on the same machine, the driver's
process has exited (a SIGKILLed driver leaves its lease behind). Heartbeats are the writer's clock, compared
with the reader's: the machines' clocks must agree to well within that time (NTP does).

Local folders (and shared filesystems with POSIX locks, e.g. NFSv4): the lease is created with O_CREAT|O_EXCL
and read, renewed, taken over and removed only under flock on the file itself (lease_file.py), so no two drivers
both win.
Remote stores through pyarrow (s3://, gs://) have no atomic create: a driver writes the lease with a token of its
own, waits SETTLE_S seconds and reads it back; whoever's token is there holds the folder and the others are
refused. Two drivers both win only when one of them stalls for longer than SETTLE_S between reading the lease
and writing its own; the loser then finds another token at its first heartbeat and stops.

A driver whose lease was taken over (it stopped heartbeating for MISSED x EVERY_S seconds, e.g. a suspended
machine) learns it at its next heartbeat: it prints one line and exits at once, status 2, without writing
anything more, since the folder is another driver's now.
"""

import atexit
import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from study.commands.lease_file import locked, parse, read, rewrite, token
from study.errors import StudyError
from study.metrics import LEASE_FILE

EVERY_S = 30.0  # heartbeat period
MISSED = 4  # heartbeats missed before a lease is stale: 2 minutes
SETTLE_S = 2.0  # remote stores: pause between writing the lease and reading it back
JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")  # batch schedulers' job ids

_scopes = threading.local()  # the leases taken inside each running driver (released_at_end), innermost last


def take(folder, **timing) -> "Lease":
    """The study folder's lease for this driver (StudyError while another driver holds it); given back when the
    driver around it ends (released_at_end), or else when this process exits."""
    lease = Lease(folder, **timing).take()
    stack = getattr(_scopes, "stack", None)
    if stack:
        stack[-1].append(lease)
    atexit.register(lease.release)
    return lease


@contextlib.contextmanager
def released_at_end():
    """Around a driver (or as its decorator): every lease taken inside is given back when it returns or raises."""
    stack = _scopes.__dict__.setdefault("stack", [])
    stack.append([])
    try:
        yield
    finally:
        for lease in reversed(stack.pop()):
            lease.release()


def _machine() -> str:
    """This boot of this machine and this process's pid namespace (Linux): a pid means the same process only when
    these agree, not in another container with the same host name."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() + " " + os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _exited(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    try:  # a killed process its parent has not reaped yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


class Lease:
    def __init__(self, folder, every: float = EVERY_S, missed: int = MISSED, settle: float = SETTLE_S):
        self.folder, self.every, self.stale_after, self.settle = folder, every, every * missed, settle
        self.local = isinstance(folder.fs, pafs.LocalFileSystem)
        self.path = f"{folder.path}/{LEASE_FILE}"
        job = next((os.environ[v] for v in JOB_VARIABLES if os.environ.get(v)), None)
        self.mine = dict(host=socket.gethostname(), pid=os.getpid(), job=job, machine=_machine(),
                         token=uuid.uuid4().hex, started=time.time(), heartbeat=time.time())
        self._made = []  # local folders take() created, innermost first: removed again on release when empty
        self._stop = threading.Event()
        self._thread = None
        self._held = False

    # -- what every backend shares: is a lease live, who holds it

    def _judge(self, held: dict | None, mtime: float | None) -> tuple[bool, str]:
        """(live, who): whether the lease read keeps this driver out, and its holder in words. held None: the file is
        unreadable (cut short, or being created right now), so its time is all there is; mtime None: no file."""
        if mtime is None:
            return False, "another driver (its lease is gone)"
        if held is None:
            age = max(time.time() - mtime, 0.0)
            return age < self.stale_after, f"another driver (its {LEASE_FILE}, written {age:.0f}s ago, is unreadable)"
        age = max(time.time() - held["heartbeat"], 0.0)  # a writer's clock a little ahead: now
        who = f"{held.get('host')} pid {held.get('pid')}" + (f" job {held['job']}" if held.get("job") else "")
        if (held.get("host"), held.get("machine")) == (self.mine["host"], self.mine["machine"]) and \
                isinstance(held.get("pid"), int) and _exited(held["pid"]):
            return False, f"{who} (exited)"
        return age < self.stale_after, f"{who} (heartbeat {age:.0f}s ago)"

    def _refusal(self, who: str) -> StudyError:
        return StudyError(f"study folder {self.folder.uri} is in use by {who}; a second driver would overwrite its "
                          f"results: stop that driver first or wait for it to end (a lease without a heartbeat for "
                          f"{self.stale_after:.0f} s, or whose driver on this machine exited, is taken over)")

    def _refuse_or_note(self, held: dict | None, mtime: float | None) -> None:
        live, who = self._judge(held, mtime)
        if live:
            raise self._refusal(who)
        if mtime is not None:
            print(f"note: {self.folder.uri}: took over the lease of {who}, a driver that is gone")

    def _encoded(self) -> bytes:
        self.mine["heartbeat"] = time.time()
        return json.dumps(self.mine, indent=2).encode()

    # -- taking, renewing and giving back

    def take(self) -> "Lease":
        try:
            (self._take_local if self.local else self._take_remote)()
        except OSError as err:
            raise StudyError(f"storage path {self.folder.uri} is not writable: {err}")
        self._held = True
        self._thread = threading.Thread(target=self._beat, name="study-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        if not self._held or self.mine["pid"] != os.getpid():  # not held, or a forked child's copy
            return
        self._held = False
        self._stop.set()
        atexit.unregister(self.release)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        try:
            if self.local:
                with locked(self.path) as fd:
                    if fd is not None and token(read(fd)) == self.mine["token"]:
                        os.unlink(self.path)
                for folder in self._made:
                    folder.rmdir()  # OSError once it is not empty: the study, or someone else's files
            else:
                held, _ = self._read_remote()
                if token(held) == self.mine["token"]:
                    self.folder.fs.delete_file(self.path)
        except OSError:
            pass  # the lease goes stale on its own: no heartbeat from now on

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                holder = self._renew_local() if self.local else self._renew_remote()
            except OSError:
                continue  # storage unreachable for now: the next beat tries again
            if holder is not None and not self._stop.is_set():
                print(f"error: {self.folder.uri}: lost the study's lease to {holder} while this driver missed its "
                      f"heartbeats; this driver stops so as not to write into that driver's study", file=sys.stderr,
                      flush=True)
                os._exit(2)

    # -- local folders: O_EXCL to create, flock on the file itself for everything else

    def _create_local(self) -> bool:
        """Create the lease file with this driver's lease; False when there is one already."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:  # a reader between the create and the lock finds it empty and new: in use, as it is
            fcntl.flock(fd, fcntl.LOCK_EX)
            rewrite(fd, self._encoded())
        finally:
            os.close(fd)
        return True

    def _take_local(self) -> None:
        folder = Path(self.folder.path)
        self._made = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        while not self._create_local():
            with locked(self.path) as fd:
                if fd is not None:  # else given back meanwhile: create it again
                    self._refuse_or_note(read(fd), os.fstat(fd).st_mtime)
                    rewrite(fd, self._encoded())
                    return

    def _renew_local(self) -> str | None:
        """Renew the heartbeat; the holder in words when another driver holds the lease now."""
        while True:
            with locked(self.path) as fd:
                if fd is not None:
                    held = read(fd)
                    if token(held) != self.mine["token"]:
                        return self._judge(held, os.fstat(fd).st_mtime)[1]
                    rewrite(fd, self._encoded())
                    return None
            if self._create_local():  # removed by hand while this driver runs: ours again
                return None

    # -- remote stores: write, pause, read back

    def _read_remote(self, tries: int = 4) -> tuple[dict | None, float | None]:
        """(lease, or None when unreadable; its time), or (None, None) when there is none. pyarrow reads an object
        as its size, then byte ranges: a lease rewritten in between reads torn, so an unreadable one is read again."""
        for attempt in range(tries):
            info = self.folder.fs.get_file_info(self.path)
            if info.type == pafs.FileType.NotFound:
                return None, None
            try:
                with self.folder.fs.open_input_stream(self.path) as src:
                    held = parse(src.read())
            except FileNotFoundError:  # given back between the two calls
                return None, None
            if held is not None or attempt == tries - 1:
                return held, info.mtime.timestamp() if info.mtime is not None else time.time()
            time.sleep(0.05 * (attempt + 1))

    def _write_remote(self) -> None:
        with self.folder.fs.open_output_stream(self.path) as out:
            out.write(self._encoded())

    def _take_remote(self) -> None:
        self._refuse_or_note(*self._read_remote())
        self._write_remote()
        time.sleep(self.settle)
        held, mtime = self._read_remote()
        if token(held) != self.mine["token"]:  # another driver wrote after this one: it holds the folder
            raise self._refusal(self._judge(held, mtime)[1])

    def _renew_remote(self) -> str | None:
        held, mtime = self._read_remote()
        if mtime is not None and token(held) != self.mine["token"]:
            return self._judge(held, mtime)[1]
        self._write_remote()
        return None
