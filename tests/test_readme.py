"""Every command the user documents (README.md and docs/*.md) show parses: `python -m study run|list|steps`, the
two papers' studies and the report against their own parsers, the `ray` commands' flags against the installed Ray
CLI's help. (Running them needs data, AWS or time; the studies themselves are run by the end-to-end tests.)"""

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import report
from study import __main__ as study_main
from study.mnist import command as mnist
from study.pcam import command as pcam

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Shell line continuations joined, so a command split over lines is one.
TEXTS = {path.relative_to(ROOT).as_posix(): re.sub(r"\\\n\s*", " ", path.read_text()) for path in DOCS}
PARSERS = {"study.mnist": mnist.parse_args, "study.pcam": pcam.parse_args, "analysis.report": report.parse_args}
USAGE_WORD = re.compile(r"[A-Z][A-Z_]+$")  # `python -m study run WORKLOAD [flags]`: usage notation, not a command


def commands(program: str) -> list[tuple[str, str]]:
    """(document, args) of each `program ARGS` in the documents: up to a comment, a backtick, a double quote, `&&`
    or the line end ('single-quoted' arguments kept whole)."""
    found = set()
    for name, text in TEXTS.items():
        for args in re.findall(rf"{program}((?:[ \t]+(?!#|&&)(?:'[^']*'|[^\s`\"'])+)*)", text):
            found.add((name, args.strip()))
    return sorted(found)


def argv_of(args: str) -> list[str]:
    return shlex.split(args.replace("[", "").replace("]", ""))  # "[--out DIR]": usage notation for optional


def anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces as dashes."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_the_documents_link_to_files_and_headings_that_exist():
    assert len(DOCS) >= 8, [p.name for p in DOCS]
    for name, text in TEXTS.items():
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
            if "://" in target:
                continue
            path = (ROOT / name).parent.joinpath(target).resolve() if target else ROOT / name
            assert path.exists(), f"{name}: broken link {target}"
            if anchor:
                assert anchor in anchors(path.read_text()), f"{name}: no heading #{anchor} in {target or name}"


@pytest.mark.parametrize("module", sorted(PARSERS))
def test_study_and_report_commands_parse(module):
    found = [(name, args) for name, args in commands(rf"python -m {re.escape(module)}") if args]  # bare: prose
    assert found, f"no document shows a python -m {module} command"
    for name, args in found:
        try:
            PARSERS[module](argv_of(args))
        except SystemExit as err:
            pytest.fail(f"{name}: python -m {module} {args} -> exit {err.code}")


class Parsed(BaseException):
    """Raised once the program's parser accepted the arguments: nothing after parsing runs."""


def parse_with_main(program: str, argv: list[str], monkeypatch, capsys) -> str:
    """What `python -m study PROGRAM ARGV` makes of its arguments, through study/__main__.py itself: "parsed" or
    an error."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    capsys.readouterr()
    try:
        code = study_main.main([program, *argv])
    except Parsed:
        return "parsed"
    except SystemExit as err:
        return "parsed" if err.code == 0 else f"exit {err.code}: {capsys.readouterr().err.strip()[-300:]}"
    finally:
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", original)
    err = capsys.readouterr().err
    return f"exit {code} before parsing: {err.strip()[-300:]}"


@pytest.mark.parametrize("program", ["run", "steps"])
def test_study_program_commands_parse(program, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # a workload given as a file is a path from the repository root
    found = [(name, args) for name, args in commands(rf"python -m study {program}")
             if args and not USAGE_WORD.match(args.split()[0])]  # bare: the program named in prose
    assert found, f"no document shows a python -m study {program} command"
    for name, args in found:
        outcome = parse_with_main(program, argv_of(args), monkeypatch, capsys)
        assert outcome == "parsed", f"{name}: python -m study {program} {args} -> {outcome}"


def test_study_list_commands_run(capsys):
    found = commands(r"python -m study list")
    assert found, "no document shows python -m study list"
    for name, args in found:
        assert not args, f"{name}: python -m study list takes no arguments, shown with {args!r}"
    assert study_main.main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in ("mnist-cnn", "cifar10-resnet8", "mnist-regression", "pcam"):
        assert name in listed


def ray_help(*subcommand: str) -> str:
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *subcommand, "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_python_imports_in_the_documents_exist():
    """Each `import X` and `from X import Y` of a ```python block imports (the README's MLflow callback: Ray's own
    class, which imports without mlflow)."""
    import importlib

    found = 0
    for name, text in TEXTS.items():
        for block in re.findall(r"```python\n(.*?)```", text, re.S):
            for module, names in re.findall(r"^from ([\w.]+) import ([\w, ]+)$", block, re.M):
                for item in names.split(","):
                    assert hasattr(importlib.import_module(module), item.strip()), (name, module, item)
                    found += 1
            for module in re.findall(r"^import ([\w.]+)$", block, re.M):
                importlib.import_module(module)
    assert found  # the README's example is among them


def test_ray_commands_use_flags_that_exist():
    checked = 0
    for sub in (["up"], ["down"], ["exec"], ["attach"], ["job", "submit"], ["job", "logs"]):
        calls = commands("ray " + " ".join(sub))
        assert calls, f"no document shows ray {' '.join(sub)}"
        options = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", ray_help(*sub)))
        for name, args in calls:
            head = args.split(" -- ")[0]  # after "--": the entrypoint, not ray's flags
            for flag in re.findall(r"(?:^|\s)(--?[A-Za-z][\w-]*)", head):
                assert flag in options, f"{name}: ray {' '.join(sub)} {args}: {flag} is not a flag of this Ray"
                checked += 1
    assert checked >= 10
