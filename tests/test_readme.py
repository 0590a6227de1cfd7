"""Every command the README shows parses: the studies' and the report's flags against their own parsers, the
`ray` commands' flags against the installed Ray CLI's help. (Running them needs data, AWS or time; the studies
themselves are run by the end-to-end tests.)"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import report
from study import mnist, pcam

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TEXT = re.sub(r"\\\n\s*", " ", README)  # shell line continuations joined
PARSERS = {"study.mnist": mnist.parse_args, "study.pcam": pcam.parse_args, "analysis.report": report.parse_args}


def commands(program: str) -> list[str]:
    """Each `program ARGS` in the README: up to a comment, a backtick, a double quote, `&&` or the line end
    ('single-quoted' arguments kept whole)."""
    found = re.findall(rf"{program}((?:[ \t]+(?!#|&&)(?:'[^']*'|[^\s`\"'])+)*)", TEXT)
    return sorted({args.strip() for args in found})


@pytest.mark.parametrize("module", sorted(PARSERS))
def test_study_and_report_commands_parse(module):
    found = commands(rf"python -m {re.escape(module)}")
    assert found, f"the README shows no python -m {module} command"
    for args in found:
        argv = shlex.split(args.replace("[", "").replace("]", ""))  # "[--out DIR]": usage notation for optional
        try:
            PARSERS[module](argv)
        except SystemExit as err:
            pytest.fail(f"README: python -m {module} {args} -> exit {err.code}")


def ray_help(*subcommand: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *subcommand, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_ray_commands_use_flags_that_exist():
    checked = 0
    for sub in (["up"], ["down"], ["exec"], ["attach"], ["job", "submit"], ["job", "logs"]):
        calls = commands("ray " + " ".join(sub))
        assert calls, f"the README shows no ray {' '.join(sub)}"
        options = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", ray_help(*sub)))
        for args in calls:
            head = args.split(" -- ")[0]  # after "--": the entrypoint, not ray's flags
            for flag in re.findall(r"(?:^|\s)(--?[A-Za-z][\w-]*)", head):
                assert flag in options, f"README: ray {' '.join(sub)} {args}: {flag} is not a flag of this Ray"
                checked += 1
    assert checked >= 10
