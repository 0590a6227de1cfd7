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
