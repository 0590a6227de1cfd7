"""The rooms' boundaries (docs/development.md): analysis/ takes from study/ only names and readers of the stored
format, so reading a study never loads PyTorch or Ray; metric and stored file names are defined once."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray")

# Imports every analysis module in turn in a fresh interpreter and names the first one after which a heavy
# package is loaded (one interpreter for all: a second per module would cost a second each).
PROBE = """
import importlib, json, sys
loaded = {}
for name in sys.argv[1:]:
    importlib.import_module(name)
    for heavy in %r:
        if heavy in sys.modules and heavy not in loaded:
            loaded[heavy] = name
print(json.dumps(loaded))
""" % (HEAVY,)


def test_no_analysis_module_imports_torch_or_ray():
    modules = sorted(f"analysis.{p.stem}" for p in (ROOT / "analysis").glob("*.py") if p.stem != "__init__")
    assert "analysis.report" in modules and "analysis.noise_figures" in modules
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == {}, "imported by (the first module after which it was loaded)"


def test_stored_names_are_defined_once_in_study_metrics():
    """The names shared by a writer in study/ and a reader in analysis/ are assigned in study/metrics.py only."""
    shared = ("step", "stopped_by_rule.json", "noise_trace", "noise_grad_sq", "steps_to_result", "examples")
    assignment = re.compile(r"^[A-Z_]+\s*=\s*\"(%s)\"" % "|".join(map(re.escape, shared)), re.M)
    for path in [*(ROOT / "study").rglob("*.py"), *(ROOT / "analysis").glob("*.py")]:
        if path.name != "metrics.py":
            assert not assignment.findall(path.read_text()), f"{path.relative_to(ROOT)} defines a study/metrics.py name"


def study_imports() -> dict[str, set[str]]:
    """Every study module -> the study modules it imports, at the top or inside a function (a cycle hidden in a
    function is a cycle all the same: it only waits for the call)."""
    import ast

    modules = {}
    for path in (ROOT / "study").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("study"):
                # `from study import metrics` imports study.metrics; `from study.x import f` imports study.x
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("study")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The graph's strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or v not in component:
                component.add(stack.pop())
            on_stack.difference_update(component)
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_study():
    graph = study_imports()
    assert {"study.engine.loop", "study.engine.bridge"} <= graph["study.engine.run_workload"]  # the graph sees imports
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]  # and the check sees cycles
    assert cycles(graph) == []


def test_one_module_steps_the_optimizer():
    """backward() and the optimizer's step are called in one place in study/: the one training loop."""
    import ast

    calls = {"backward": [], "step": []}
    for path in (ROOT / "study").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in calls:
                calls[node.func.attr].append(str(path.relative_to(ROOT)))
    assert calls == {"backward": ["study/engine/loop.py"], "step": ["study/engine/loop.py"]}


# The packages (docs/development.md, "The map"): the engine and the public names at the top import no command and
# no paper; the commands import no paper; neither paper imports the other. Allowed across: study/__init__'s lazy
# entry points, `python -m study` (__main__) and the three modules at the old paths that stored studies' tuner.pkl files name.
LAYERS = {"engine": 0, "data": 0, "workloads": 0, "top": 0, "commands": 1, "mnist": 2, "pcam": 2}
ENTRY_POINTS = {"study", "study.console", "study.tensorboard", "study.steps_study", "study.__main__"}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else "top"


def test_packages_import_only_downwards():
    graph = study_imports()
    assert {"study.engine.loop", "study.commands.driver", "study.mnist.command", "study.pcam.command"} <= set(graph)
    wrong = sorted(f"{m} -> {d}" for m, deps in graph.items() if m not in ENTRY_POINTS for d in deps
                   if LAYERS[layer(d)] > LAYERS[layer(m)] or (LAYERS[layer(m)] == 2 and layer(d) not in
                                                               (layer(m), *[k for k, v in LAYERS.items() if v < 2])))
    assert wrong == []


# How a module names a paper: its name, its packages, its configs and model.
PAPER_NAMES = re.compile(r"pcam|mnist[-_ ]regression|regression cnn|MnistConfig|PcamConfig|VGG16Patches|"
                         r"study[./](?:mnist|pcam)\b", re.I)


def test_no_module_outside_the_papers_names_one():
    """The engine, the commands, the data readers, the shipped workloads and analysis/ find the papers (study/<paper>
    packages) without naming them: every mention, comment or code, is inside a paper's package."""
    assert PAPER_NAMES.search("the PCam study") and PAPER_NAMES.search("from study.mnist import command")
    assert not PAPER_NAMES.search("study.mnist_cnn and the MNIST digits")
    papers = {ROOT / "study" / "mnist", ROOT / "study" / "pcam"}
    named = [f"{path.relative_to(ROOT)}:{n + 1}" for path in [*(ROOT / "study").rglob("*.py"),
                                                               *(ROOT / "analysis").rglob("*.py")]
             if not papers & set(path.parents)
             for n, line in enumerate(path.read_text().splitlines()) if PAPER_NAMES.search(line)]
    assert named == []


def test_only_a_papers_report_imports_analysis():
    import ast

    importers = set()
    for path in (ROOT / "study").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n == "analysis" or n.startswith("analysis.") for n in names):
                importers.add(str(path.relative_to(ROOT)))
    assert importers == {"study/mnist/report.py", "study/mnist/report_time.py", "study/pcam/report.py",
                         "study/pcam/report_auc.py"}
