"""The lease file's bytes and, on a local folder, its lock: what study.commands.lease reads and writes through.

A lease is JSON with a heartbeat and a token (`parse` says whether bytes are one; a file cut short or still being
created is not). On a local folder every read, renewal, take-over and removal happens under flock on the file itself
(`locked`), rewritten in place and fsync'ed (`rewrite`). Apart from lease.py, which decides who holds the folder: this
is the file's format and its POSIX locking, and nothing of drivers, heartbeats or remote stores.
"""

import contextlib
import fcntl
import json
import os


def parse(raw: bytes) -> dict | None:
    """A lease as written by Lease; None when the bytes are not one (cut short, empty while being created)."""
    try:
        held = json.loads(raw)
    except ValueError:
        return None
    ok = isinstance(held, dict) and isinstance(held.get("heartbeat"), (int, float)) and "token" in held
    return held if ok else None


def token(held: dict | None) -> str | None:
    return (held or {}).get("token")


def read(fd: int) -> dict | None:
    return parse(os.pread(fd, 1 << 16, 0))


@contextlib.contextmanager
def locked(path: str):
    """The lease file, open and flock'ed; None when there is none. A file given back while this waited for the
    lock is looked up again."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                yield fd
                return
        finally:
            os.close(fd)  # and with it the lock


def rewrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
