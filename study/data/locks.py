"""A file lock for one step of data preparation on a node (download, decompress, convert) that leaves no file.

Trials on a machine share its data folders, so the first one to need a step does it while the others wait on a
lock file next to the output; `with step_lock(path): ...`. filelock keeps its lock file after release (so
waiters share one inode); here the holder removes it as its last act before letting go, so no `.lock` outlives
the step, whether it finished or failed.

Why that is safe (filelock >= 3.12, flock-based): only the holder unlinks, and only after the step's output is
complete (every step writes it atomically: a temporary file, then os.replace). A process waiting meanwhile
reopens the path on each try and drops an inode found unlinked after locking it, so it ends up holding a fresh
lock file; a newcomer that creates that fresh file before the old holder's release finds the output finished
and reuses it. The steps themselves never overlap.
"""

from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


@contextmanager
def step_lock(path):
    """Hold a FileLock on `path` for the body; remove the lock file before releasing it."""
    path = Path(path)
    with FileLock(str(path)):
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
