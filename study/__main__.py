"""`python -m study run WORKLOAD [flags]`: a batch-size study of a shipped workload, a workload file or
module:name (`python -m study run WORKLOAD --help` lists its flags); `python -m study steps WORKLOAD [flags]`: the
steps-to-result study of it (study.commands.steps_study); `python -m study list`: the shipped ones; `python -m study
--help`: the commands. Installed, `batchsize-study` is the same command line. Each paper package under study/ has its
own command line, `python -m study.<paper>` (listed by --help).
"""

import argparse
import sys

from study.errors import StudyError

# The commands; each parses its own flags (run and steps only once the workload, whose options join them, is known).
COMMANDS = {"run": "a batch-size study of a workload (run WORKLOAD --help: its flags)",
            "steps": "the steps-to-result study of a workload (steps WORKLOAD --help: its flags)",
            "list": "the shipped workloads"}


def paper_commands() -> list[str]:
    """The packages under study/ with a command line of their own (a __main__ module): the papers' studies."""
    import importlib.util
    import pkgutil
    from pathlib import Path

    return [f"study.{i.name}" for i in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name)
            if i.ispkg and importlib.util.find_spec(f"study.{i.name}.__main__") is not None]


def parser() -> argparse.ArgumentParser:
    """`python -m study --help`: the commands (`batchsize-study` once installed)."""
    p = argparse.ArgumentParser(prog="python -m study", description="Batch-size studies of a workload on Ray Tune.",
                                epilog="A command's flags: python -m study run WORKLOAD --help (steps alike). "
                                       + " and ".join(f"python -m {m}" for m in paper_commands())
                                       + " run the papers' original studies; python -m analysis.report STUDY "
                                         "writes a study's report.")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, description=text)
    return p


def list_workloads() -> int:
    from study.workload import WORKLOADS, resolve

    for name in WORKLOADS:
        print(f"{name:<18} {resolve(name).summary}")
    return 0


def study_command(name: str, argv: list[str]) -> int:
    """run or steps: the workload's own flags join the command's parser, so it is resolved first (--help without
    one shows the engine's)."""
    import importlib

    from study.workload import resolve

    module = importlib.import_module({"run": "study.commands.run_command", "steps": "study.commands.steps_study"}[name])
    spec = argv[0] if argv and not argv[0].startswith("-") else None
    if spec is None:
        module.parser().parse_args(argv)
    workload = resolve(spec)
    return module.execute(module.parser(workload).parse_args(argv), workload)[0]


def main(argv=None) -> int:
    """The command line (`python -m study`, the `batchsize-study` script): the command's exit status; 2 for input
    it refuses (one line on stderr); --help prints the commands and exits 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] in (["run"], ["steps"]):
            return study_command(argv[0], argv[1:])
        parser().parse_args(argv)  # list, or --help, or a usage error (exit 2)
        return list_workloads()
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
