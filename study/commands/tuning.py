"""Ray and Tune plumbing of every study command (study.commands.driver): the Ray and storage flags, starting or joining
Ray, the per-trial resources, and one stage of a study as one Tune experiment (run_stage), resumed where it stopped.

Everything a user can get wrong is checked before Ray starts or anything is written: a --address no cluster answers
at, impossible resources; the flags themselves are checked in study.commands.cli_checks, the study folder in
study.commands.study_folder.
"""

import argparse
import fnmatch
import logging as pylogging
import os
from pathlib import Path

import pyarrow.fs as pafs

from study.commands import cluster
from study import metrics as M
from study.engine import trial_errors
from study.commands.cli_checks import MAX_TRIALS, check_common_flags
from study.errors import StudyError
from study.metrics import ERRORED_FILE
from study.commands.study_folder import StudyFolder

SNAPSHOTS = "experiment_state-*.json"  # Tune's experiment snapshots in a stage folder (TuneController.CKPT_FILE_TMPL)
# Where ray.init logs its start-up notes (ray.init sets the level of "ray" itself, so that one is no use).
RAY_START_LOGGER = "ray._private.authentication.authentication_token_setup"


def add_common_args(parser: argparse.ArgumentParser, *, gpus_per_trial: float) -> None:
    ray_group = parser.add_argument_group("Ray and storage")
    ray_group.add_argument("--storage-path", default="results",
                           help="where Tune stores the study: a local folder or any URI pyarrow accepts "
                                "(s3://bucket/prefix, gs://...). Multi-node clusters need shared storage.")
    ray_group.add_argument("--name", default=None,
                           help="study folder under the storage path (default: kind-timestamp)")
    ray_group.add_argument("--address", default=None, help="Ray cluster to join: auto or HOST:PORT (default: "
                                                           "$RAY_ADDRESS, else start a local one)")
    ray_group.add_argument("--gpus-per-trial", type=float, default=gpus_per_trial,
                           help=f"GPU share per trial, at most 1 (a trial trains on one GPU); fractions pack trials "
                                f"on one GPU (default {gpus_per_trial}); falls back to CPU on a local machine with "
                                "no GPU")
    ray_group.add_argument("--cpus-per-trial", type=float, default=1.0,
                           help="CPUs Ray reserves for each trial (default 1): a node runs as many trials at once as "
                                "its CPUs hold at this share (and its GPUs at --gpus-per-trial)")
    ray_group.add_argument("--num-cpus", type=int, default=None,
                           help="CPUs of the local Ray instance started when no --address is given (default: all)")
    ray_group.add_argument("--max-failures", type=int, default=3,
                           help="times a failed trial is retried from its last checkpoint")
    ray_group.add_argument("--resume", action="store_true",
                           help="continue an interrupted study in --storage-path/--name; finished trials are kept")
    ray_group.add_argument("--retry-errored", action="store_true",
                           help="with --resume: also retry trials that ended in an error")
    ray_group.add_argument("--verbose", action="store_true",
                           help="Tune's own output (a config and a result box per trial) and Ray's warnings, "
                                "instead of one compact table per stage")
    ray_group.add_argument("--max-trials", type=int, default=MAX_TRIALS,
                           help=f"refuse a grid of more trials than this (default {MAX_TRIALS}; the driver holds "
                                "every trial in memory)")


def check_common_args(args) -> None:
    check_common_flags(args)
    if args.cpus_per_trial <= 0:
        raise StudyError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.gpus_per_trial < 0:
        raise StudyError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.gpus_per_trial > 1:  # a trial trains on one device and caps memory there (study.engine.memory)
        raise StudyError(f"--gpus-per-trial must be at most 1 (a trial trains on one GPU; a fraction packs trials "
                         f"on one), got {args.gpus_per_trial:g}")
    if args.max_failures < 0:
        raise StudyError(f"--max-failures must be >= 0, got {args.max_failures}")
    if args.retry_errored and not args.resume:
        raise StudyError("--retry-errored only makes sense with --resume")


def start_ray(args) -> None:
    """Join the cluster named by --address / RAY_ADDRESS, or start a local Ray (reusing one already running in
    this process, as the tests do)."""
    import ray

    if ray.is_initialized():
        return
    address = args.address or os.environ.get("RAY_ADDRESS")
    # Ray's INFO lines from the trials' processes (one per checkpoint) only with --verbose.
    verbose = getattr(args, "verbose", False)
    logging = ray.LoggingConfig(log_level="INFO" if verbose else "WARNING")
    # The driver's own start-up warnings (e.g. "Token authentication is enabled") are benign: --verbose shows them;
    # a start that fails still raises.
    driver_log = pylogging.getLogger(RAY_START_LOGGER)
    level = driver_log.level
    if not verbose:
        driver_log.setLevel(pylogging.ERROR)
    try:
        if address and address != "local":
            ray.init(address=address, log_to_driver=True, logging_config=logging)
        else:
            # "local": always a fresh instance, never silently joining another Ray running on this machine.
            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_config=logging)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise StudyError(f"cannot start or join Ray at {address or 'a local instance'}: {err}")
    finally:
        driver_log.setLevel(level)
    protect_auth_token()


def protect_auth_token() -> None:
    """~/.ray/auth_token readable by its owner only. A local ray.init creates it with the umask's mode, often
    readable by every user of the machine, and whoever holds it can run code on each cluster that trusts it."""
    path = Path.home() / ".ray" / "auth_token"
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError:  # no token (auth off), or another user's file: nothing this process may change
        pass


def fit_resources(args) -> dict:
    """The per-trial resources, checked against what the cluster has (after start_ray)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    max_gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    max_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    gpus = args.gpus_per_trial
    local = (args.address or os.environ.get("RAY_ADDRESS") or "local") == "local"
    if not local:
        try:
            place = cluster.trial_placement(args.cpus_per_trial, gpus, nodes,
                                            cluster.node_types(ray.get_runtime_context().gcs_address))
        except ValueError as err:
            raise StudyError(str(err))
        if place is not None:  # the autoscaler's node types are known: they, not the nodes up now, decide
            if place != "now":
                print(f"note: no node up now can hold a trial ({gpus:g} GPUs, {args.cpus_per_trial:g} CPUs); "
                      f"trials wait for the autoscaler to start a {place} node")
            return {"cpu": args.cpus_per_trial, "gpu": gpus}
    if gpus > 0 and max_gpus == 0:
        if local:
            print(f"note: no GPU on this machine; trials run on CPU (--gpus-per-trial {gpus} ignored)")
            gpus = 0.0
        else:
            print("note: no GPU node is up yet; trials wait for the autoscaler to add one")
    if args.cpus_per_trial > max_cpus and (local or max_cpus > 0):
        raise StudyError(f"--cpus-per-trial {args.cpus_per_trial:g} is more than any node has "
                         f"(largest: {max_cpus:g} CPUs)")
    return {"cpu": args.cpus_per_trial, "gpu": gpus}


def run_stage(trainable, param_space: dict, *, folder: StudyFolder, stage: str, args, resources: dict,
              data: dict, search_alg=None, num_samples: int = 1, callbacks: list = (), run_names=None, stop=None):
    """Run (or, with --resume, continue) one Tune experiment of the study; returns its ResultGrid.
    callbacks: the study's TensorBoard writer and console (study.commands.driver.Study.stage), then a user's Tune
    callbacks; a resumed stage runs with those given now; run_names: a study.commands.tensorboard.RunName naming the
    trial folders; stop: a tune.Stopper (the steps study's rule)."""
    from ray import tune

    from study.commands.console import tune_console
    from study.commands.resume import StoredOnce, forget_lost_checkpoints, mark_out_of_memory_errored, start_over
    from study.commands.tensorboard import RunName

    path = folder.child(stage)
    errored_file = f"{stage}/{ERRORED_FILE}"
    resuming = args.resume and tune.Tuner.can_restore(path)
    if resuming and never_snapshotted(folder, stage):
        print(f"note: {path} stopped before Tune's first snapshot of it, so Tune cannot resume it; it starts again "
              f"from scratch")
        start_over(folder.fs, f"{folder.path}/{stage}")  # else the new trials append to the old rows
        resuming = False
    # Ray Tune can save a trial whose worker died as RUNNING although it ended in ERROR (its experiment snapshot
    # races the worker's death), and a plain restore would then retry it. Our own record of the errored trials,
    # handed to the trainables, keeps such a trial errored unless --retry-errored asks for it.
    errored = (folder.read_json(errored_file)
               if resuming and not args.retry_errored and folder.has(errored_file) else [])
    wrapped = tune.with_resources(tune.with_parameters(trainable, data=data, errored=errored), resources)
    if resuming:
        print(f"resuming {path}")
        if args.retry_errored:  # out-of-memory trials too, in the resources given now (study.commands.resume)
            mark_out_of_memory_errored(folder.fs, f"{folder.path}/{stage}")
        for trial_id in forget_lost_checkpoints(folder.fs, f"{folder.path}/{stage}"):
            print(f"note: trial {trial_id}'s last checkpoint was deleted after Tune's last snapshot of the stage; it "
                  f"starts again from scratch")
        tuner = tune.Tuner.restore(path, trainable=wrapped, resume_errored=args.retry_errored)
        if stop is not None:  # restore brings back the stopper pickled at the start; the caller's knows the results
            tuner._local_tuner.get_run_config().stop = stop
        # Likewise the callbacks pickled at the start: those given now replace them (a user's, a new terminal's console)
        tuner._local_tuner.get_run_config().callbacks = [StoredOnce(), *callbacks]
    else:
        tuner = tune.Tuner(
            wrapped,
            param_space=param_space,
            tune_config=tune.TuneConfig(reuse_actors=True, search_alg=search_alg, num_samples=num_samples,
                                        trial_dirname_creator=run_names or RunName()),
            run_config=tune.RunConfig(
                name=stage,
                storage_path=folder.uri,
                stop=stop,
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                # The latest checkpoint is all a restart needs; the best model travels inside it.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                verbose=3 if getattr(args, "verbose", False) else 0,  # 3: every trial's config and results
                callbacks=[StoredOnce(), *callbacks],  # first: it trims what the loggers reopen
            ),
        )
    with tune_console(getattr(args, "verbose", False)):
        results = tuner.fit()
    folder.write_json(errored_file, sorted(Path(r.path).name for r in results if r.error is not None
                                           or (r.metrics or {}).get(M.STATUS) in M.ENDED))
    for line in trial_errors.summary(results):  # the tracebacks are in the trial folders, not on the console
        print(line)
    return results


def never_snapshotted(folder: StudyFolder, stage: str) -> bool:
    """The stage holds Tune's tuner.pkl but no experiment snapshot: its driver stopped in the seconds between the
    two. Tune's restore of such a stage logs a traceback and starts over on top of what its trials had stored."""
    try:
        infos = folder.fs.get_file_info(pafs.FileSelector(f"{folder.path}/{stage}"))
    except OSError:  # FileNotFoundError included: nothing stored, nothing to resume
        return False
    names = [Path(info.path).name for info in infos]
    return "tuner.pkl" in names and not fnmatch.filter(names, SNAPSHOTS)


def grid_axis(values: list):
    """One value as itself, several as a Tune grid axis (one value leaves trial names as they were)."""
    from ray import tune

    return values[0] if len(values) == 1 else tune.grid_search(list(values))


