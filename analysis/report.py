"""Tables and charts from what a study stored: `python -m analysis.report EXPERIMENT_DIR [--out DIR]`.

EXPERIMENT_DIR is the study folder `<storage-path>/<name>` (or one stage folder inside it), a local path or any
URI pyarrow reads (file://..., s3://bucket/prefix/name). The report goes to --out (default EXPERIMENT_DIR/report
for local folders; required for remote ones): report.md with every figure (PNG) and table (CSV) next to it.
It only reads: running it again on the same results writes the same bytes, and it runs no code found in the study
folder (Tune's snapshot is read as plain JSON; a workload's own report section runs only with --workload-section).
A study still running is reported as far as it got, marked partial.
"""

import argparse
import json
import sys
from pathlib import Path

import pyarrow.fs as pafs

from analysis import steps_report, workload_report
from analysis.common import write_failures, write_timing
from analysis.figures import ReportWriter
from analysis.load import WORKLOAD_FILE, Study, open_study, resolve
from analysis.papers import paper
from study.commands.cli_checks import check_uri
from study.errors import StudyError

OUTCOMES = ("done", "no result", "diverged", "error", "incomplete", "running", "pending")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment_dir", metavar="EXPERIMENT_DIR", help="the study folder, <storage-path>/<name>")
    p.add_argument("--out", default=None, help="local folder for the report (default: EXPERIMENT_DIR/report)")
    p.add_argument("--workload-section", nargs="?", const="", default=None, metavar="MODULE:FUNCTION|FILE.py:FUNCTION",
                   help="also run a workload's own report section: alone, the one workload.json names, imported "
                        "from installed packages only (never the current folder); with a value, that function of "
                        "an installed module or of a file of yours. Off by default: a study folder is data, and the "
                        "report runs no code it names")
    return p.parse_args(argv)


def output_dir(study: Study, experiment_dir: str, out: str | None) -> Path:
    """The report's folder, created and checked writable (an OSError here is the user's path, said in one line)."""
    if out:
        folder = Path(out).expanduser()
    elif not isinstance(study.fs, pafs.LocalFileSystem):
        raise StudyError(f"{experiment_dir} is remote; pass --out DIR for the report (a local folder)")
    else:
        folder = Path(resolve(experiment_dir)[1]) / "report"
    flag = "--out" if out else "the default report folder"
    if folder.exists() and not folder.is_dir():
        raise StudyError(f"{flag} {folder} is a file; pass a folder for the report")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise StudyError(f"cannot write the report into {folder} ({err.strerror or err}); pass a writable --out "
                         f"folder")
    return folder


def write_header(report: ReportWriter, study: Study) -> None:
    own = steps_report if study.kind == "steps" else workload_report
    title = paper(study.kind).TITLE if paper(study.kind) else own.title(study)
    report.heading(f"{title}: report", level=1)
    report.text(f"Study folder: `{study.uri}`" + (f" (stage {study.only_stage} only)" if study.only_stage else ""))
    reasons = study.partial_reasons()
    if reasons:
        report.text("**PARTIAL RESULTS**: the study has not finished (" + "; ".join(reasons) + "). Everything "
                    "below covers what was stored so far.")
    facts = [f"code version: {study.meta.get('code_version', 'unknown')}"]
    if study.meta.get("data"):
        facts.append("data: " + json.dumps(study.meta["data"], sort_keys=True))
    if study.meta.get("resources_per_trial"):
        facts.append("resources per trial: " + json.dumps(study.meta["resources_per_trial"], sort_keys=True))
    if study.args:
        facts.append("arguments: `" + json.dumps(study.args, sort_keys=True, default=str) + "`")
    else:
        facts.append("no study.json: a bare Tune experiment; the study kind was inferred from its trial configs")
    report.bullets(facts)
    import pandas as pd

    rows = []
    for stage in sorted(set(study.stages) | set(study.expected_stages())):
        outcomes = [t.outcome for t in study.trials(stage)]
        rows.append({"stage": stage, "trials": len(outcomes), **{o: outcomes.count(o) for o in OUTCOMES}})
    report.table("stages", pd.DataFrame.from_records(rows), "Trials per stage and how they ended")
    recovered = [f"{t.stage} {t.trial_id}: {t.recovered} (last error: {t.error})" for t in study.trials()
                 if t.recovered]
    if recovered:
        report.text(f"{len(recovered)} trial(s) failed and were restarted by Tune from their last checkpoint; each "
                    f"is counted by how it ended:")
        report.bullets(recovered)
    corrupt = study.corrupt_lines()
    if corrupt:
        report.text(f"**{len(corrupt)} corrupt result line(s)**, skipped; every other row of those trials is used:")
        report.bullets(corrupt)
    if study.unreadable:
        report.text(f"**{len(study.unreadable)} stored file(s) could not be read**; everything else is reported:")
        report.bullets(study.unreadable)


MANIFEST = ".report-files"  # the figures and tables the last run wrote


def build(study: Study, out: Path, section: str | None = None) -> Path:
    """Write the whole report for a loaded study into `out`; returns the path of report.md. `section`: the
    --workload-section asked for (None: not asked)."""
    report = ReportWriter(out)
    write_header(report, study)
    # A paper's study (analysis.papers) and a steps study have their own sections; any other study is a workload's.
    own = paper(study.kind) or (steps_report if study.kind == "steps" else None)
    if own is None:
        workload_report.write(report, study, section)
    else:
        own.write(report, study)
    labels = own.LABELS if own is not None else workload_report.labels(study)
    write_timing(report, study, labels)
    write_failures(report, study, labels)
    # Files an earlier run of the report wrote (listed in its manifest) and this one did not are stale; nothing
    # else in `out` is ever touched.
    manifest = out / MANIFEST
    written = sorted(report.figures + report.tables)
    earlier = manifest.read_text().split() if manifest.is_file() else []
    path = report.finish()
    for name in earlier:
        if name not in written and Path(name).name == name and (out / name).is_file():
            (out / name).unlink()
    manifest.write_text("\n".join(written) + "\n")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_uri(args.experiment_dir, "EXPERIMENT_DIR")
        check_section(args.workload_section)
        study = open_study(args.experiment_dir)
        path = build(study, output_dir(study, args.experiment_dir, args.out), args.workload_section)
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in study.unreadable:
        print(f"warning: {line}", file=sys.stderr)
    corrupt = study.corrupt_lines()
    for line in corrupt:
        print(f"warning: {line}", file=sys.stderr)
    if corrupt:
        print(f"warning: {len(corrupt)} corrupt result line(s) skipped (listed in the report)", file=sys.stderr)
    hook = study.files.get(WORKLOAD_FILE, {}).get("report") if study.kind == "workload" else None
    if hook and args.workload_section is None:
        print(f"note: the workload's own report section {hook} was not run: pass --workload-section to run it "
              f"from an installed package", file=sys.stderr)
    print(f"report: {path}")
    return 0


def check_section(section: str | None) -> None:
    """--workload-section's value: MODULE:FUNCTION, or FILE.py:FUNCTION of a file that exists."""
    if not section:
        return
    where, _, name = section.rpartition(":")
    if not where or not name:
        raise StudyError(f"--workload-section {section}: pass MODULE:FUNCTION (an installed module) or "
                         f"FILE.py:FUNCTION")
    if workload_report.section_file(section) and not Path(where).is_file():
        raise StudyError(f"--workload-section {section}: there is no file {where}; pass FILE.py:FUNCTION of a file "
                         f"of yours, or MODULE:FUNCTION of an installed module")


if __name__ == "__main__":
    sys.exit(main())
