"""The CUDA paths' decisions, given their inputs on CPU: memory caps and uploads, out-of-memory, fp32 evaluation
logits, the CUDA RNG in the checkpoint, per-trial CUDA switches, checkpoint frequency."""

import tempfile
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from study.engine import memory
from study import metrics as M
from study.engine import bridge
from study.pcam import trainable as trainables
from study.engine.train import rng_state, set_rng_state
from study.pcam.model import eval_logits

GIB = 2**30


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA GPU of `fake_gpu.total` bytes as a trial sees it, on CPU: torch's own Python entry points run (their
    device-index checks included); only the C calls under them are stubbed. `fake_gpu.calls` lists what reached the
    allocator: ("fraction", fraction, device index), ("empty_cache",)."""
    gpu = SimpleNamespace(total=80 * GIB, calls=[])
    for module in (torch.cuda, torch.cuda.memory):
        monkeypatch.setattr(module, "_lazy_init", lambda: None)
        monkeypatch.setattr(module, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_setMemoryFraction",
                        lambda fraction, index: gpu.calls.append(("fraction", fraction, index)), raising=False)
    monkeypatch.setattr(torch._C, "_cuda_emptyCache", lambda: gpu.calls.append(("empty_cache",)), raising=False)
    monkeypatch.setattr(torch._C, "_cuda_resetPeakMemoryStats", lambda index: None, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(
        total_memory=gpu.total))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (gpu.total, gpu.total))
    # configure_cuda sets these: put them back afterwards, by hand. torch serves cuda.matmul's flags through
    # __getattr__, which monkeypatch (pytest >= 9) records as unset and deletes on undo; that AttributeError
    # stopped the undo and left CUDA stubbed as available for the rest of the session.
    flags = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cudnn, "benchmark")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in flags]
    yield gpu
    for owner, name, value in saved:
        setattr(owner, name, value)


def run_trial(monkeypatch, share: float) -> tuple[list, list]:
    """train_pcam as Tune runs it with `share` of a GPU, up to run_pcam: (run_pcam's calls, the rows reported)."""
    import ray

    resources = {"CPU": torch.get_num_threads(), "GPU": share}
    context = SimpleNamespace(get_trial_resources=lambda: SimpleNamespace(required_resources=resources))
    monkeypatch.setattr(bridge.tune, "get_context", lambda: context)
    monkeypatch.setattr(bridge.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    runs, rows = [], []
    monkeypatch.setattr(trainables, "run_pcam", lambda cfg, features, device, report, start, **kw: runs.append(
        dict(device=device, **kw)))
    monkeypatch.setattr(bridge.tune, "report", lambda metrics, checkpoint=None: rows.append(metrics))
    trainables.train_pcam({"batch_size": 64, "data_dir": "unread"}, {"features": None})
    return runs, rows


def test_a_packed_trial_caps_its_allocator_on_its_device_and_trains(fake_gpu, monkeypatch):
    runs, rows = run_trial(monkeypatch, 0.25)
    assert rows == []  # no out-of-memory row: the trial went on to train
    [(_, fraction, index)] = [c for c in fake_gpu.calls if c[0] == "fraction"]
    assert index == 0 and 0 < fraction < 0.25
    [run] = runs
    assert run["device"] == torch.device("cuda", 0) and run["packed"]
    assert run["memory_budget"] == int(fraction * fake_gpu.total)
    # The last trial's cached blocks, in a reused worker, are released before the cap is set.
    assert fake_gpu.calls[0] == ("empty_cache",)


def test_a_share_smaller_than_a_cuda_context_ends_the_trial_with_advice(fake_gpu, monkeypatch):
    runs, rows = run_trial(monkeypatch, 0.005)
    assert runs == [] and [r[M.STATUS] for r in rows] == [M.STATUS_OOM]
    assert "larger --gpus-per-trial" in rows[0][M.MESSAGE]


def test_another_error_from_the_cap_is_not_called_out_of_memory(fake_gpu, monkeypatch):
    def refuse(fraction, index):
        raise ValueError("invalid device")

    monkeypatch.setattr(torch._C, "_cuda_setMemoryFraction", refuse, raising=False)
    runs, rows = run_trial(monkeypatch, 0.25)  # the same error again on a retry: it ends the trial, unretried
    assert runs == [] and [r[M.STATUS] for r in rows] == [M.STATUS_ERROR]
    assert rows[0][M.MESSAGE].startswith("ValueError: invalid device")


@pytest.mark.parametrize("share", [0.125, 0.25, 0.5])
@pytest.mark.parametrize("total_gib", [24, 80, 141])
def test_the_cap_on_the_allocator_is_the_budget_and_packed_trials_fit_the_card(fake_gpu, share, total_gib):
    fake_gpu.total = total_gib * GIB
    budget = memory.cap_memory(torch.device("cuda"), share)  # a bare "cuda" (the benchmarks' device) too
    [(_, fraction, index)] = fake_gpu.calls
    assert index == 0 and budget == int(fraction * fake_gpu.total)
    # 1/share such trials and their CUDA contexts fit the card, and each keeps most of its share.
    assert round(1 / share) * (budget + memory.CUDA_CONTEXT_BYTES) <= fake_gpu.total
    assert budget > 0.5 * share * fake_gpu.total
    # A whole card: its free memory, and no cap left from the last trial of a reused worker.
    assert memory.cap_memory(torch.device("cuda", 0), 1.0) == fake_gpu.total
    assert fake_gpu.calls[1:] == [("fraction", 1.0, 0)]


def test_packed_trials_never_upload_their_own_copy():
    # The case: 0.125 of an 80 GB card and PCam's 8.4 GiB of training patches.
    splits = {"train": 262_144 * 96 * 96 * 3, "val": 32_768 * 96 * 96 * 3, "test": 32_768 * 96 * 96 * 3}
    budget = int(memory.allocator_fraction(0.125, 80 * GIB) * 80 * GIB)
    assert memory.plan_uploads(splits, budget_bytes=budget, needs_bytes=GIB, packed=True) == dict.fromkeys(splits,
                                                                                                           False)


def test_uploads_are_decided_against_the_budget_less_what_training_needs():
    splits = {"train": 8 * GIB, "val": 1 * GIB, "test": 1 * GIB}
    plan = lambda budget, needs: memory.plan_uploads(splits, budget_bytes=budget, needs_bytes=needs, packed=False)
    assert plan(20 * GIB, 5 * GIB) == {"train": True, "val": True, "test": True}
    assert plan(12 * GIB, 5 * GIB) == {"train": False, "val": True, "test": True}  # train would leave too little
    assert plan(9 * GIB, 8 * GIB) == {"train": False, "val": True, "test": False}
    assert plan(None, 0) == {"train": False, "val": False, "test": False}  # CPU


def test_activation_bytes_count_saved_tensors_frozen_temporaries_and_evaluation():
    # Conv saves its input (3 channels), ReLU its output (8 channels); at ReLU the conv's output (8) is live too.
    # fp32, 16x16; weights are not per image.
    image = 16 * 16 * 4
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    assert memory.activation_bytes_per_image(model, torch.randn(4, 3, 16, 16)) == (
        (3 + 8) * image, (3 + 8 + 8) * image, (8 + 8) * image)
    # Frozen: nothing saved, but the forward still holds a layer's input and output at once.
    frozen = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1).requires_grad_(False), nn.ReLU())
    assert memory.activation_bytes_per_image(frozen, torch.randn(4, 3, 16, 16)) == (0, 16 * image, 16 * image)


def test_the_measurement_leaves_cudnn_autotuning_off_and_restores_it(monkeypatch):
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return x * 2

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    memory.activation_bytes_per_image(Probe(), torch.randn(4, 3))
    assert seen and not any(seen)  # throwaway shapes are not autotuned
    assert torch.backends.cudnn.benchmark


def test_training_bytes_grow_with_the_batch_the_optimizer_state_and_the_evaluation_batch():
    model = nn.Linear(1000, 1000)  # 1,001,000 fp32 parameters
    per_image = memory.PerImage(saved=1000, train_peak=1500, eval_peak=600)
    sgd, adam = (memory.training_bytes(model, o, 32, per_image) for o in ("sgd", "adam"))
    assert adam - sgd == 1_001_000 * 4  # Adam's second moment
    assert memory.training_bytes(model, "sgd", 64, per_image) - sgd == memory.ACTIVATION_FACTOR * 1000 * 32
    frozen_heavy = per_image._replace(train_peak=5000)  # a frozen block's temporaries outweigh the saved tensors
    assert memory.training_bytes(model, "sgd", 32, frozen_heavy) - sgd == (5000 - 2000) * 32
    # Evaluating 512 images at once holds more than a training step of 32: the larger one counts.
    assert memory.training_bytes(model, "sgd", 32, per_image, eval_batch_size=512) - sgd == 600 * 512 - 2000 * 32
    assert memory.training_bytes(model, "sgd", 32, per_image, eval_batch_size=64) == sgd


class Oom(RuntimeError):
    pass


def test_out_of_memory_frees_the_trials_tensors_before_it_reports(monkeypatch):
    held = {}

    @bridge.trial_entry
    def train(config, data):
        big = torch.ones(1 << 20)
        held["ref"] = weakref.ref(big)
        bridge.report({M.EPOCH: 0, M.STATUS: M.STATUS_RUNNING}, {})
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    rows = []
    alive_at_report = []

    def fake_report(metrics, checkpoint=None):
        rows.append(metrics)
        if metrics.get(M.STATUS) == M.STATUS_OOM:
            alive_at_report.append(held["ref"]() is not None)

    monkeypatch.setattr(bridge.tune, "report", fake_report)
    monkeypatch.setattr(bridge.tune.Checkpoint, "from_directory", staticmethod(lambda folder: folder))
    train({"batch_size": 256}, None)
    assert [r[M.STATUS] for r in rows] == [M.STATUS_RUNNING, M.STATUS_OOM]
    assert rows[-1][M.EPOCH] == 1  # failed during epoch 1, after epoch 0 was reported
    assert alive_at_report == [False]


def test_other_errors_are_errors_not_out_of_memory(monkeypatch):
    @bridge.trial_entry
    def train(config, data):
        raise Oom("not CUDA")

    rows = []
    monkeypatch.setattr(bridge.tune, "get_context", lambda: SimpleNamespace())  # no trial folder
    monkeypatch.setattr(bridge.tune, "report", lambda metrics, checkpoint=None: rows.append(metrics))
    train({"batch_size": 1}, None)
    assert [r[M.STATUS] for r in rows] == [M.STATUS_ERROR] and "not CUDA" in rows[0][M.MESSAGE]


def test_checkpoints_every_n_epochs_and_always_at_the_ends(monkeypatch):
    saved = []
    monkeypatch.setattr(bridge.tune, "report",
                        lambda metrics, checkpoint=None: saved.append((metrics[M.EPOCH], checkpoint is not None)))
    monkeypatch.setattr(bridge.tune.Checkpoint, "from_directory", staticmethod(lambda folder: folder))
    for epoch in range(8):
        status = M.STATUS_DONE if epoch == 7 else M.STATUS_RUNNING
        bridge.report({M.EPOCH: epoch, M.STATUS: status}, {"epoch": epoch}, every=3)
    assert [e for e, checkpointed in saved if checkpointed] == [0, 3, 6, 7]
    assert [e for e, _ in saved] == list(range(8))


def distinct_probabilities(logits_fn, n=32_768):
    """Features spread so the logits are ~N(0, 3^2), as a trained PCam model's are."""
    torch.manual_seed(0)
    model = nn.Module()
    model.features = nn.Identity()
    model.head = nn.Linear(64, 1)
    with torch.no_grad():
        model.head.weight.copy_(torch.full((1, 64), 3 / 8))
        model.head.bias.zero_()
    x = torch.randn(n, 64)
    with torch.no_grad():
        p = torch.sigmoid(logits_fn(model, x).float().reshape(-1)).numpy().astype(np.float64)
    return len(np.unique(p))


def test_evaluation_logits_are_fp32_under_bf16_autocast():
    def bf16_everywhere(model, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model.head(model.features(x))

    before = distinct_probabilities(bf16_everywhere)
    after = distinct_probabilities(lambda model, x: eval_logits(model, x, torch.bfloat16))
    assert before < 4_000  # bf16 logits: a few thousand values for 32,768 images
    assert after > 30_000  # fp32 logits: nearly every image its own probability


def test_cuda_rng_travels_in_the_checkpoint_state(monkeypatch):
    cuda_state = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: restored.append(state))
    cuda = torch.device("cuda")
    state = rng_state(cuda)
    assert torch.equal(state["cuda_rng"], cuda_state) and "torch_rng" in state
    set_rng_state(state, cuda)
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)
    assert "cuda_rng" not in rng_state(torch.device("cpu"))
    set_rng_state({"torch_rng": torch.get_rng_state()}, cuda)  # a CPU checkpoint resumed on CUDA: nothing to set
    assert len(restored) == 1


def test_cuda_switches_are_set_per_trial_and_left_alone_on_cpu():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        memory.configure_cuda(torch.device("cpu"), tf32=True, benchmark=True)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark) == before
        memory.configure_cuda(torch.device("cuda"), tf32=False, benchmark=True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = before


@pytest.mark.slow
def test_tune_does_not_retry_an_out_of_memory_trial(local_ray, tmp_path):
    from ray import tune

    def oom_trainable(config, data):  # defined here: Ray's workers get it by value, not by importing this file
        with open(config["log"], "a") as log:
            log.write("started\n")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    log = tmp_path / "starts.log"
    tuner = tune.Tuner(tune.with_parameters(bridge.trial_entry(oom_trainable), data=None),
                       param_space={"batch_size": 512, "log": str(log)},
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "store"), name="oom", verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=3)))
    [result] = list(tuner.fit())
    assert log.read_text().count("started") == 1  # no retry, although max_failures=3
    assert result.error is None and result.metrics[M.STATUS] == M.STATUS_OOM
    assert "batch size 512" in result.metrics[M.MESSAGE]


def test_evaluation_logits_match_the_models_forward_in_fp32():
    from study.pcam.model import VGG16Patches

    model = VGG16Patches(None, freeze_blocks=2).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(eval_logits(model, x, None), model(x))


def test_the_analysis_reads_an_out_of_memory_trial_as_failed_with_its_message(tmp_path):
    import json

    import pyarrow.fs as pafs

    from analysis.trials import _read_trial

    folder = tmp_path / "train_pcam_00000"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"batch_size": 512}))
    rows = [{M.EPOCH: 0, M.STATUS: M.STATUS_RUNNING, "timestamp": 1},
            {M.EPOCH: 1, M.STATUS: M.STATUS_OOM, M.MESSAGE: "CUDA out of memory at batch size 512: ...",
             "timestamp": 2}]
    (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    unreadable = []
    trial = _read_trial(pafs.LocalFileSystem(), str(folder), "grid", folder.name, None, unreadable)
    assert unreadable == []
    assert trial.outcome == "error" and trial.error.startswith("CUDA out of memory at batch size 512")


def test_out_of_memory_after_a_restart_reports_the_epoch_it_failed_in(monkeypatch):
    """A trial restored from its epoch-2 checkpoint reports nothing for epoch 2 again; running out of memory in
    epoch 3 must not be stored as epoch 0 (the analysis would read it as the first row, not the last)."""
    class Saved:
        def as_directory(self):
            folder = tempfile.TemporaryDirectory()
            torch.save({"epoch": 2}, Path(folder.name) / M.STATE_FILE)
            return folder

    @bridge.trial_entry
    def train(config, data):
        assert bridge.load_start()["epoch"] == 2
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    rows = []
    monkeypatch.setattr(bridge.tune, "get_checkpoint", lambda: Saved())
    monkeypatch.setattr(bridge.tune, "report", lambda metrics, checkpoint=None: rows.append(metrics))
    train({"batch_size": 512}, None)
    assert [(r[M.EPOCH], r[M.STATUS]) for r in rows] == [(3, M.STATUS_OOM)]
