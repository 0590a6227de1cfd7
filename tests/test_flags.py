"""Each flag is defined once (study.flags): every study command's parser takes the shared flags and the workloads'
options from there, and the original studies' commands still parse to the arguments their stored studies hold."""

import argparse
import json
import re
from pathlib import Path

import pytest

from study import api, flags, mnist, pcam, steps_study
from study.errors import StudyError
from study.workload import WORKLOADS, resolve

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples/digits_workload.py"
RESOURCES = {"address", "cpus_per_trial", "gpus_per_trial", "max_failures", "max_trials", "name", "num_cpus",
             "resume", "retry_errored", "storage_path", "verbose"}
ORIGINAL_OWN = {"targets", "lr", "lr_grid", "fine_factors", "lr_search_batch", "select_on", "optimizer",  # mnist
                "sgd_lrs", "adam_lrs", "seeds", "no_amp", "checkpoint_every"}  # pcam (its --seeds is a count)


def parser_of(parse_args, argv=()) -> argparse.ArgumentParser:
    """The parser an original study's parse_args builds (it returns only the parsed arguments)."""
    seen = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, argv=None, namespace=None):
        seen["parser"] = self
        return original(self, argv, namespace)

    argparse.ArgumentParser.parse_args = grab
    try:
        parse_args(list(argv))
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen["parser"]


def parsers():
    for name in WORKLOADS:
        workload = resolve(name)
        yield f"run {name}", api.parser(workload), workload
        yield f"steps {name}", steps_study.parser(workload), workload
    yield "study.mnist", parser_of(mnist.parse_args), resolve("mnist-regression")
    yield "study.pcam", parser_of(pcam.parse_args), resolve("pcam")


def test_every_flag_of_every_command_is_the_table_s_or_the_workload_s_option():
    for command, parser, workload in parsers():
        options = {o.name: o for o in workload.options}
        for action in parser._actions:
            dest = action.dest
            if not action.option_strings or dest == "help" or dest in RESOURCES:
                continue
            if command.startswith("study.") and dest in ORIGINAL_OWN:
                continue
            assert action.option_strings == [flags.flag(dest)], (command, action.option_strings)
            if dest in flags.FLAGS:
                table = flags.FLAGS[dest]
                if table.get("action") == "store_true":
                    assert isinstance(action, argparse._StoreTrueAction), (command, dest)
                    continue
                for key in ("type", "nargs", "choices"):
                    assert getattr(action, key) == table.get(key), (command, dest, key)
            elif dest in options:
                o = options[dest]
                assert action.type == (None if o.type is bool else o.type), (command, dest)
                assert tuple(action.choices or ()) == o.choices, (command, dest)
            else:
                assert command.startswith("steps") or dest == "lr_search", (command, dest)


def test_every_flag_of_every_command_has_a_help():
    from analysis import report

    commands = [(command, parser) for command, parser, _ in parsers()]
    commands += [("run " + EXAMPLE, api.parser(resolve(str(ROOT / EXAMPLE)))),
                 ("steps " + EXAMPLE, steps_study.parser(resolve(str(ROOT / EXAMPLE)))),
                 ("analysis.report", parser_of(report.parse_args, ["STUDY"]))]
    for command, parser in commands:
        for action in parser._actions:
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, \
                (command, action.option_strings or action.dest)
        parser.format_help()  # every help formats (a bare % in one raises here)


def test_no_command_defines_a_shared_flag_again():
    pattern = re.compile(r"add_argument\(\s*\"--([a-z0-9-]+)\"")
    for path in [ROOT / "study" / f for f in ("api.py", "steps_study.py", "mnist.py", "pcam.py")]:
        for name in pattern.findall(path.read_text()):
            key = name.replace("-", "_")
            if path.name == "pcam.py" and key == "seeds":
                continue  # the original's --seeds N (a count), not the table's list of seeds
            assert key not in flags.FLAGS, f"{path.name} defines --{name} itself"


@pytest.mark.parametrize("study, parse_args", [("mnist", mnist.parse_args), ("pcam", pcam.parse_args)])
def test_the_original_studies_parse_to_the_arguments_their_stored_studies_hold(study, parse_args):
    stored = json.loads((ROOT / "tests" / "data" / f"{study}-v1" / "study.json").read_text())["args"]
    parsed = vars(parse_args(["--smoke", "--batch-sizes", *map(str, stored["batch_sizes"]), "--num-cpus", "2"]
                             + (["--optimizers", "sgd"] if study == "pcam" else ["--targets", "mean", "--runs", "1"])))
    assert set(parsed) == set(stored)
    differ = {k for k in stored if parsed[k] != stored[k]}
    assert differ <= {"name", "storage_path"}, {k: (stored[k], parsed[k]) for k in differ}


@pytest.mark.parametrize("name, value, message", [("epochs", 0, "--epochs must be >= 1, got 0"),
                                                  ("momentum", 1.0, "--momentum must be a finite number in [0, 1)"),
                                                  ("lrs", [0.1, 0.0], "--lrs must be > 0, got 0.0"),
                                                  ("noise_every", 0, "--noise-every must be >= 1"),
                                                  ("weight_decay", float("nan"), "--weight-decay must be a finite"),
                                                  ("seeds", [1, 1], "--seeds lists 1 more than once")])
def test_check_refuses_values_out_of_the_table_s_ranges(name, value, message):
    with pytest.raises(StudyError) as err:
        flags.check(argparse.Namespace(**{name: value}))
    assert message in str(err.value)
    flags.check(argparse.Namespace(seeds=3, epochs=None))  # a count (study.pcam's --seeds) and an unset flag pass


def test_an_option_with_choices_refuses_others(capsys):
    workload = resolve("mnist-regression")
    with pytest.raises(SystemExit):
        api.parser(workload).parse_args(["mnist-regression", "--target", "mode"])
    assert "invalid choice: 'mode'" in capsys.readouterr().err
    with pytest.raises(StudyError, match="option target must be one of mean, median, std, var"):
        workload.option_values({"target": "mode"})
