"""The study's own TensorBoard output, in place of Tune's TBXLoggerCallback (see docs/tensorboard.md).

`tensorboard --logdir <storage-path>/<name>` then shows:
- HPARAMS: one experiment per study (written once at its root by `write_experiment`: every hyperparameter of the
  grid with its domain, then a workload's own options, the metrics that matter first) and one session per trial
  (its full configuration and options at the start, its outcome at the end: done = success, diverged or error =
  failure, `train/diverged` tells them apart).
  A diverged or errored trial's key metrics end as NaN, so the table never shows the numbers of an epoch before
  it failed (e.g. the untrained epoch 0) as its result; except a diverged trial that was tested on its
  best-on-validation weights from before it diverged, whose test is its result, as in the report.
- SCALARS: our metrics grouped as train/, val/, test/, time/, noise/ and system/, the step being the epoch
  (0 = before training); NaN values (a metric the trial does not measure) draw no point.
Run names (the trial folders, `RunName`) say what the trial is: `sgd_lr=0.002_batch=32_seed=0_00001` (the suffix is
Tune's trial index); a command may lead with another config key, `mean_lr=0.001_batch=16_run=0_00003`.
A paper's command passes its own key metrics and hyperparameter order (study/<paper>/board.py); a workload study's
come from its workload.
"""

import math
import tempfile
import time
from pathlib import Path

from ray.tune.logger import TBXLoggerCallback
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from tensorboard.plugins.hparams import summary_v2 as hp

from study import metrics as M
from study.commands.console import no_result

# Tune metric -> TensorBoard tag. Anything else Tune reports (done, iterations_since_restore, gpu_share, ...) is
# bookkeeping and drawn nowhere.
SCALARS = {
    M.TRAIN_LOSS: "train/loss", M.LR: "train/lr", M.DIVERGED: "train/diverged",
    M.VAL_MSE: "val/mse", M.VAL_LOSS: "val/loss", M.VAL_ACC: "val/acc", M.VAL_AUC: "val/auc",
    M.BEST_VAL_ACC: "val/best_acc",
    M.TEST_MSE: "test/mse", M.TEST_AUC: "test/auc", M.TEST_ACC: "test/acc",
    M.EPOCH_SECONDS: "time/epoch_seconds", M.PROBE_SECONDS: "time/probe_seconds", M.TRAIN_SECONDS: "time/train_seconds",
    M.IMAGES_PER_SECOND: "time/images_per_second", M.NOISE_SCALE: "noise/scale", M.NOISE_PROBES: "noise/probes",
    M.GPU_MEMORY_MB: "system/gpu_memory_mb",
}
BEST_VAL_AUC = "val/best_auc"  # val AUC of the best-accuracy epoch (the weights that get tested)

# HPARAMS shows a tag's last point; noise/scale draws no NaN, so its column is the trial's B_simple as
# study.metrics.trial_value defines it for the reports (the last finite epoch value).
COMMON_METRICS = [("train/loss", "train loss"), ("time/epoch_seconds", "epoch seconds"),
                  ("noise/scale", "noise scale B_simple"), ("train/diverged", "diverged (1) or not (0)")]
# A command's key metrics: (tag, display name) pairs, the study's result first, in HPARAMS order before the common
# ones; a failed trial's end as NaN. Its hyperparameters: most telling first, since TensorBoard ticks the first SHOWN
# that vary in a study (it puts those it is told "differ" first, and ticks five), so a command lists derived ones
# (a factor that sets lr, a seed derived from the run) and constants after them, unticked.
SHOWN = 5  # hyperparameter columns TensorBoard 2.x ticks by default


def applies(name: str, config: dict) -> bool:
    """Whether a config key means anything for this trial (Adam ignores momentum; only the fine learning-rate
    search has a factor; the learning-rate search repeats no runs)."""
    if name == "momentum":
        return config.get("optimizer") in ("sgd", "nesterov")
    if name == "lr_factor":
        return config.get("stage") == "lr_fine"
    if name == "run":
        return config.get("stage") in (None, "batch_sweep", "single")
    return True


class RunName:
    """Tune's trial_dirname_creator: the trial's folder under its stage, which TensorBoard shows as the run name:
    the config's `lead` value (its optimizer by default), lr, lr scaling, batch size, the run index as `repeat`=
    (where the stage repeats runs, with only_where_repeated) and Tune's trial index.
    A learning rate that Tune draws later (tune.sample_from, still a placeholder when the folder is named) comes
    from lrs: the lead value -> the rate that the config's lr_factor multiplies."""

    def __init__(self, lrs: dict | None = None, lead: str = "optimizer", repeat: str = "seed",
                 only_where_repeated: bool = False):
        self.lrs, self.lead, self.repeat, self.only_where_repeated = dict(lrs or {}), lead, repeat, only_where_repeated

    def __setstate__(self, state: dict) -> None:
        # A study stored before RunName took lead and repeat pickled it with lrs alone (its tuner.pkl, unpickled on
        # --resume): it named a config holding a regression target by that target and `run`, any other config by
        # its optimizer and `seed`; None here keeps that rule for it.
        self.__dict__.update({"lead": None, "repeat": None, "only_where_repeated": None, **state})

    def __call__(self, trial) -> str:
        c = trial.config
        lead, repeat, only_where_repeated = self.lead, self.repeat, self.only_where_repeated
        if lead is None:  # pickled before lead and repeat (see __setstate__)
            lead, repeat, only_where_repeated = (("target", "run", True) if "target" in c else
                                                 ("optimizer", "seed", False))
        lr = c["lr"] if isinstance(c["lr"], (int, float)) else self.lrs[c[lead]] * c.get("lr_factor", 1.0)
        scaling = [f"scaling={c['lr_scaling']}"] if c.get("lr_scaling", "none") != "none" else []
        shown = applies("run", c) if only_where_repeated else True
        parts = [c[lead], f"lr={lr:g}", *scaling, f"batch={c['batch_size']}",
                 *([f"{repeat}={c['run']}"] if shown else []), trial.trial_id.rsplit("_", 1)[-1]]
        return "_".join(str(p) for p in parts)


def _domain(values: list) -> hp.Discrete:
    """The values as one type, as the API's Discrete requires (an int grid axis with a float among them: floats)."""
    if all(isinstance(v, bool) for v in values) or all(isinstance(v, str) for v in values):
        return hp.Discrete(values)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return hp.Discrete([float(v) for v in values], dtype=float)
    return hp.Discrete([str(v) for v in values], dtype=str)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) else math.nan


def experiment_summary(kind: str, domains: dict, key_metrics: list | None = None,
                       order: list | None = None) -> Summary:
    """The study's HPARAMS experiment, through TensorBoard's hparams API. domains: hyperparameter -> the values the
    study can give it; order: the hyperparameters, most telling first (default: the domains' order); key_metrics:
    the study's (tag, display name) pairs, its result first."""
    hparams = [hp.HParam(name, _domain(sorted(set(domains[name])))) for name in order or list(domains)
               if domains.get(name)]
    metrics = [hp.Metric(tag, display_name=label) for tag, label in list(key_metrics or []) + COMMON_METRICS]
    summary = hp.hparams_config_pb(hparams, metrics)
    # The API has no `differs` flag: TensorBoard ticks the columns flagged so, the first SHOWN that vary.
    value = summary.value[0]
    data = metadata.parse_experiment_plugin_data(value.metadata.plugin_data.content)
    shown = 0
    for info in data.hparam_infos:
        info.differs = len(info.domain_discrete.values) > 1 and shown < SHOWN
        shown += info.differs
    data.name = kind
    value.metadata.CopyFrom(metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(experiment=data)))
    return summary


def write_experiment(folder, kind: str, domains: dict, key_metrics: list | None = None,
                     order: list | None = None) -> None:
    """Write the experiment summary at the study's root (a StudyFolder, local or remote), once per study:
    TensorBoard keeps the first summary of a tag, so it must list every stage's hyperparameters from the start."""
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        writer.file_writer.add_summary(experiment_summary(kind, domains, key_metrics, order))
        writer.close()
        for event_file in Path(tmp).glob("events.out.tfevents.*"):
            with folder.fs.open_output_stream(f"{folder.path}/{event_file.name}") as out:
                out.write(event_file.read_bytes())


def option_hparams(options: dict, taken) -> dict:
    """A workload's own options (a trial config's "options", a dict HPARAMS cannot show) as hyperparameters of
    their own: each under its name, or "options.<name>" where that name is one of the `taken` config keys. The
    experiment and the sessions must name them alike: both pass the trial config's keys as `taken`."""
    return {f"options.{k}" if k in taken else k: v for k, v in (options or {}).items()}


def session_start(config: dict, group: str) -> Summary:
    """The trial's HPARAMS row (TensorBoard's hparams API): the config values that apply to it, and the workload's
    own options."""
    values = {**config, **option_hparams(config.get("options"), config)}
    return hp.hparams_pb({k: v for k, v in values.items() if isinstance(v, (bool, int, float, str)) and
                          applies(k, values)}, trial_id=group)


def session_end(success: bool | None) -> Summary:
    """The trial's outcome (None: it finished with no result, TensorBoard's "unknown"). TensorBoard's session_end_pb
    lives in its TensorFlow-only summary module, so the same message is built here from the plugin's own protos and
    metadata."""
    status = {True: api_pb2.STATUS_SUCCESS, False: api_pb2.STATUS_FAILURE, None: api_pb2.STATUS_UNKNOWN}[success]
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    data = plugin_data_pb2.HParamsPluginData(session_end_info=info)
    return Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG,
                                        metadata=metadata.create_summary_metadata(data))])


class StudyTensorBoard(TBXLoggerCallback):
    """Tune logger callback (on the driver) writing each trial's session and scalars into its folder. It takes the
    place of Tune's TBXLoggerCallback (Tune adds its own only when none is given), so there is no second,
    conflicting HPARAMS table; it shares nothing else with it."""

    def __init__(self, kind: str, stage: str, scalars: dict | None = None,
                 primary: str | None = None, key_metrics: list | None = None):  # noqa: no super().__init__
        """scalars: a workload study's metrics (name -> tag), drawn besides SCALARS. key_metrics: the study's result
        (tag, display name) pairs, which end as NaN in a failed trial (default: the scalars' tags). primary: the
        metric a finished trial is for; NaN at its end, the trial has no result (session status unknown, not
        success). Tune's own writer is not wanted: no super().__init__."""
        self.kind, self.stage, self.scalars, self.primary = kind, stage, dict(scalars or {}), primary
        self.failed_nan = [tag for tag, _ in key_metrics] if key_metrics else list(self.scalars.values())
        self._writers = {}
        self._last = {}  # trial -> (epoch, val AUC of the best epoch)

    def log_trial_start(self, trial):
        from torch.utils.tensorboard import SummaryWriter

        if trial in self._writers:
            self._writers[trial].close()
        writer = SummaryWriter(trial.local_path)
        # stage/trial folder: unique across the study's stages, so no two trials merge into one HPARAMS row
        writer.file_writer.add_summary(session_start(trial.config, f"{self.stage}/{Path(trial.local_path).name}"))
        self._writers[trial] = writer

    def log_trial_result(self, iteration, trial, result):
        if trial not in self._writers:
            self.log_trial_start(trial)
        writer, step = self._writers[trial], int(result.get(M.EPOCH, iteration))
        for key, tag in {**SCALARS, **self.scalars}.items():
            value = result.get(key)
            if isinstance(value, (bool, int, float)) and math.isfinite(value):
                writer.add_scalar(tag, float(value), step)
        if M.BEST_EPOCH in result and result[M.BEST_EPOCH] == result.get(M.EPOCH) and M.VAL_AUC in result:
            writer.add_scalar(BEST_VAL_AUC, float(result[M.VAL_AUC]), step)
        self._last[trial] = step
        writer.flush()

    def log_trial_end(self, trial, failed: bool = False):
        if trial not in self._writers:
            self.log_trial_start(trial)
        writer = self._writers.pop(trial)
        last = trial.last_result or {}
        diverged = bool(last.get(M.DIVERGED))
        failed = failed or last.get(M.STATUS) in M.ENDED  # reported, not raised: see trial_entry
        # One policy with the report (docs/faults.md, "Diverging runs"): a diverged trial that kept a best-on-validation
        # model from before it diverged was tested on it, and that is its result; one without (a last-epoch result,
        # or a trial diverging in its first epoch) has none.
        tested = diverged and not failed and _num(last.get(M.BEST_EPOCH)) > 0
        if (failed or diverged) and not tested:
            for tag in self.failed_nan:
                writer.add_scalar(tag, math.nan, self._last.get(trial, 0))
        success = not (failed or diverged)
        writer.file_writer.add_summary(session_end(None if success and no_result(last, self.primary) else success))
        writer.close()
        self._last.pop(trial, None)

    def on_experiment_end(self, trials, **info):
        for trial in list(self._writers):
            self._writers.pop(trial).close()


def tag(metric: str) -> str:
    """A prefixed metric's TensorBoard tag: val_error -> val/error."""
    split, _, name = metric.partition("_")
    return f"{split}/{name}"
