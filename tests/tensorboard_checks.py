"""What a study's TensorBoard must show, read through a real server's data API (tests/conftest.py
`tensorboard_api`): shared by the MNIST and PCam end-to-end tests."""

import importlib
import json
import math
import time
from pathlib import Path

from study.commands.tensorboard import SCALARS, applies

ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
GROUPS = ("train/", "val/", "test/", "time/", "noise/", "system/")


def stored_trials(study: Path) -> dict:
    """run name (stage/trial folder) -> (params.json, last result row), from the files the study stored."""
    out = {}
    for params in study.glob("*/*/params.json"):
        rows = (params.parent / "result.json").read_text().splitlines()
        out[f"{params.parent.parent.name}/{params.parent.name}"] = (json.loads(params.read_text()),
                                                                   json.loads(rows[-1]) if rows else {})
    return out


def session_groups(api, expected: int, timeout_s: float = 60) -> list:
    """Every session group, once TensorBoard has read them all (it loads the folder in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        groups = api("/data/plugin/hparams/session_groups",
                     {"experimentName": "", "allowedStatuses": ALL_STATUSES, "startIndex": 0, "sliceSize": 1000})
        if len(groups["sessionGroups"]) >= expected or time.monotonic() > deadline:
            return groups["sessionGroups"]
        time.sleep(0.25)


def number(value) -> float:
    return float(value)  # the API writes NaN as the string "NaN"


def check_study(api, study: Path, kind: str, expect_diverged: bool) -> dict:
    """Every grid hyperparameter a column, every trial a row with its values and status, key metrics there, a
    diverged trial with no finite key metric, only our grouped scalars. Returns {run name: session group}."""
    board = importlib.import_module(f"study.{kind}.board")  # the paper's key metrics and hyperparameters
    HPARAMS, KEY_METRICS = {kind: board.HPARAMS}, {kind: board.KEY_METRICS}
    trials = stored_trials(study)
    groups = {g["sessions"][0]["name"]: g for g in session_groups(api, len(trials))}
    assert set(groups) == set(trials)
    experiment = api("/data/plugin/hparams/experiment", {"experimentName": ""})
    columns = {h["name"] for h in experiment["hparamInfos"]}
    varied = {k for k in HPARAMS[kind] if len({json.dumps(c.get(k)) for c, _ in trials.values()}) > 1}
    assert varied <= columns and columns <= set(HPARAMS[kind])
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert metrics[:len(KEY_METRICS[kind])] == [tag for tag, _ in KEY_METRICS[kind]]
    diverged = 0
    for name, (config, last) in trials.items():
        group = groups[name]
        for key in columns:
            if key in config and applies(key, config):
                assert group["hparams"][key] == config[key] or number(group["hparams"][key]) == config[key], key
            else:
                assert key not in group["hparams"], (name, key)
        status = group["sessions"][0]["status"]
        values = {m["name"]["tag"]: number(m["value"]) for m in group["metricValues"]}
        key_values = [values.get(tag, math.nan) for tag, _ in KEY_METRICS[kind]]
        if last.get("diverged"):
            diverged += 1
            assert status == "STATUS_FAILURE" and not any(math.isfinite(v) for v in key_values), name
        else:
            assert status == "STATUS_SUCCESS", name
            assert math.isfinite(values[KEY_METRICS[kind][0][0]]), name  # the study's result is in the table
    assert (diverged > 0) == expect_diverged
    tags = api("/data/plugin/scalars/tags")
    assert set(tags) == set(trials)
    known = set(SCALARS.values()) | {tag for tag, _ in KEY_METRICS[kind]}
    for run_tags in tags.values():
        assert set(run_tags) <= known and all(t.startswith(GROUPS) for t in run_tags)
    return groups


def stored_steps(run: Path) -> dict[str, list[int]]:
    """tag -> steps in the order written, over every event file of one run folder, read raw (TensorBoard itself
    would hide a repeated step behind the later one): what the study stored."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = {}
    for path in sorted(run.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps
