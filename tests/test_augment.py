"""On-device augmentation: layout, exact normalisation, exact flips/rotations, ranges, label alignment."""

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from study.augment import IMAGENET_MEAN, IMAGENET_STD, to_input

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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
def test_shape_dtype_memory_format(device, train):
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
def test_flips_and_rotations_are_exact_pixel_permutations(flip, rot90, allowed):
    x = random_batch(64)
    out = to_input(x, generator=gen(2), flip=flip, rot90=rot90, zoom=0, brightness=0)
    assert set(which_transform(x, out)) == allowed  # all allowed ones drawn among 64 images, no others


def test_same_generator_same_output_other_seed_differs():
    x = random_batch(8)
    a = to_input(x, generator=gen(7))
    assert torch.equal(a, to_input(x, generator=gen(7)))
    assert not torch.equal(a, to_input(x, generator=gen(8)))


def test_zoom_factors_lie_in_range_and_vary():
    # A horizontal ramp of 2 levels per pixel: magnifying by s makes the slope 2/s in the image's middle.
    ramp = (torch.arange(96) * 2 + 30).to(torch.uint8).view(1, 1, 96, 1).expand(32, 96, 96, 3).contiguous()
    out = unnormalise(to_input(ramp, generator=gen(4), flip=False, rot90=False, zoom=0.1, brightness=0))
    factor = 2 / out[:, 48, 40:56, 0].diff(dim=1).mean(dim=1)
    assert factor.min() >= 0.9 - 1e-3 and factor.max() <= 1.1 + 1e-3
    assert factor.max() - factor.min() > 0.05


def test_brightness_factors_lie_in_range_and_vary():
    x = torch.full((32, 96, 96, 3), 100, dtype=torch.uint8)
    out = unnormalise(to_input(x, generator=gen(5), flip=False, rot90=False, zoom=0, brightness=0.1))
    factor = out.mean(dim=(1, 2, 3)) / 100
    assert factor.min() >= 0.9 - 1e-4 and factor.max() <= 1.1 + 1e-4
    assert factor.max() - factor.min() > 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_batch_order_keeps_labels_aligned(device):
    # Each image is one flat colour encoding its position: red = 20 + 2i, green = 200 - 2i. Flips, rotation and
    # zoom keep a flat image flat; brightness scales red and green alike, so red / (red + green) still gives i.
    i = torch.arange(64)
    colour = torch.stack([20 + 2 * i, 200 - 2 * i, torch.full_like(i, 90)], dim=1).to(torch.uint8)
    x = colour.view(64, 1, 1, 3).expand(64, 96, 96, 3).contiguous().to(device)
    out = unnormalise(to_input(x, generator=gen(6, device)))
    red, green = out[..., 0].mean(dim=(1, 2)), out[..., 1].mean(dim=(1, 2))
    decoded = ((220 * red / (red + green) - 20) / 2).round().long().cpu()
    assert torch.equal(decoded, i)


def test_rejects_non_uint8_input():
    with pytest.raises(ValueError, match="uint8"):
        to_input(torch.zeros(2, 96, 96, 3))
