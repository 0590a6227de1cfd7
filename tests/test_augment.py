"""On-device augmentation: layout, exact normalisation, exact flips/rotations, ranges, label alignment, both paths.

`to_input` has a uint8 grouped path (CPU) and a grid_sample path (CUDA, large zooms); the `path` fixture runs
each test on both, forcing the grid path on CPU.
"""

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from study.pcam import augment, augment_u8
from study.pcam.augment import IMAGENET_MEAN, IMAGENET_STD, to_input

# The CUDA cases are marked `cuda` (benchmarks/gpu_check.py runs them with -m cuda) and skip without a GPU.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.py)")])]


@pytest.fixture(params=["grouped", "grid"])
def path(request, monkeypatch):
    if request.param == "grid":
        monkeypatch.setattr(augment, "_grouped", lambda *args: False)
    return request.param


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_batch(b: int, device="cpu", seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 96, 96, 3), generator=gen(seed), dtype=torch.uint8).to(device)


def unnormalise(out: torch.Tensor) -> torch.Tensor:
    """Back to the 0..255 scale, NHWC."""
    mean = torch.tensor(IMAGENET_MEAN, device=out.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=out.device).view(1, 3, 1, 1)
    return ((out * std + mean) * 255).permute(0, 2, 3, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [True, False])
def test_shape_dtype_memory_format(device, train, path):
    out = to_input(random_batch(5, device), generator=gen(1, device), train=train)
    assert out.shape == (5, 3, 96, 96) and out.dtype == torch.float32 and out.device.type == device
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_eval_is_exactly_the_normalisation():
    x = random_batch(4)
    expected = TF.normalize(x.permute(0, 3, 1, 2).float() / 255, list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(to_input(x, train=False), expected, rtol=0, atol=1e-6)
    # Augmentation switches have no effect outside training.
    torch.testing.assert_close(to_input(x, generator=gen(3), train=False), to_input(x, train=False), rtol=0, atol=0)


def dihedral_images(img: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of an HWC image, rotations first (indices 0-3), reflections after (4-7)."""
    rotations = [torch.rot90(img, k, (0, 1)) for k in range(4)]
    return rotations + [r.flip(1) for r in rotations]


def which_transform(x: torch.Tensor, out: torch.Tensor) -> list[int]:
    """For each image, which of its 8 flips/rotations the augmented output is, compared bit for bit."""
    found = []
    for img, aug in zip(x, out):
        candidates = [to_input(c[None], train=False)[0] for c in dihedral_images(img)]
        matches = [i for i, c in enumerate(candidates) if torch.equal(c, aug)]
        assert len(matches) == 1, "output is not exactly one flip/rotation of its input"
        found.append(matches[0])
    return found


@pytest.mark.parametrize("flip, rot90, allowed", [
    (True, True, set(range(8))),
    (False, True, {0, 1, 2, 3}),
    (True, False, {0, 2, 4, 6}),  # identity, rot180 = both flips, horizontal flip, vertical flip
])
def test_flips_and_rotations_are_exact_pixel_permutations(flip, rot90, allowed, path):
    x = random_batch(64)
    out = to_input(x, generator=gen(2), flip=flip, rot90=rot90, zoom=0, brightness=0)
    assert set(which_transform(x, out)) == allowed  # all allowed ones drawn among 64 images, no others


def test_flips_and_rotations_compose_with_zoom(path):
    # The same generator draws the same zoom whatever the switches: with flips and rotations on,
    # each output is a flip/rotation of the zoom-only output, to the rounding of resized pixels to whole levels.
    x = random_batch(32)
    zoomed = unnormalise(to_input(x, generator=gen(5), flip=False, rot90=False, brightness=0))
    both = unnormalise(to_input(x, generator=gen(5), brightness=0))
    found = []
    for z, a in zip(zoomed, both):
        errors = [(c - a).abs().max().item() for c in dihedral_images(z)]
        assert min(errors) <= 1.01
        found.append(errors.index(min(errors)))
    assert len(set(found)) >= 6


def test_both_paths_draw_the_same_symmetry_and_brightness(monkeypatch):
    x = random_batch(32)
    grouped = to_input(x, generator=gen(9), zoom=0, brightness=0)
    brightened = unnormalise(to_input(x, generator=gen(9), zoom=0))
    monkeypatch.setattr(augment, "_grouped", lambda *args: False)
    torch.testing.assert_close(to_input(x, generator=gen(9), zoom=0, brightness=0), grouped, rtol=0, atol=1e-6)
    # The uint8 path rounds a factor f > 1 down to 255 / ceil(255 / f): less than 0.5 % lower.
    reference = unnormalise(to_input(x, generator=gen(9), zoom=0))
    assert ((brightened - reference) / reference.clamp(min=1)).abs().max() < 0.005
    assert (brightened - reference).abs().max() > 0  # the rounding is real: this test would see it go


def test_uint8_brightness_maps_the_first_saturated_level_to_white():
    factor = torch.tensor([0.9, 1.0, 1.0001, 1.05, 1.1])
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(5, 1, 256, 3).contiguous()
    y, scaled = augment._saturate_u8(x, factor, in_place=False)
    out = y.float() * scaled.view(5, 1, 1, 1)
    exact = torch.minimum(x.float() * factor.view(5, 1, 1, 1), torch.tensor(255.0))
    assert torch.equal(x, torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(5, 1, 256, 3))  # untouched
    assert out.max() <= 255 + 1e-4
    torch.testing.assert_close(out[:2], exact[:2])  # f <= 1: no rounding, no clamp
    assert ((out - exact).abs() <= 0.005 * exact + 1e-4).all()
    c = torch.ceil(255 / factor[2:])
    for row, level in zip(out[2:], c.long()):  # the first saturated level and all above are exactly white
        assert torch.all(row[0, level:] == 255.0) and torch.all(row[0, :level] < 255)


def test_same_generator_same_output_other_seed_differs(path):
    x = random_batch(8)
    a = to_input(x, generator=gen(7))
    assert torch.equal(a, to_input(x, generator=gen(7)))
    assert not torch.equal(a, to_input(x, generator=gen(8)))


def test_zoom_factors_lie_in_range_and_vary(path):
    # A horizontal ramp of 2 levels per pixel: magnifying by s makes the slope 2/s. A least-squares slope over
    # the middle 65 columns (away from reflected edges) averages out the grouped path's rounding to whole levels.
    ramp = (torch.arange(96) * 2 + 30).to(torch.uint8).view(1, 1, 96, 1).expand(32, 96, 96, 3).contiguous()
    out = unnormalise(to_input(ramp, generator=gen(4), flip=False, rot90=False, zoom=0.1, brightness=0))
    values = out[:, 48, 16:81, 0]
    cols = torch.arange(16, 81, dtype=torch.float32) - 48
    slope = ((values - values.mean(dim=1, keepdim=True)) * cols).sum(dim=1) / (cols * cols).sum()
    factor = 2 / slope
    assert factor.min() >= 0.9 - 2e-3 and factor.max() <= 1.1 + 2e-3
    assert factor.max() - factor.min() > 0.05
    if path == "grouped":  # quantised to centred crops: factor = 96 / s for an even size s
        sizes = 96 / factor
        assert (sizes / 2 - (sizes / 2).round()).abs().max() < 0.15


def test_grouped_zoom_is_grid_sample_at_the_quantised_factor():
    # Reference: grid_sample with reflection at factor 96 / s. Inside the outermost pixels (where a crop is
    # bilinear within itself) they agree to the rounding to whole levels, zoomed-out reflected margins included.
    x, u = random_batch(64), torch.rand(64, generator=gen(3))
    sizes, s_min, s_max = augment._crop_sizes(u, 96, 0.1)
    assert (sizes > 96).any() and (sizes < 96).any()
    y, order = augment_u8._zoom_u8(x, None, None, sizes.numpy(), s_min, s_max)
    y = y.index_select(0, torch.from_numpy(augment_u8._inverse(order))).float()
    c = ((torch.arange(96) * 2 + 1) / 96 - 1) * sizes.view(64, 1) / 96
    grid = torch.stack(torch.broadcast_tensors(c.view(64, 1, 96), c.view(64, 96, 1)), dim=-1)
    ref = F.grid_sample(x.permute(0, 3, 1, 2).float(), grid, padding_mode="reflection", align_corners=False)
    assert (y - ref.permute(0, 2, 3, 1)).abs()[:, 1:-1, 1:-1].max() <= 1.01


def test_brightness_factors_lie_in_range_and_vary(path):
    x = torch.full((32, 96, 96, 3), 100, dtype=torch.uint8)
    out = unnormalise(to_input(x, generator=gen(5), flip=False, rot90=False, zoom=0, brightness=0.1))
    factor = out.mean(dim=(1, 2, 3)) / 100
    assert factor.min() >= 0.9 - 1e-4 and factor.max() <= 1.1 + 1e-4
    assert factor.max() - factor.min() > 0.05


def test_brightness_clamps_at_white(path):
    x = torch.full((32, 96, 96, 3), 250, dtype=torch.uint8)
    out = unnormalise(to_input(x, generator=gen(5), brightness=0.3))
    level = out.mean(dim=(1, 2, 3))
    assert out.max() <= 255 + 1e-3
    assert (level > 255 - 1e-3).any() and (level < 240).any()  # brightened ones saturate, darkened ones do not


@pytest.mark.parametrize("device", DEVICES)
def test_batch_order_keeps_labels_aligned(device, path):
    # Each image is one flat colour encoding its position: red = 20 + 2i, green = 200 - 2i. Flips, rotation and
    # zoom keep a flat image flat; brightness scales red and green alike, so red / (red + green) still gives i.
    i = torch.arange(64)
    colour = torch.stack([20 + 2 * i, 200 - 2 * i, torch.full_like(i, 90)], dim=1).to(torch.uint8)
    x = colour.view(64, 1, 1, 3).expand(64, 96, 96, 3).contiguous().to(device)
    out = unnormalise(to_input(x, generator=gen(6, device)))
    red, green = out[..., 0].mean(dim=(1, 2)), out[..., 1].mean(dim=(1, 2))
    decoded = ((220 * red / (red + green) - 20) / 2).round().long().cpu()
    assert torch.equal(decoded, i)


def test_large_zoom_uses_the_grid_path_and_stays_flat():
    u = torch.rand(8)
    assert augment._grouped(torch.device("cpu"), 96, augment._crop_sizes(u, 96, 0.1))
    assert not augment._grouped(torch.device("cpu"), 96, augment._crop_sizes(u, 96, 0.6))
    assert not augment._grouped(torch.device("cpu"), 96, augment._crop_sizes(u, 96, 0.005))  # under 2 px
    x = torch.full((8, 96, 96, 3), 77, dtype=torch.uint8)
    out = unnormalise(to_input(x, generator=gen(1), zoom=0.6, brightness=0))
    torch.testing.assert_close(out, torch.full_like(out, 77.0), rtol=0, atol=1e-3)  # reflection, no black fill


def test_rejects_non_uint8_input_and_non_square_augmentation():
    with pytest.raises(ValueError, match="uint8"):
        to_input(torch.zeros(2, 96, 96, 3))
    wide = torch.zeros(2, 96, 64, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="square"):
        to_input(wide)
    assert to_input(wide, train=False).shape == (2, 3, 96, 64)


def test_threaded_shares_work_under_inference_mode():
    x = random_batch(16)
    expected = to_input(x, generator=gen(3))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # half the batch runs on a second Python thread
    try:
        with torch.inference_mode():
            out = to_input(x, generator=gen(3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, expected)


def test_shares_on_threads_give_the_same_batch_and_restore_the_thread_count():
    x = random_batch(64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = to_input(x, generator=gen(11))  # one share: no threads
        torch.set_num_threads(2)
        shared = to_input(x, generator=gen(11))  # two shares of 32 on two threads
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, shared)
