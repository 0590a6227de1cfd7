"""Metric and artifact names, shared by the trainables, the Tuners, TensorBoard and analysis/.

One name per metric (STYLE habit 7): a rename here reaches every reader and writer at once. Torch-free, as is
every reader of the stored format here (trial_value): analysis/ imports it without loading PyTorch.
"""

import math
from collections.abc import Iterable

# Reported by every trial, every epoch (epoch 0 is the evaluation before any training step).
EPOCH = "epoch"
STEP = "step"  # optimizer steps taken so far (workload studies)
EXAMPLES = "examples"  # training examples seen so far (workload studies)
TRAIN_LOSS = "train_loss"  # mean loss over the epoch's training batches; NaN at epoch 0
# Training seconds leave out the noise probes' forward and backward passes (PROBE_SECONDS), whose share of an epoch
# depends on the batch size; results stored without PROBE_SECONDS have the probes inside (read as they are).
EPOCH_SECONDS = "epoch_seconds"  # wall-clock training seconds of this epoch without probes (CUDA synchronised)
PROBE_SECONDS = "probe_seconds"  # seconds of this epoch's noise probes (0: off, or epoch 0)
TRAIN_SECONDS = "train_seconds"  # cumulative training seconds (probes left out) up to and including this epoch
IMAGES_PER_SECOND = "images_per_second"  # training images / epoch_seconds
STATUS = "status"  # one of the STATUS_* values below
DIVERGED = "diverged"  # True once the training loss became NaN or inf
NOISE_SCALE = "noise_scale"  # B_simple of the epoch, McCandlish et al. 2018 (NaN: off, no probe, |G|^2 est. <= 0)
NOISE_PROBES = "noise_probes"  # probe steps behind this epoch's noise_scale (0: off, or epoch 0)
LR = "lr"  # learning rate in effect at the end of the epoch (after scaling and warmup)
DEVICE = "device"  # cpu | cuda
GPU_IDS = "gpu_ids"  # the physical GPU(s) Ray gave the trial, comma-separated ("" on CPU)
GPU_SHARE = "gpu_share"  # the trial's fraction of a GPU (--gpus-per-trial)
CUDA_VISIBLE = "cuda_visible_devices"  # CUDA_VISIBLE_DEVICES in the trial's process: what PyTorch could see
NODE_ID = "node_id"  # Ray's id of the node the trial ran on (node_ip alone cannot tell nodes of one host apart)
GPU_MEMORY_MB = "gpu_memory_mb"  # peak CUDA memory allocated by the trial so far, MiB (NaN on CPU)

STATUS_RUNNING = "running"
STATUS_DONE = "done"
STATUS_DIVERGED = "diverged"
STATUS_OOM = "out_of_memory"  # ended at once by CUDA out-of-memory (never retried); MESSAGE says what to change
# ended by its own exception, not retried (study.engine.trial_errors); MESSAGE: the exception's line
STATUS_ERROR = "error"
MESSAGE = "message"  # why the trial ended early (only in an out_of_memory or error row)
ENDED = (STATUS_OOM, STATUS_ERROR)  # a last row's status of a trial that ended early, reported, not raised
REPEATS = ("run", "seed")  # grid axes that repeat a configuration rather than make a new one

# Steps-to-result studies: on each evaluation row, keyed by STEP (study.engine.steps_trial).
NOISE_TRACE = "noise_trace"  # mean tr(Sigma) estimate over the probes since the previous evaluation
NOISE_GRAD_SQ = "noise_grad_sq"  # mean |G|^2 estimate behind it (NOISE_SCALE is their ratio)
STEPS_TO_RESULT = "steps_to_result"  # the step of the first evaluation at the strictest goal (NaN: none yet)
# Validation examples an evaluation scored: the split's size, or fewer where a screen stopped it early because the
# rest could not bring the row to the goal (study.engine.eval_schedule); such a row's validation metrics are NaN.
EVAL_EXAMPLES = "eval_examples"
SCREENED = "screened"  # True on such a row: its validation metrics were not computed (not at the goal, certainly)

# Regression (the mean squared error).
VAL_MSE = "val_mse"  # on the held-out validation images; NaN when no validation split
TEST_MSE = "test_mse"

# Binary classification with a selected epoch.
VAL_LOSS = "val_loss"
VAL_ACC = "val_acc"
VAL_AUC = "val_auc"
BEST_EPOCH = "best_epoch"  # epoch of the best validation accuracy so far
BEST_VAL_ACC = "best_val_acc"
TEST_AUC = "test_auc"  # of the best-on-validation model; reported once, at the end
TEST_ACC = "test_acc"

# Files a study stores next to Tune's experiments (study.commands.driver and the commands write them; analysis/ reads
# them).
STUDY_FILE = "study.json"  # what ran: the study's kind, its arguments, code version, stages
ERRORED_FILE = "errored_trials.json"  # in each stage folder: the trial folders its last run left errored
CHOSEN_FILE = "chosen_lr.json"  # a learning-rate search stage's choice per group
WORKLOAD_FILE = "workload.json"  # a workload study: metrics (names, directions), primary, goals, chance, grid axes
TARGET_STATS_FILE = "target_stats.json"  # box-plot statistics of each regression target over the training set
LEASE_FILE = "lease.json"  # the driver running the study now (study.commands.lease); never read by analysis/
STOPPED_FILE = "stopped_by_rule.json"  # steps study, in its stage folder: trial folder -> the step the rule stopped it

# Files inside a trial's final checkpoint (persisted to the storage path with it).
PREDICTIONS_FILE = "test_predictions.csv"  # columns: index, label, probability
SUBMISSION_FILE = "submission.csv"  # Kaggle layout: id, label (predicted probability)
STATE_FILE = "state.pt"
RESULT_FILE = "result.json"  # Tune's per-trial rows, a JSON object per line (read by study.result_rows only)
PROGRESS_FILE = "progress.csv"  # Tune's per-trial rows as CSV

# Files in a trial's folder (study.engine.trial_errors).
TRACEBACK_FILE = "traceback.txt"  # the full traceback of the exception that ended the trial (status error)
LAST_FAILURE_FILE = "last_failure.txt"  # the line of the exception Tune last retried: the same again ends the trial


def trial_value(epoch_values: Iterable[float]) -> float:
    """A trial's B_simple from its trained epochs' values in order: the last finite one (NaN if none). The one
    definition the reports, the noise figures and TensorBoard use (TensorBoard draws no NaN point, so the last point
    of `noise/scale`, which its HPARAMS table shows, is this value). The last, not a mean over epochs: B_simple
    grows as the loss falls (McCandlish et al. 2018, section 3.3), and the trained model is the one at the end."""
    finite = [float(v) for v in epoch_values if v is not None and math.isfinite(v)]
    return finite[-1] if finite else math.nan
