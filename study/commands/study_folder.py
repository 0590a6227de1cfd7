"""A study's folder under the storage path (local or any pyarrow URI), the code version stored with it, and the
resume rules: what a --resume takes back from the folder's study.json and what it may change.

StudyFolder writes every file of a study whole or not at all (study.atomic); study.commands.driver takes the folder for
a command (its lease, study.json) and study.commands.tuning runs the stages in it.
"""

import argparse
import datetime
import json
import subprocess
from pathlib import Path

import pyarrow.fs as pafs

from study.atomic import TEMP_PREFIX, replace_file
from study.errors import StudyError
from study.metrics import LEASE_FILE, STUDY_FILE

PROBE = ".write-test"  # written and deleted at once: the storage path is writable


def default_name(kind: str) -> str:
    return f"{kind}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


class StudyFolder:
    """The study's folder under the storage path, local or remote, through pyarrow's filesystems."""

    def __init__(self, storage_path: str, name: str):
        # pyarrow's options ride in a URI's query (s3://bucket/prefix?endpoint_override=http://host:9000 for MinIO
        # or another S3-compatible store): every URI made from this one keeps them, so Tune and the trials reach
        # the same store.
        remote = "://" in storage_path
        base, query = storage_path.split("?", 1) if remote and "?" in storage_path else (storage_path, "")
        self._query = f"?{query}" if query else ""
        if remote:
            try:
                self.fs, root = pafs.FileSystem.from_uri(storage_path)
            except Exception as err:  # pyarrow raises ArrowInvalid/OSError for bad or unsupported URIs
                raise StudyError(f"storage path {storage_path!r} is not usable: {err}")
            self._base = base.rstrip("/") + "/" + name
        else:
            self.fs, root = pafs.LocalFileSystem(), str(Path(storage_path).expanduser().resolve())
            self._base = str(Path(root) / name)
        self.uri = self._base + self._query
        self.storage_uri = self._base.rsplit("/", 1)[0] + self._query
        self.path = f"{root.rstrip('/')}/{name}"
        self._made = []  # local folders prepare() created, innermost first: taken back if the run is refused

    def exists(self) -> bool:
        try:
            return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound
        except OSError as err:
            raise StudyError(f"cannot reach storage {self.uri}: {err}")

    def prepare(self, resume: bool) -> bool:
        """Refuse to start over an existing study (without --resume) and check the storage is writable by
        creating the folder; returns whether it was created now (so a later failure can take it back)."""
        # Empty, or holding only this driver's lease and what a start killed before its study.json leaves (the
        # probe below, a temporary file of study.atomic): no study, and a new start goes ahead.
        existed = self.exists() and any(not Path(i.path).name.startswith((TEMP_PREFIX, PROBE, LEASE_FILE))
                                        for i in self.fs.get_file_info(pafs.FileSelector(self.path)))
        if existed and not resume:
            raise StudyError(f"{self.uri} already holds a study; pass --resume to continue it, or choose another "
                             f"--name. Nothing was changed.")
        if resume and not existed:
            raise StudyError(f"--resume: no study at {self.uri}")
        try:
            if isinstance(self.fs, pafs.LocalFileSystem):
                self._made = [p for p in (Path(self.path), *Path(self.path).parents) if not p.exists()]
            self.fs.create_dir(self.path, recursive=True)
            probe = f"{self.path}/{PROBE}"
            with self.fs.open_output_stream(probe) as out:
                out.write(b"ok")
            self.fs.delete_file(probe)
        except OSError as err:
            raise StudyError(f"storage path {self.uri} is not writable: {err}")
        return not existed

    def remove_if_empty(self) -> None:
        """Take back a folder this run created before it wrote anything (bad resources found after Ray started),
        with the storage folders above it that prepare() created."""
        try:
            if not self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True)):
                self.fs.delete_dir(self.path)
            for folder in self._made[1:]:
                folder.rmdir()  # OSError once a folder is not empty: someone else's files, left alone
        except OSError:
            pass

    def child(self, name: str) -> str:
        return f"{self._base}/{name}{self._query}"

    def has(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.path}/{name}").type != pafs.FileType.NotFound

    def write_json(self, name: str, data) -> None:
        """Whole or not at all (study.atomic): a killed driver leaves the old file, never one cut short."""
        replace_file(self.fs, f"{self.path}/{name}", json.dumps(data, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, name: str):
        with self.fs.open_input_stream(f"{self.path}/{name}") as src:
            raw = src.read()
        try:
            return json.loads(raw)
        except ValueError as err:  # cut short by a crash mid-write, or edited by hand
            raise StudyError(f"{self.child(name)} is not valid JSON ({err}); restore it from a copy, or start a new "
                             f"study under another --name")


def code_version() -> str:
    """The git commit of the code (with -dirty for local changes), or the installed package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
        if sha.returncode == 0:
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "batchsize-study " + version("batchsize-study")
    except PackageNotFoundError:
        return "unknown"


# What a --resume may change: where and how the study runs, never its grid. --max-trials is the driver's memory
# guard, checked against the stored grid on every start. Not --max-failures: Tune's restore keeps the run config
# the study started with.
RESOURCE_FLAGS = ("address", "gpus_per_trial", "cpus_per_trial", "num_cpus", "resume", "retry_errored",
                  "storage_path", "name", "verbose", "max_trials")


# How each kind of study is resumed (study.json "kind"; the original studies have none).
RESUME_COMMANDS = {"workload": "python -m study run {study}", "steps": "python -m study steps {study}",
                   None: "python -m study.{study}"}
KIND_NAMES = {"workload": "workload", "steps": "steps-to-result"}


def restore_args(args, kind: str | None, study: str, before: dict | None = None) -> argparse.Namespace:
    """--resume: the arguments the study in --storage-path/--name started with, which must be a `kind` study of
    `study`; the resource flags given now replace the stored ones, and keys an older study.json lacks (flags added
    since) keep this version's defaults, or the value in `before` (what the study ran with before the flag existed,
    e.g. a workload's val_split: Workload.options_before), whatever is given now."""
    folder = StudyFolder(args.storage_path, args.name)
    if not (folder.exists() and folder.has(STUDY_FILE)):
        raise StudyError(f"--resume: no study at {folder.uri} (no {STUDY_FILE}); check --storage-path and "
                         f"--name, or start a new study without --resume")
    try:
        saved = folder.read_json(STUDY_FILE)
        stored = dict(saved["args"])
    except (ValueError, KeyError, TypeError) as err:  # edited, or not ours
        raise StudyError(f"{folder.child(STUDY_FILE)} is not a readable study record ({err!r}); restore it "
                         f"from a copy, or start a new study under another --name")
    if saved.get("kind") != kind or saved.get("study") != study:
        how = RESUME_COMMANDS.get(saved.get("kind"), "the command that started it").format(study=saved.get("study"))
        other = f", not a {KIND_NAMES[kind]} study" if kind in KIND_NAMES and saved.get("kind") != kind else ""
        raise StudyError(f"{folder.uri} holds a {saved.get('study')} study{other}; resume it with {how} --resume")
    older = {k: v for k, v in (before or {}).items() if k not in stored}
    return argparse.Namespace(**{**vars(args), **older, **stored, **{k: getattr(args, k) for k in RESOURCE_FLAGS}})
