"""The device check: what one GPU machine runs, in one go, to turn the CUDA paths into verified figures.

    python benchmarks/gpu_check.py OUT_DIR [--dry-run] [--mnist-dir .device-data/mnist] [--wheels .whl]

Parts, in order, each a subprocess with its own time cap (seconds), so one that fails or hangs still leaves the
others' figures:
  install     the carried wheels (../shared/tools/device-wheels.sh makes .whl/: Ray, tensorboardX, jsonschema)
              into --site (default /tmp/gpu-check-site), put on PYTHONPATH for the parts after it
  versions    GPU, driver, torch, CUDA, cuDNN, Ray
  cuda_tests  pytest -m cuda on CUDA_TEST_FILES (the CUDA paths: caps, uploads and pinned streaming, OOM, RNG
              resume, fp32 logits, augmentation on the device, a noise probe without host syncs); fails unless
              every selected test passed (one skipped means the GPU was not seen)
  mnist       benchmarks/mnist_trial.py at batch 16: the trial vs the classic per-item DataLoader loop (goal >= 10x)
  tf32        benchmarks/tf32_effect.py: the MNIST variance regression's test MSE with TF32 off and on
  packing     benchmarks/tune_packing.py: a Ray Tune grid, 8 trials at 0.125 GPU vs one at a time (goal >= 3x)
  pcam        benchmarks/pcam_train.py at batch 512, alone and 4 packed: vs an fp32 DataLoader loop (goal >= 5x),
              each trial's peak GPU memory (at batch 512), model FLOP utilisation in bf16, one process's CUDA
              context
  checkpoint  benchmarks/checkpoint_cost.py: checkpoint seconds against epoch seconds
It writes OUT_DIR/gpu_check.log (every part's command and output) and OUT_DIR/summary.json (per part: status
ok|failed|timeout|skipped, seconds, cap, and the figures parsed from its output). Exit status 0 when every part
that ran passed. The caps add up to at most CAPS_TOTAL_S, so the whole check fits a 10-minute call. MNIST: the
four idx files in --mnist-dir (copy ../shared/data/mnist there; without them the MNIST parts use synthetic
digits). PCam patches are generated on the machine.
--dry-run runs every part tiny on CPU (no install): the test suite runs it, so the check keeps working.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CUDA_TEST_FILES = ("tests/test_cuda.py", "tests/test_augment.py", "tests/test_noise.py")
CAPS_TOTAL_S = 570  # a 10-minute device call, less Python's start-up and the transfers


def parts(args) -> list[dict]:
    """(name, cap seconds, command, figure parser) of every part; tiny CPU versions with --dry-run."""
    dry = args.dry_run
    mnist = ["--data-dir", str(args.mnist_dir)] if (args.mnist_dir / "train-images-idx3-ubyte.gz").exists() or \
        (args.mnist_dir / "train-images-idx3-ubyte").exists() else []
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    install = None if dry or not wheels else [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                              "--no-compile", "--upgrade", "--target", str(args.site),
                                              *map(str, wheels)]
    versions = [PY, "-c", VERSIONS]
    bench = lambda script: [PY, str(ROOT / "benchmarks" / script)]  # noqa: E731
    device = ["--device", "cpu"] if dry else ["--device", "cuda"]
    return [
        # Ray's wheel unpacks to ~200 MB.
        dict(name="install", cap=60, cmd=install, parse=lambda text: {}),
        dict(name="versions", cap=15 if not dry else 120, cmd=versions, parse=parse_versions),  # dry: imports on busy shared cores
        dict(name="cuda_tests", cap=75 if not dry else 180,
             cmd=[PY, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                  *(str(ROOT / f) for f in CUDA_TEST_FILES)],
             parse=parse_pytest, check=None if dry else all_selected_passed),
        dict(name="mnist", cap=60 if not dry else 240,
             cmd=bench("mnist_trial.py") + mnist + device + (["--train-limit", "256", "--test-limit", "256", "--epochs",
                                                              "1", "--batch-size", "64"] if dry else
                                                             ["--train-limit", "20000", "--epochs", "2",
                                                              "--batch-size", "16"]),
             parse=lambda text: figures(text, mnist_ratio=r"ratio \(classic / project\) at batch \d+: ([\d.]+)x")),
        dict(name="tf32", cap=40 if not dry else 240,
             cmd=bench("tf32_effect.py") + mnist + device + (["--train-limit", "256", "--test-limit", "256", "--epochs",
                                                              "1"] if dry else
                                                             ["--train-limit", "20000", "--epochs", "2"]),
             parse=lambda text: figures(text, mse_change_percent=r"relative to without: ([+-][\d.]+)%",
                                        mse_fp32=r"tf32 off: test MSE ([\d.e+-]+)",
                                        mse_tf32=r"tf32 on : test MSE ([\d.e+-]+)")),
        dict(name="packing", cap=80 if not dry else 600,
             cmd=bench("tune_packing.py") + (["--smoke", "--packed", "2", "--alone", "1", "--epochs", "1",
                                               "--num-cpus", "2", "--batch-size", "64"] if dry else
                                              (mnist or ["--smoke"]) + ["--train-limit", "10000", "--packed", "8",
                                                                         "--alone", "2", "--epochs", "2"]),
             parse=lambda text: figures(text, packed_over_alone=r"ratio packed / alone at batch \d+: ([\d.]+)x wall",
                                        packed_steps_per_s=r"packed: .* = ([\d.e+]+) steps/s",
                                        alone_steps_per_s=r"alone: .* = ([\d.e+]+) steps/s")),
        # Eight cold processes (the project's and the baseline's, alone and four at once), each loading CUDA and
        # autotuning cuDNN for VGG16 (the project's): 4096 patches, 8 steps of 512 an epoch, keep that inside the cap.
        dict(name="pcam", cap=200 if not dry else 900,
             cmd=bench("pcam_train.py") + device + (["--n", "4", "--eval-n", "2", "--batch-size", "2", "--epochs", "1",
                                                     "--packed", "1", "2", "--memory-batch", "4"] if dry else
                                                    ["--n", "4096", "--eval-n", "512", "--batch-size", "512",
                                                     "--epochs", "3", "--packed", "1", "4"]),
             parse=parse_pcam),
        dict(name="checkpoint", cap=40 if not dry else 400,
             cmd=bench("checkpoint_cost.py") + device + (["--optimizer", "sgd", "--batch-size", "2", "--n", "2",
                                                          "--eval-n", "2", "--epochs", "1"] if dry else
                                                         ["--batch-size", "128", "--n", "4096", "--epochs", "2"]),
             parse=parse_checkpoint),
    ]


VERSIONS = """
import platform, shutil, subprocess, torch
if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True)
    print("nvidia-smi", smi.stdout.strip() or smi.stderr.strip())
print("python", platform.python_version())
print("torch", torch.__version__)
print("cuda", torch.version.cuda, "available" if torch.cuda.is_available() else "not available")
print("cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
import ray
print("ray", ray.__version__)
"""


def figures(text: str, **patterns) -> dict:
    out = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, text)
        out[key] = float(match.group(1)) if match else None
    return out


def parse_versions(text: str) -> dict:
    keys = ("nvidia-smi", "python", "torch", "cuda", "cudnn", "gpu", "ray")
    return {k: v.strip() for k, _, v in (line.partition(" ") for line in text.splitlines()) if k in keys}


def parse_pytest(text: str) -> dict:
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|error)",
                                                    text)}


def all_selected_passed(figures: dict) -> str | None:
    """Why a real run's test part fails although pytest exited 0 (None: it passed): every test the marker selected
    must have passed, so tests skipped for want of a GPU, or none selected at all, are a failure."""
    selected = sum(figures.get(k, 0) for k in ("passed", "failed", "skipped", "xfailed", "xpassed", "error"))
    if not selected or figures.get("passed", 0) != selected:
        return f"{figures.get('passed', 0)} of {selected} selected tests passed"
    return None


def parse_pcam(text: str) -> dict:
    out = {}
    for packed, project, ratio in re.findall(r"(\d+) trial\(s\) at once: project +([\d.]+) images/s .* ratio "
                                             r"([\d.]+)x", text):
        out[f"images_per_s_{packed}"], out[f"ratio_{packed}"] = float(project), float(ratio)
    for packed, mfu, memory in re.findall(r"(\d+) at once: model FLOP utilisation ([\d.]+|not measured)[^;]*; "
                                          r"peak GPU memory per trial \(MiB allocated\) ([\d., nai]+)", text):
        out[f"mfu_percent_{packed}"] = float(mfu) if mfu[0].isdigit() else None
        out[f"peak_mib_{packed}"] = [None if v.strip() == "nan" else float(v) for v in memory.split(",")]  # JSON
    match = re.search(r"peak GPU memory of one trial at batch (\d+): (\d+) MiB allocated, (\d+) MiB reserved", text)
    if match:
        out["memory_batch"], out["alone_allocated_mib"], out["alone_reserved_mib"] = map(int, match.groups())
    out.update(figures(text, gflop_per_image=r"model FLOPs per training image: ([\d.]+) GFLOP",
                       cuda_context_mib=r"CUDA context of one trial process: (\d+) MiB"))
    return out


def parse_checkpoint(text: str) -> dict:
    out = {}
    for opt, mb, seconds, epoch, share in re.findall(r"(sgd|adam): checkpoint (\d+) MB in ([\d.]+) s .* epoch of \d+ "
                                                      r"patches at [\d.]+ images/s: ([\d.]+) s \| checkpoint / "
                                                      r"epoch ([\d.e+-]+) %", text):
        out[opt] = {"mb": int(mb), "checkpoint_s": float(seconds), "epoch_s": float(epoch),
                    "percent_of_epoch": float(share)}
    return out


def run_part(part: dict, env: dict, log) -> dict:
    result = {"name": part["name"], "cap_s": part["cap"]}
    if part["cmd"] is None:
        log.write(f"\n=== {part['name']}: skipped (dry run, or no wheels)\n")
        return {**result, "status": "skipped", "seconds": 0.0}
    log.write(f"\n=== {part['name']} (cap {part['cap']} s): {' '.join(part['cmd'])}\n")
    log.flush()
    started = time.perf_counter()
    # Own process group: a part that runs past its cap is stopped with everything it started (its Ray too).
    proc = subprocess.Popen(part["cmd"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=part["cap"])
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        status = "timeout"
    seconds = time.perf_counter() - started
    log.write(text)
    log.write(f"=== {part['name']}: {status}, exit {proc.returncode}, {seconds:.1f} s\n")
    log.flush()
    try:
        parsed = part["parse"](text)
    except (ValueError, IndexError) as err:  # a figure line in an unexpected form: say so, keep the rest
        parsed = {"parse_error": str(err)}
    problem = part.get("check") and status == "ok" and part["check"](parsed)
    if problem:
        status, parsed = "failed", {**parsed, "check": problem}
    print(f"{part['name']:<11} {status:<8} {seconds:6.1f} s  {json.dumps(parsed)}", flush=True)
    return {**result, "status": status, "rc": proc.returncode, "seconds": round(seconds, 1), "figures": parsed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder for gpu_check.log and summary.json (created)")
    p.add_argument("--dry-run", action="store_true", help="every part tiny on CPU, no install")
    p.add_argument("--mnist-dir", type=Path, default=ROOT / ".device-data" / "mnist")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of wheels to install first")
    p.add_argument("--site", default="/tmp/gpu-check-site",
                   help="where the wheels are installed (not under OUT_DIR: only the log and summary go there)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty; name a new folder for this check's log and summary", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}
    paths = [str(ROOT), args.site, env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    summary = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "dry_run": args.dry_run, "parts": []}
    with open(out / "gpu_check.log", "w") as log:
        for part in parts(args):
            summary["parts"].append(run_part(part, env, log))
            (out / "summary.json").write_text(json.dumps(summary, indent=2))  # after every part: a kill keeps some
    failed = [r["name"] for r in summary["parts"] if r["status"] in ("failed", "timeout")]
    print(f"summary: {out / 'summary.json'}; " + (f"failed: {', '.join(failed)}" if failed else "every part passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
