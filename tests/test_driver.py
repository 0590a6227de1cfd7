"""The one driver (study.commands.driver) with a command of its own: the order of a study's steps, what a new and a resumed
study store, the exit status, and a refusal that leaves nothing. Ray is not started: open_study is replaced by the
folder's own checks."""

import argparse
import json
from types import SimpleNamespace

import pytest

from study.commands import driver
from study.errors import StudyError

RESOURCES = {"cpu": 1.0, "gpu": 0.0}


class Recording(driver.Command):
    kind, study = "test", "toy"

    def __init__(self, results=(), refuse=False):
        self.calls, self.results, self.refuse = [], list(results), refuse

    def prepare(self, args):
        self.calls.append("prepare")
        if self.refuse:
            raise StudyError("refused")

    def record(self, study):
        self.calls.append("record")
        return dict(super().record(study), kind=self.kind, extra=1)

    def begin(self, study):
        self.calls.append("begin")
        study.folder.write_json("first.json", {"version": study.version})

    def stages(self, study):
        print("stage runs")
        self.calls.append("stages")
        return self.results

    def end(self, study, results):
        self.calls.append("end")


@pytest.fixture
def no_ray(monkeypatch):
    def open_study(folder, args):
        folder.prepare(args.resume)
        return dict(RESOURCES)
    monkeypatch.setattr(driver, "open_study", open_study)
    monkeypatch.setattr(driver, "code_version", lambda: "abc123")


def args_of(tmp_path, **given):
    return argparse.Namespace(**dict(dict(storage_path=str(tmp_path), name="s", resume=False, verbose=False), **given))


def test_a_new_study_goes_through_every_step_in_order(tmp_path, no_ray, capsys):
    command = Recording([SimpleNamespace(error=None, metrics={})])
    code, uri = driver.drive(command, args_of(tmp_path))
    assert code == 0 and uri == str(tmp_path / "s")
    assert command.calls == ["prepare", "record", "begin", "stages", "end"]
    stored = json.loads((tmp_path / "s" / "study.json").read_text())
    assert stored["code_version"] == "abc123" and stored["resources_per_trial"] == RESOURCES
    assert stored["study"] == "toy" and stored["kind"] == "test" and stored["extra"] == 1
    assert stored["args"]["name"] == "s"
    out = capsys.readouterr().out
    assert out.index("study folder:") < out.index("stage runs") < out.index("results:")


def test_a_failed_trial_is_exit_status_1(tmp_path, no_ray):
    results = [SimpleNamespace(error=None, metrics={}), SimpleNamespace(error=RuntimeError("x"), metrics={})]
    assert driver.drive(Recording(results), args_of(tmp_path))[0] == 1


def test_a_resumed_study_keeps_its_study_json(tmp_path, no_ray):
    driver.drive(Recording(), args_of(tmp_path))
    before = (tmp_path / "s" / "study.json").read_text()
    command = Recording()
    assert driver.drive(command, args_of(tmp_path, resume=True))[0] == 0
    assert "record" not in command.calls and (tmp_path / "s" / "study.json").read_text() == before


def test_a_refused_command_writes_nothing(tmp_path, no_ray):
    with pytest.raises(StudyError, match="refused"):
        driver.drive(Recording(refuse=True), args_of(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_resumed_restores_the_stored_arguments_of_the_same_kind_only(tmp_path):
    driver_args = args_of(tmp_path, name=None, smoke=False)
    with pytest.raises(StudyError, match="--resume needs --name"):
        driver.resumed(args_of(tmp_path, name=None, resume=True), Recording(), "toy")
    named = driver.resumed(driver_args, Recording(), "toy")
    assert named.name.startswith("toy-")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "study.json").write_text(json.dumps({"study": "toy", "kind": "test",
                                                             "args": {"smoke": True, "name": "old"}}))
    given = args_of(tmp_path, name="old", resume=True, smoke=False, address=None, gpus_per_trial=0,
                    cpus_per_trial=1, num_cpus=None, retry_errored=False, max_trials=10)
    assert driver.resumed(given, Recording(), "toy").smoke is True
    other = Recording()
    other.study = "other"
    with pytest.raises(StudyError, match="holds a toy study"):
        driver.resumed(given, other, "other")
