"""The training loop without Ray: shapes, determinism, exact resume, divergence, learning."""

import copy
import math

import pytest
import torch

from study import metrics as M
from study.mnist.stored import train_config
from study.data import mnist
from study.mnist import targets as regression_targets
from study.mnist.model import RegressionCNN
from study.mnist.trainable import run_mnist
from study.engine.loop import fit
from study.engine.train import DeviceBatches, epoch_generator, make_optimizer

CPU = torch.device("cpu")


def paper_config(**stored):
    """A trial of python -m study.mnist, given in its stored layout (the layout's defaults for the rest)."""
    return train_config(stored)


@pytest.fixture(scope="module")
def data():
    d = mnist.synthetic(640, 128, seed=3)
    targets = {t: (regression_targets.targets(d.train_x, t), regression_targets.targets(d.test_x, t)) for t in ("mean", "var")}
    return {"train_x": d.train_x, "test_x": d.test_x, "targets": targets}


def collect(cfg, data, start=None, stop_after=None):
    """Run a trial, returning the reported metrics and states; stop_after simulates a crash after that epoch."""
    rows, states = [], []

    class Crash(Exception):
        pass

    def report(metrics, state):
        rows.append(metrics)
        states.append(copy.deepcopy(state))
        if stop_after is not None and metrics[M.EPOCH] == stop_after:
            raise Crash

    try:
        run_mnist(cfg, data, CPU, report, start)
    except Crash:
        pass
    return rows, states


def test_model_shape():
    out = RegressionCNN()(torch.zeros(7, 1, 28, 28))
    assert out.shape == (7,)
    assert sum(p.numel() for p in RegressionCNN().parameters()) == 10 * 25 + 10 + 20 * 250 + 20 + 320 * 50 + 50 + 51


def test_device_batches_cover_every_image_once():
    x = torch.arange(10).float()
    batches = DeviceBatches(x, x, batch_size=4)
    seen = torch.cat([bx for bx, _ in batches.epoch(epoch_generator(0, 1))])
    assert len(batches) == 3 and sorted(seen.tolist()) == list(range(10))
    again = torch.cat([bx for bx, _ in batches.epoch(epoch_generator(0, 1))])
    other = torch.cat([bx for bx, _ in batches.epoch(epoch_generator(0, 2))])
    assert torch.equal(seen, again) and not torch.equal(seen, other)


def test_epochs_reported_from_zero_and_loss_falls(data):
    cfg = paper_config(target="mean", lr=1e-3, batch_size=32, epochs=3, val_size=128, seed=5)
    rows, _ = collect(cfg, data)
    assert [r[M.EPOCH] for r in rows] == [0, 1, 2, 3]
    assert math.isnan(rows[0][M.TRAIN_LOSS]) and rows[-1][M.STATUS] == M.STATUS_DONE
    assert rows[-1][M.TEST_MSE] < rows[0][M.TEST_MSE] / 5
    assert all(math.isfinite(r[M.VAL_MSE]) for r in rows)
    assert rows[-1][M.TRAIN_SECONDS] == pytest.approx(sum(r[M.EPOCH_SECONDS] for r in rows))


def test_same_seed_same_metrics_other_seed_not(data):
    cfg = paper_config(target="var", lr=1e-3, batch_size=64, epochs=2, seed=7)
    first, _ = collect(cfg, data)
    second, _ = collect(cfg, data)
    keys = (M.TRAIN_LOSS, M.TEST_MSE, M.NOISE_SCALE)
    assert [[r[k] for k in keys] for r in first[1:]] == [[r[k] for k in keys] for r in second[1:]]
    other, _ = collect(paper_config(target="var", lr=1e-3, batch_size=64, epochs=2, seed=8), data)
    assert other[-1][M.TEST_MSE] != first[-1][M.TEST_MSE]


def test_resume_from_a_checkpoint_ends_exactly_like_an_uninterrupted_run(data):
    cfg = paper_config(target="mean", lr=1e-3, batch_size=16, epochs=3, seed=11, val_size=64)
    full, _ = collect(cfg, data)
    crashed, states = collect(cfg, data, stop_after=1)
    # what a checkpoint round trip does to the state
    saved = torch.load(_save(states[-1]), weights_only=True)
    resumed, _ = collect(cfg, data, start=saved)
    assert [r[M.EPOCH] for r in resumed] == [2, 3]
    for key in (M.TRAIN_LOSS, M.TEST_MSE, M.VAL_MSE, M.NOISE_SCALE):
        assert resumed[-1][key] == full[-1][key] or (math.isnan(full[-1][key]) and math.isnan(resumed[-1][key]))


def test_resume_from_epoch_0_reports_each_epoch_once(data):
    cfg = paper_config(target="mean", lr=1e-3, batch_size=64, epochs=2, seed=5)
    full, _ = collect(cfg, data)
    crashed, states = collect(cfg, data, stop_after=0)
    resumed, _ = collect(cfg, data, start=torch.load(_save(states[-1]), weights_only=True))
    assert [r[M.EPOCH] for r in crashed + resumed] == [0, 1, 2]  # epoch 0 was reported with its checkpoint
    assert resumed[-1][M.TEST_MSE] == full[-1][M.TEST_MSE]


def _save(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_nan_loss_ends_the_trial_marked_diverged(data):
    cfg = paper_config(target="var", lr=10.0, optimizer="sgd", batch_size=32, epochs=5)
    rows, _ = collect(cfg, data)
    assert rows[-1][M.DIVERGED] and rows[-1][M.STATUS] == M.STATUS_DIVERGED
    assert len(rows) < 6  # stopped at the first diverged epoch
    assert not rows[-2][M.DIVERGED]


def test_a_diverged_epoch_is_never_the_best_model():
    # NaN weights can still score (e.g. accuracy = the share of one class): selection must skip diverged epochs.
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64)
    cfg = paper_config(target="mean", lr=1.0, optimizer="sgd", batch_size=16, epochs=3, noise_scale=False)
    loss_fn = lambda out, target: torch.nn.functional.mse_loss(out.squeeze(1), target) * torch.nan  # noqa: E731
    seen = []
    state = fit(model, make_optimizer("sgd", model.parameters(), 1.0, 0.0, torch.device("cpu")),
                DeviceBatches(x, y, 16), loss_fn, lambda m: {"score": 0.5}, lambda m, s: seen.append(m), cfg=cfg,
                device=torch.device("cpu"), select="score")
    assert seen[-1][M.DIVERGED] and seen[-1][M.EPOCH] == 1
    assert state["best"]["epoch"] == -1 and state["best_model"] is None
    assert math.isnan(seen[-1]["best_score"])


def test_noise_scale_off_reports_nan(data):
    rows, _ = collect(paper_config(target="mean", lr=1e-3, batch_size=64, epochs=1, noise_scale=False), data)
    assert all(math.isnan(r[M.NOISE_SCALE]) for r in rows)


def test_probing_every_step_trains_the_same_model(data):
    """A probe takes the batch's gradient in micro-batches: the optimizer sees the same gradient (to float rounding)."""
    probed, _ = collect(paper_config(target="mean", lr=1e-3, batch_size=64, epochs=1, noise_every=1), data)
    plain, _ = collect(paper_config(target="mean", lr=1e-3, batch_size=64, epochs=1, noise_scale=False), data)
    assert probed[-1][M.NOISE_PROBES] == 10 and math.isfinite(probed[-1][M.NOISE_SCALE])  # 640 images / 64
    assert probed[-1][M.TEST_MSE] == pytest.approx(plain[-1][M.TEST_MSE], rel=1e-4)
    assert probed[-1][M.TRAIN_LOSS] == pytest.approx(plain[-1][M.TRAIN_LOSS], rel=1e-4)


def test_probe_seconds_are_kept_out_of_training_seconds(data, monkeypatch):
    """On a clock where every probe takes 100 s and anything else 1 ms a reading, the probes' time goes to
    probe_seconds and none of it into epoch or training seconds (a clock, not sleeps: two shared cores are noisy)."""
    import sys
    import types

    from study.engine import loop
    from study.engine.noise import NoiseScale, ProbeClock

    now = [0.0]

    def perf_counter():
        now[0] += 0.001
        return now[0]

    probe = NoiseScale.probe

    def slow_probe(self, *args, **kwargs):
        now[0] += 100.0
        return probe(self, *args, **kwargs)

    clock = types.SimpleNamespace(perf_counter=perf_counter)
    monkeypatch.setattr(loop, "time", clock)
    monkeypatch.setattr(sys.modules[ProbeClock.__module__], "time", clock)  # the probes' clock (study.engine.noise)
    monkeypatch.setattr(NoiseScale, "probe", slow_probe)
    rows, _ = collect(paper_config(target="mean", lr=1e-3, batch_size=64, epochs=2, noise_every=4), data)
    assert [r[M.NOISE_PROBES] for r in rows] == [0, 3, 3] and rows[0][M.PROBE_SECONDS] == 0.0
    for row in rows[1:]:  # 10 steps, probed at 0, 4 and 8
        assert row[M.PROBE_SECONDS] == pytest.approx(300.0, abs=0.01)
        assert 0 < row[M.EPOCH_SECONDS] < 0.01
        assert row[M.IMAGES_PER_SECOND] == pytest.approx(640 / row[M.EPOCH_SECONDS])
    assert rows[-1][M.TRAIN_SECONDS] == pytest.approx(sum(r[M.EPOCH_SECONDS] for r in rows))
    monkeypatch.undo()
    off, _ = collect(paper_config(target="mean", lr=1e-3, batch_size=64, epochs=1, noise_scale=False), data)
    assert off[-1][M.PROBE_SECONDS] == 0.0


def test_unit_scales(data):
    cfg = paper_config(target="var", lr=1e-3, batch_size=64, epochs=1, input_scale="unit", target_scale="unit")
    rows, _ = collect(cfg, data)
    raw, _ = collect(paper_config(target="var", lr=1e-3, batch_size=64, epochs=1), data)
    assert rows[0][M.TEST_MSE] < 1 < raw[0][M.TEST_MSE]  # variance on 0..1 is below 1/4, on 0..255 thousands


def test_lr_scaling_and_warmup_reach_the_optimizer(data):
    cfg = paper_config(target="mean", lr=1e-3, batch_size=128, epochs=2, lr_scaling="linear",
                      lr_reference_batch=32, warmup_epochs=1.0)
    rows, _ = collect(cfg, data)
    assert rows[0][M.LR] == pytest.approx(4e-3 / 5)  # 640 images / 128 = 5 warmup steps; step 0 at 1/5
    assert rows[-1][M.LR] == pytest.approx(4e-3)
    # the probe backpropagates at the scaled, warmed-up lr's weights: one per epoch (step 0), each estimate usable
    assert [row[M.NOISE_PROBES] for row in rows[1:]] == [1, 1]
    assert all(math.isfinite(row[M.NOISE_SCALE]) and row[M.NOISE_SCALE] > 0 for row in rows[1:])
