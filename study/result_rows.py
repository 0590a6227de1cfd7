"""A trial's stored rows: Tune's result.json, a JSON object per line, read one way by everything that reads it
(study.commands.resume trims it, study.commands.steps_stopped primes its stopping rule from it, analysis.trials
reads it).

Tune ends every row with a newline, so a last line without one was cut short (a killed driver, or a row being
written now) even when what it holds parses; a line that is not a JSON object is corrupt. Each reader decides what
to do with those, and the rows around them stand. Python's json reads the NaN and Infinity that Tune writes. Torch- and
Ray-free: analysis/ imports it.
"""

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Line:
    number: int  # from 1
    text: str  # as stored, with its newline unless cut
    row: dict | None  # None: blank, cut short or not a JSON object
    problem: str = ""  # why row is None ("" for a blank line)

    @property
    def cut(self) -> bool:
        return not self.text.endswith("\n")

    @property
    def blank(self) -> bool:
        return not self.text.strip()


def result_lines(raw: bytes | str) -> list[Line]:
    """Every line of a result.json, read or not (split on newlines only: a stray \\r is a corrupt row's content)."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    parts = text.split("\n")
    lines = []
    for number, part in enumerate(parts, start=1):
        last = number == len(parts)
        if last and not part:
            break
        line = part if last else part + "\n"
        if not part.strip():
            lines.append(Line(number, line, None))
            continue
        try:
            row = json.loads(part)
            problem = "" if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
        except ValueError as err:  # JSONDecodeError is a ValueError
            row, problem = None, str(err).splitlines()[0][:80]
        lines.append(Line(number, line, row if not problem else None, problem))
    return lines


def rows(raw: bytes | str) -> list[dict]:
    """The rows that read, in file order (after a restart from a checkpoint Tune appends repeated rows again)."""
    return [line.row for line in result_lines(raw) if line.row is not None]
