"""Progress of long data preparation: a line every interval in a log, a tqdm bar on a terminal, and the data
preparers wired to it. Run: python -m pytest tests/test_progress.py -q"""

import io

import pytest

from study.pcam import kaggle
from study.data.progress import Progress
from tests.test_kaggle import make_folder


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_log_gets_a_line_per_interval_with_what_how_far_and_the_time_left():
    out, clock = io.StringIO(), Clock()
    with Progress("converting patches", total=1000, unit="patches", stream=out, every_s=30, clock=clock) as bar:
        clock.now += 10
        bar.update(100)  # 10 s in: no line yet
        assert out.getvalue() == ""
        clock.now += 20
        bar.update(150)  # 30 s in, a quarter done: 90 s left at this rate
        clock.now += 5
        bar.update(50)  # 5 s after the last line: none
        clock.now += 100
        bar.update(700)
    lines = out.getvalue().splitlines()
    assert lines[0] == "converting patches: 250/1,000 patches (25 %), 30 s so far, about 1 min 30 s left"
    assert lines[1] == "converting patches: 1,000/1,000 patches (100 %), 2 min 15 s so far"
    assert lines[2] == "converting patches: 1,000 patches in 2 min 15 s" and len(lines) == 3


def test_a_failed_step_ends_without_a_done_line():
    out = io.StringIO()
    with pytest.raises(OSError):
        with Progress("decompressing x.gz", total=10, unit="bytes", stream=out, clock=Clock()):
            raise OSError("disk full")
    assert out.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    with Progress("decompressing x.gz", total=2048, unit="B", stream=out) as bar:
        bar.advance_to(1024)
        bar.advance_to(2048)
    assert "decompressing x.gz" in out.getvalue() and "100%" in out.getvalue() and "\r" in out.getvalue()


def test_kaggle_conversion_reports_its_progress_in_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(Progress.__init__.__kwdefaults__, "every_s", 0.0)  # a line per block
    monkeypatch.setattr(kaggle, "BLOCK", 2)
    kaggle.prepare_kaggle(make_folder(tmp_path / "src"), tmp_path / "out", val_fraction=0.25)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("converting the Kaggle")]
    assert [line.split(": ")[1].split(" ")[0] for line in lines[:-1]] == ["2/11", "4/11", "6/11", "8/11", "10/11",
                                                                         "11/11"]
    assert lines[-1].endswith("11 patches in 0 s")
