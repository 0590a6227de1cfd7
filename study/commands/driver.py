"""The one driver of every study command: `python -m study run|steps` (study.commands.run_command,
study.commands.steps_study) and the papers' own commands (`python -m study.<paper>`), and their Python entry points
(study.run_study, study.run_steps).

Every study goes the same way (drive): its flags are checked and its data read once and preflighted (the command's
prepare), all before anything is written; then the study folder is taken (its lease, Ray, the per-trial resources)
and a new study's study.json written with the code version; the command's own first files (begin); "study folder:
..."; the command's stages, each one Tune experiment (Study.stage) with the shared console, TensorBoard and the
user's Tune callbacks; the command's end-of-study files and summary (end); the one line of where the results are,
and the exit status: 1 when a trial failed or ran out of memory, 2 for input refused (one line on stderr).
A command writes only what differs: a Command with its grid and its stages.
"""

import argparse
import os
import sys
from dataclasses import dataclass, field

from study.commands import lease
from study.commands.cli_checks import check_name, check_uri, reachable
from study.errors import StudyError
from study.commands.flags import from_python
from study.metrics import STUDY_FILE
from study.commands.study_folder import StudyFolder, code_version, default_name, restore_args


class Command:
    """What one study command writes itself. `kind` is study.json's "kind" (None: the papers' original studies,
    which store none), `study` its "study"."""

    kind: str | None = None
    study: str = ""

    def prepare(self, args) -> None:
        """Flags checked, data read once and preflighted: everything a user can get wrong, before Ray starts."""

    def record(self, study: "Study") -> dict:
        """A new study's study.json, less what the driver adds (code_version, resources_per_trial)."""
        return {"study": self.study, "args": vars(study.args)}

    def begin(self, study: "Study") -> None:
        """Files written before the stages (workload.json, TensorBoard's experiment)."""

    def stages(self, study: "Study"):
        """Run the stages; return the results that decide the exit status (a Tune ResultGrid)."""
        raise NotImplementedError

    def end(self, study: "Study", results) -> None:
        """End-of-study files and the command's own summary."""


@dataclass
class Study:
    """A study under way: its arguments, folder, per-trial resources, code version and the user's Tune callbacks."""

    args: argparse.Namespace
    folder: StudyFolder
    resources: dict
    version: str
    tune_callbacks: list = field(default_factory=list)

    def stage(self, name: str, trainable, space: dict, *, data, tensorboard=None, console=None, **tune_options):
        """One stage as one Tune experiment (study.commands.tuning.run_stage): the study's TensorBoard writer, its
        console unless --verbose (which leaves the console to Tune), then the user's callbacks."""
        from study.commands.tuning import run_stage

        callbacks = [c for c in (tensorboard, None if self.args.verbose else console) if c is not None]
        return run_stage(trainable, space, folder=self.folder, stage=name, args=self.args, resources=self.resources,
                         data=data, callbacks=[*callbacks, *self.tune_callbacks], **tune_options)


@lease.released_at_end()  # the study folder's lease, taken in open_study
def drive(command: Command, args, tune_callbacks: list = ()) -> tuple[int, str]:
    """The study of parsed (and, with --resume, restored: resumed()) flags: (exit status, folder URI)."""
    from study.commands.console import finished, started

    command.prepare(args)
    folder = StudyFolder(args.storage_path, args.name)
    resources = open_study(folder, args)
    study = Study(args, folder, resources, code_version(), list(tune_callbacks))
    if not args.resume:
        folder.write_json(STUDY_FILE, dict(command.record(study), code_version=study.version,
                                           resources_per_trial=resources))
    command.begin(study)
    started(folder.uri)
    results = command.stages(study)
    command.end(study, results)
    return finished(folder.uri, results), folder.uri


def paper_defaults(parser: argparse.ArgumentParser, args, defaults: dict, smoke: dict, name: str):
    """A paper's parsed flags completed: its defaults (`smoke`'s with --smoke) for every flag not given, and the
    study's name (default: `name`, `name`-smoke with --smoke, and the time); --resume needs --name."""
    for key, value in (smoke if args.smoke else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.resume and not args.name:
        parser.error("--resume needs --name: the study folder to continue")
    args.name = args.name or default_name(f"{name}-smoke" if args.smoke else name)
    return args


def resumed(args, command: Command, name: str, before: dict | None = None) -> argparse.Namespace:
    """The study's name (default: `name` and the time) and storage checked and, with --resume, the stored arguments
    (study.commands.study_folder.restore_args; `before`: what a study stored before an option existed ran with)."""
    if args.resume and not args.name:
        raise StudyError("--resume needs --name: the study folder to continue")
    args.name = args.name or default_name(name)
    check_name(args.name)
    check_uri(args.storage_path, "--storage-path")
    return restore_args(args, command.kind, command.study, before) if args.resume else args


def open_study(folder: StudyFolder, args) -> dict:
    """Take the study folder's lease (study.commands.lease), check the folder, start or join Ray, fit the per-trial
    resources; on a bad input leave no trace."""
    import ray

    from study.commands.tuning import fit_resources, start_ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and not ray.is_initialized():
        reachable(address)  # before anything is written: ray.init retries an unreachable address for good
    held = lease.take(folder)  # one driver per study: before anything in the folder is created or trimmed
    created = False
    try:
        created = folder.prepare(args.resume)
        start_ray(args)
        return fit_resources(args)
    except StudyError:
        held.release()
        if created:
            folder.remove_if_empty()
        raise


def main_of(command: Command, parse_args, run, argv=None) -> int:
    """A paper's command line (`python -m study.<paper>`): run(args) after the resume rules; a StudyError becomes one
    line on stderr and exit status 2."""
    args = parse_args(argv)
    try:
        args = resumed(args, command, args.name)
        with lease.released_at_end():
            return run(args)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def call(command: str, parser, execute, workload, callbacks, flags: dict) -> str:
    """run_study's and run_steps' body: `python -m study COMMAND` from Python; returns the study folder's URI.
    flags: the command line's flags with underscores; callbacks: Ray Tune callbacks."""
    from study.workload import resolve

    tune_callbacks = check_callbacks(callbacks)
    spec = workload if isinstance(workload, str) else spec_of(workload)
    found = resolve(spec)
    args = parser(found).parse_args([spec])
    unknown = sorted(set(flags) - set(vars(args)))
    if unknown:
        raise StudyError(f"unknown flags {', '.join(unknown)}; see python -m study {command} {found.name} --help")
    vars(args).update(flags)
    return execute(from_python(args), found, tune_callbacks)[1]


def check_callbacks(callbacks) -> list:
    """run_study's and run_steps' callbacks= as a list of Tune callbacks (kept out of the stored arguments: they
    are objects, not flags)."""
    from ray import tune

    if callbacks is None:
        return []
    if not isinstance(callbacks, (list, tuple)) or not all(isinstance(c, tune.Callback) for c in callbacks):
        listed = isinstance(callbacks, (list, tuple))
        got = [type(c).__name__ for c in callbacks] if listed else type(callbacks).__name__
        raise StudyError(f"callbacks must be a list of ray.tune.Callback objects (e.g. "
                         f"ray.air.integrations.mlflow.MLflowLoggerCallback), got {got}")
    return list(callbacks)


def spec_of(workload) -> str:
    """How the trials find a Workload object again in their own processes: its file, or module:name."""
    module = sys.modules.get(getattr(workload.load, "__module__", ""))
    name = next((k for k, v in vars(module).items() if v is workload), None) if module else None
    if name is None or module.__name__ == "__main__":
        raise StudyError(f"workload {workload.name} is not defined at the top level of an importable module or "
                         f"file; define it in a file (workload = Workload(...)) and pass the file's path")
    file = getattr(module, "__file__", None)
    return file if module.__name__.startswith("_workload_") and file else f"{module.__name__}:{name}"
