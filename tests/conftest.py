"""Shared fixtures: the real MNIST files when present, a small local Ray, quiet Tune output."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
SHARED_KAGGLE = REPO.parent / "shared" / "data" / "pcam-kaggle-sample"

os.environ.setdefault("STUDY_TUNE_VERBOSE", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU Ray for one test module, shut down after it so the next module starts clean."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def mnist_dir():
    if not SHARED_MNIST.is_dir():
        pytest.skip("../shared/data/mnist is absent (a user's clone has no shared data)")
    return SHARED_MNIST
