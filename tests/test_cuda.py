"""The CUDA paths on a real GPU (marked `cuda`; skipped without one). benchmarks/gpu_check.py runs them with the
other `cuda` tests: python -m pytest -m cuda tests/test_cuda.py tests/test_augment.py tests/test_noise.py. Each runs
in seconds on an H200."""

import io

import numpy as np
import pytest
import torch

from study.engine import memory
from study import metrics as M
from study.engine import bridge
from study.pcam import trainable as trainables
from study.pcam.augment import to_input
from study.pcam import stored
from study.pcam import writer as pcam_writer
from study.pcam.model import VGG16Patches
from study.engine.train import make_optimizer
from study.pcam.model import eval_logits


def pcam_config(**values):
    """A trial of python -m study.pcam, given in its stored layout (the layout's defaults for the rest)."""
    return stored.train_config(values)


pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py)")]

CUDA = torch.device("cuda", 0)  # the allocator's calls need an index


@pytest.fixture
def capped():
    """Undo a test's allocator cap and free what it left, so the next test starts with the whole card."""
    yield
    torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    memory.free_cuda()


@pytest.fixture(scope="module")
def tiny_pcam(tmp_path_factory):
    return pcam_writer.make_synthetic(tmp_path_factory.mktemp("pcam"), n_train=64, n_valid=32, n_test=32, seed=1)


def test_the_cap_holds_and_an_out_of_memory_trial_frees_what_it_took(capped, monkeypatch):
    budget = memory.cap_memory(CUDA, 0.125)
    total = torch.cuda.get_device_properties(CUDA).total_memory
    assert budget == pytest.approx(0.125 * total - memory.CUDA_CONTEXT_BYTES, rel=1e-6)
    rows = []
    monkeypatch.setattr(bridge.tune, "report", lambda metrics, **_: rows.append(metrics))

    @bridge.trial_entry
    def greedy(config, data):
        held = [torch.empty(budget // 2, dtype=torch.uint8, device=CUDA)]
        held.append(torch.empty(budget, dtype=torch.uint8, device=CUDA))  # past the cap, below the card's free memory

    greedy({"batch_size": 512}, None)
    assert rows[-1][M.STATUS] == M.STATUS_OOM and "batch size 512" in rows[-1][M.MESSAGE]
    assert torch.cuda.memory_allocated(CUDA) < 2**20 and torch.cuda.memory_reserved(CUDA) < budget // 4


def test_the_budget_estimate_covers_a_real_training_step_and_its_growth_with_the_batch():
    model = VGG16Patches(None, 2).to(CUDA).to(memory_format=torch.channels_last)
    optimizer = make_optimizer("adam", model.parameters(), 1e-4, 0.0, CUDA)
    images = lambda n: to_input(torch.randint(0, 256, (n, 96, 96, 3), dtype=torch.uint8, device=CUDA),  # noqa: E731
                                train=False)
    per_image = memory.activation_bytes_per_image(model, images(4), torch.bfloat16)

    def step(x):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step(images(2))  # the optimizer's state exists before either measurement: it does not grow with the batch

    def peak(batch, eval_batch):
        """Memory above the weights, gradients and optimizer state: two training steps, then an evaluation."""
        x, x_eval = images(batch), images(eval_batch)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(CUDA) - x.nbytes - x_eval.nbytes
        torch.cuda.reset_peak_memory_stats(CUDA)
        for _ in range(2):
            step(x)
        with torch.no_grad():
            model.eval()
            eval_logits(model, x_eval, torch.bfloat16)
            model.train()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(CUDA) - base

    small, large = peak(32, 64), peak(128, 256)
    estimate = lambda batch, eval_batch: memory.training_bytes(model, "adam", batch, per_image,  # noqa: E731
                                                               eval_batch)
    grown, estimate_grown = large - small, estimate(128, 256) - estimate(32, 64)
    print(f"batch 32 -> 128 (eval 64 -> 256): measured growth {grown / 2**20:.0f} MiB, estimated "
          f"{estimate_grown / 2**20:.0f} MiB; at 128 measured {large / 2**20:.0f} MiB (above the weights and their "
          f"state), estimated {estimate(128, 256) / 2**20:.0f} MiB in all; per image {per_image}")
    # The growth holds no fixed allowance: an activation figure too small (or 0) fails here.
    assert grown <= estimate_grown <= 4 * grown  # and not so far above it that uploads are refused for nothing
    assert large <= estimate(128, 256)


def test_evaluation_logits_are_fp32_on_the_gpu():
    torch.manual_seed(0)
    model = VGG16Patches(None, 2).to(CUDA).eval()
    x = torch.randn(2048, 3, 96, 96, device=CUDA)
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(x).float()
        fp32 = eval_logits(model, x, torch.bfloat16)
    assert fp32.dtype == torch.float32 and fp32.shape == (2048,)
    assert len(torch.unique(fp32)) > len(torch.unique(bf16))


@pytest.mark.parametrize("packed", [False, True])  # the splits uploaded whole / pinned host batches streamed
def test_a_resumed_gpu_trial_continues_with_the_same_dropout(tiny_pcam, packed):
    cfg = pcam_config(data_dir=str(tiny_pcam), weights="none", epochs=2, batch_size=16, lr=0.01, eval_batch_size=32)
    # Deterministic kernels, so the only way a resumed run could differ is a random stream it did not restore.
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        full = []
        trainables.run_pcam(cfg, None, CUDA, lambda m, s, f: full.append(m), memory_budget=2**34, packed=packed)
        saved = io.BytesIO()

        def after_epoch_1(metrics, state, files):
            if metrics[M.EPOCH] == 1:
                assert state["cuda_rng"] is not None
                torch.save(state, saved)

        trainables.run_pcam(cfg, None, CUDA, after_epoch_1, memory_budget=2**34, packed=packed)
        saved.seek(0)
        resumed = []
        trainables.run_pcam(cfg, None, CUDA, lambda m, s, f: resumed.append(m), memory_budget=2**34,
                            packed=packed, start=torch.load(saved, weights_only=True))
    finally:
        torch.backends.cudnn.deterministic = False
    for key in (M.TRAIN_LOSS, M.VAL_LOSS, M.TEST_AUC):
        assert np.isclose(full[-1][key], resumed[-1][key], rtol=1e-4, atol=1e-6), (key, full[-1][key],
                                                                                 resumed[-1][key])
    assert full[-1][M.GPU_MEMORY_MB] > 0
