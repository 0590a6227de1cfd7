"""`python -m study run WORKLOAD [flags]`: a batch-size study of a shipped workload, a workload file or
module:name (`python -m study run WORKLOAD --help` lists its flags); `python -m study steps WORKLOAD [flags]`: the
steps-to-result study of it (study.steps_study); `python -m study list`: the shipped ones.
`python -m study.mnist` and `python -m study.pcam` run the two original studies.
"""

import sys

from study.errors import StudyError

USAGE = ("usage: python -m study run WORKLOAD [flags] | python -m study steps WORKLOAD [flags] | python -m study list"
         "   (run WORKLOAD --help: its flags)")


def list_workloads() -> int:
    from study.workload import WORKLOADS, resolve

    for name in WORKLOADS:
        print(f"{name:<18} {resolve(name).summary}")
    return 0


def run(argv: list[str]) -> int:
    from study import api
    from study.workload import resolve

    # The workload's own flags join the parser, so it is resolved first (--help without one shows the engine's).
    spec = argv[0] if argv and not argv[0].startswith("-") else None
    if spec is None:
        api.parser().parse_args(argv)
    workload = resolve(spec)
    args = api.parser(workload).parse_args(argv)
    return api.execute(args, workload)[0]


def steps(argv: list[str]) -> int:
    from study import steps_study
    from study.workload import resolve

    spec = argv[0] if argv and not argv[0].startswith("-") else None
    if spec is None:
        steps_study.parser().parse_args(argv)
    workload = resolve(spec)
    args = steps_study.parser(workload).parse_args(argv)
    return steps_study.execute(args, workload)[0]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["list"]:
            return list_workloads()
        if argv[:1] == ["run"]:
            return run(argv[1:])
        if argv[:1] == ["steps"]:
            return steps(argv[1:])
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
