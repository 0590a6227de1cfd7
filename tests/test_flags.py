"""Each flag is defined once (study.commands.flags): every study command's parser takes the shared flags and the workloads'
options from there, and the original studies' commands still parse to the arguments their stored studies hold.
On/off flags are --name/--no-name everywhere, their older spellings read as before; `python -m study --help` lists
the commands, and the console script is the same main."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from study.commands import flags

from study.mnist import command as mnist

from study.pcam import command as pcam

from study.commands import run_command

from study.commands import steps_study
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
        yield f"run {name}", run_command.parser(workload), workload
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
            if isinstance(action, flags.OnOff):
                table = flags.FLAGS[dest]
                assert table["action"] is flags.OnOff, (command, dest)
                assert action.option_strings == [flags.flag(dest), "--no-" + flags.flag(dest)[2:]], (command, dest)
                assert (action.on, action.off) == (table.get("on", True), table.get("off", False)), (command, dest)
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
    commands += [("run " + EXAMPLE, run_command.parser(resolve(str(ROOT / EXAMPLE)))),
                 ("steps " + EXAMPLE, steps_study.parser(resolve(str(ROOT / EXAMPLE)))),
                 ("analysis.report", parser_of(report.parse_args, ["STUDY"]))]
    for command, parser in commands:
        for action in parser._actions:
            assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, \
                (command, action.option_strings or action.dest)
        parser.format_help()  # every help formats (a bare % in one raises here)


def test_no_command_defines_a_shared_flag_again():
    pattern = re.compile(r"add_argument\(\s*\"--([a-z0-9-]+)\"")
    for path in [ROOT / "study" / f for f in ("commands/run_command.py", "commands/steps_study.py", "mnist/command.py",
                                                 "pcam/command.py")]:
        for name in pattern.findall(path.read_text()):
            key = name.replace("-", "_")
            if path.parent.name == "pcam" and key in ("seeds", "amp"):
                continue  # the original's --seeds N (a count), and --amp/--no-amp stored inverted as no_amp
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
        run_command.parser(workload).parse_args(["mnist-regression", "--target", "mode"])
    assert "invalid choice: 'mode'" in capsys.readouterr().err
    with pytest.raises(StudyError, match="option target must be one of mean, median, std, var"):
        workload.option_values({"target": "mode"})


ON_OFF = [("--noise-scale", "noise_scale", "on", "off"), ("--tf32", "tf32", True, False)]


@pytest.mark.parametrize("flag, dest, on, off", ON_OFF)
@pytest.mark.parametrize("command", ["run", "steps", "study.mnist", "study.pcam"])
def test_on_off_flags_take_one_style_and_their_old_spellings_store_the_same(command, flag, dest, on, off):
    workload = resolve("mnist-regression" if command == "study.mnist" else "pcam")
    parse = {"run": lambda argv: run_command.parser(workload).parse_args(["pcam", *argv]),
             "steps": lambda argv: steps_study.parser(workload).parse_args(["pcam", *argv]),
             "study.mnist": mnist.parse_args, "study.pcam": pcam.parse_args}[command]
    no = "--no-" + flag[2:]
    for argv, want in [([flag], on), ([no], off), ([flag, "on"], on), ([flag, "off"], off), ([f"{flag}=off"], off),
                       ([no, flag], on), ([flag, "off", flag], on)]:
        assert getattr(parse(argv), dest) == want, (command, argv)
    assert getattr(parse([]), dest) == {"noise_scale": "on", "tf32": False}[dest]


def test_amp_takes_one_style_in_every_command_and_pcam_stores_it_as_before():
    parser = run_command.parser(resolve("mnist-cnn"))
    for argv, want in [(["--amp"], "on"), (["--no-amp"], "off"), (["--amp", "off"], "off"), ([], None)]:
        assert parser.parse_args(["mnist-cnn", *argv]).amp == want, argv  # None: the workload's, filled in later
    for argv, want in [(["--no-amp"], True), (["--amp"], False), ([], False)]:
        assert pcam.parse_args(argv).no_amp is want, argv  # pcam-v1's study.json holds no_amp: False
    assert "[--amp | --no-amp]" in parser.format_usage() and "--amp, --no-amp" in parser.format_help()


def test_an_on_off_flag_refuses_other_values_and_old_spellings_stop_at_a_double_dash(capsys):
    with pytest.raises(SystemExit):
        mnist.parse_args(["--noise-scale", "maybe"])
    assert "unrecognized arguments: maybe" in capsys.readouterr().err
    parser = flags.Parser()
    parser.add_argument("--tf32", action=flags.OnOff)
    assert flags.old_spellings(["--tf32", "off", "--", "--tf32", "on"], parser._actions) == \
        ["--no-tf32", "--", "--tf32", "on"]


def test_python_m_study_help_lists_the_commands_and_refuses_others(capsys):
    from study.__main__ import COMMANDS, main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and set(COMMANDS) == {"run", "steps", "list"}
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), out
    for argv, message in [([], "required: COMMAND"), (["lst"], "invalid choice: 'lst'"), (["list", "x"], "x")]:
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2 and message in capsys.readouterr().err, argv
    assert main(["list"]) == 0 and "mnist-cnn" in capsys.readouterr().out
    shown = subprocess.run([sys.executable, "-m", "study", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "steps" in shown.stdout, shown.stderr


def test_the_console_script_is_the_module_s_main():
    import importlib
    import inspect
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["batchsize-study"].partition(":")
    main = getattr(importlib.import_module(module), name)
    assert module == "study.__main__" and list(inspect.signature(main).parameters) == ["argv"]
    assert main(["list"]) == 0  # an exit status: the script passes it to sys.exit


@pytest.mark.parametrize("run, module", [("run_study", run_command), ("run_steps", steps_study)])
def test_from_python_an_on_off_flag_may_be_a_bool(run, module, monkeypatch):
    seen = {}
    monkeypatch.setattr(module, "execute", lambda args, workload, callbacks: seen.update(vars(args)) or (0, "uri"))
    getattr(module, run)("mnist-cnn", noise_scale=False, tf32=True, **({"amp": True} if run == "run_study" else {}))
    assert (seen["noise_scale"], seen["tf32"], seen.get("amp", "on")) == ("off", True, "on")
    getattr(module, run)("mnist-cnn", noise_scale="off")  # the value the command line stores, as before
    assert seen["noise_scale"] == "off"


@pytest.mark.parametrize("paper", ["study.mnist", "study.pcam"])
def test_a_papers_command_exits_non_zero_on_a_bad_flag(paper):
    """`python -m study.<paper>` runs the package's __main__, which must pass main()'s status on to the shell."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", paper, "--epochs", "0"], cwd=ROOT, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: --epochs"), out.stderr
