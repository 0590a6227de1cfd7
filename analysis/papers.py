"""The studies from before workloads, each with a report of its own: found among study/'s packages, never named.

A package under study/ is a paper when it has a `report` module that declares what a reader needs to know of its
studies: KIND (study.json's "study" value), TITLE, STAGES (its Tune experiments, in order), LABELS (a trial's
identifying config keys), DETECT (a config key only its trials carry: a bare Tune experiment without study.json is
recognised by it), `stages(args)` (the stages a study with these arguments runs) and `write(report, study)` (its
sections). Analysis imports only that module of a paper; it imports analysis, pandas and matplotlib, never PyTorch
or Ray (tests/test_boundaries.py). The engine and the commands name no paper either (the same test)."""

import importlib
import importlib.util
import pkgutil
from functools import cache

import study

DECLARED = ("KIND", "TITLE", "STAGES", "LABELS", "DETECT", "stages", "write")


@cache
def papers() -> dict:
    """KIND -> the paper's report module, for every package under study/ that has one declaring DECLARED."""
    found = {}
    for info in sorted(pkgutil.iter_modules(study.__path__), key=lambda i: i.name):
        name = f"study.{info.name}.report"
        # find_spec imports the package itself (its __init__, which imports nothing), not its modules.
        if not info.ispkg or importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        if all(hasattr(module, attr) for attr in DECLARED):
            found[module.KIND] = module
    return found


def paper(kind: str):
    """The report module of a paper's study kind, or None for a workload or steps study."""
    return papers().get(kind)
