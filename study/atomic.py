"""Writes that are never half done: whoever reads a study's file (a --resume, the report) finds its old contents or
its new ones, never a file cut short, and never no file, whenever the writer is killed or the disk fills.

    from study.atomic import replace_file
    replace_file(fs, f"{folder}/study.json", data)   # fs: any pyarrow filesystem, path inside it

On a local disk the bytes go to a temporary file in the same folder, are flushed to the disk, and then take the
file's place by a rename, which POSIX makes atomic; a write that fails removes its temporary file, one killed
leaves it behind (a hidden `.replace-*.tmp` that nothing reads). An object store (s3://, gs://) makes an object
visible only once its upload has completed, so there the file is written in place: a stopped upload leaves the old
object. A file is never deleted before its replacement is written.
"""

import os
import posixpath
import uuid

import pyarrow.fs as pafs

TEMP_PREFIX = ".replace-"  # hidden, and without the file's name: no reader (TensorBoard's "*tfevents*") takes it


def replace_file(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` in `fs` so that `path` holds either what it held before or all of `data`."""
    if fs.type_name != "local":
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    temp = posixpath.join(posixpath.dirname(path), f"{TEMP_PREFIX}{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(temp) as out:
            out.write(data)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes on the disk before the rename makes them the file's: a reboot keeps one or other
        finally:
            os.close(fd)
        fs.move(temp, path)
    except Exception:  # a full disk, a lost mount: the old file stands, the temporary one goes
        try:
            fs.delete_file(temp)
        except OSError:
            pass
        raise
