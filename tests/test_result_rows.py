"""study.result_rows, the one reader of a trial's result.json: what it makes of blank, corrupt and cut lines, and
that resume's trimming and the report read the same rows from one file."""

from analysis.trials import parse_results
from study.commands.resume import trimmed_results
from study.result_rows import result_lines, rows

STORED = ('{"epoch": 0, "a": NaN}\n'
          '\n'
          '[1, 2]\n'
          '{"epoch": 1, "a": 1\n'
          '{"epoch": 1, "a": 2, "config": {"lr": 0.1}}\n'
          '{"epoch": 2, "a": 3}\r\n'
          '{"epoch": 3, "a": 4}')  # the last row's newline not written yet


def test_each_line_is_read_once_and_says_what_it_is():
    lines = result_lines(STORED.encode())
    assert [line.number for line in lines] == [1, 2, 3, 4, 5, 6, 7]
    assert [line.row is not None for line in lines] == [True, False, False, False, True, True, True]
    assert lines[1].blank and not lines[1].problem
    assert lines[2].problem == "a JSON list, not an object"
    assert lines[3].problem.startswith("Expecting")
    assert [line.cut for line in lines] == [False] * 6 + [True]
    assert lines[5].row == {"epoch": 2, "a": 3}  # a \r before the newline is JSON whitespace, not a line break
    assert "".join(line.text for line in lines) == STORED


def test_the_readers_agree_on_the_rows():
    assert [r["a"] for r in rows(STORED)][1:] == [2, 3, 4]  # file order, repeats kept
    corrupt = []
    report = parse_results(STORED.encode(), corrupt)
    assert [(r["epoch"], r["a"]) for r in report][1:] == [(1, 2), (2, 3), (3, 4)]  # the later epoch-1 row wins
    assert [n for n, _ in corrupt] == [3, 4]
    corrupt = []
    parse_results((STORED[:-3]).encode(), corrupt, still_writing=True)  # a row being written is not corrupt
    assert [n for n, _ in corrupt] == [3, 4]
    parse_results((STORED[:-3]).encode(), corrupt)
    assert corrupt[-1] == (7, "not a result row (cut short, no newline); skipped")
    # resume keeps the corrupt lines for the report to name, drops rows after the restart epoch and the cut line
    assert trimmed_results(STORED, 1).splitlines() == STORED.splitlines()[:5]
