"""The PCam paper's network: VGG16 for 96x96 patches with a fresh one-logit head, its ImageNet weights, and
its logits with the head kept in fp32 (eval_logits)."""

from pathlib import Path

import torch
from torch import nn


# VGG16's `features` as five blocks of [conv, relu] x (2, 2, 3, 3, 3) + maxpool: index where each block ends.
VGG16_BLOCK_ENDS = (5, 10, 17, 24, 31)


class VGG16Patches(nn.Module):
    """torchvision's VGG16 convolutional part with a new one-logit head for 96x96 patches (3x3x512 features).

    The first `freeze_blocks` conv blocks keep their (ImageNet) weights; the rest and the head are trained. The
    head (our choice; the original's Keras head is not specified beyond a dense layer and a sigmoid output) is
    flatten -> 256 -> ReLU -> dropout 0.5 -> 1 logit.
    """

    def __init__(self, features_state: dict | None = None, freeze_blocks: int = 2):
        super().__init__()
        from torchvision.models import vgg16

        self.features = vgg16(weights=None).features
        if features_state is not None:
            self.features.load_state_dict(features_state)
        frozen = VGG16_BLOCK_ENDS[freeze_blocks - 1] if freeze_blocks else 0
        for layer in list(self.features)[:frozen]:
            layer.requires_grad_(False)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(512 * 3 * 3, 256), nn.ReLU(inplace=True), nn.Dropout(0.5),
                                  nn.Linear(256, 1))

    def forward(self, x):  # x: (B, 3, 96, 96) normalised -> (B,) logits
        if self.training:
            return self.head(self.features(x)).squeeze(1)
        # Evaluation: the head in fp32 even under autocast. Under bf16 the logits would keep 8 bits of mantissa: a
        # few thousand distinct probabilities over tens of thousands of images, whose ties bias AUC, its bootstrap
        # intervals and DeLong's test.
        features = self.features(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.head(features.float()).float().squeeze(1)


def vgg16_features_state(weights: str) -> dict | None:
    """The VGG16 conv weights for `weights`: 'imagenet' (torchvision's cache, downloaded there if the machine has
    internet), 'none' (random init), or a path to a saved VGG16 (or VGG16 features) state_dict."""
    import torch
    from torchvision.models import VGG16_Weights

    from study.errors import StudyError

    if weights == "none":
        return None
    if weights == "imagenet":
        try:
            state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as err:  # URLError/OSError/RuntimeError: no network and no cached copy
            raise StudyError(
                f"VGG16 ImageNet weights are not in torchvision's cache ({torch.hub.get_dir()}/checkpoints) and "
                f"could not be downloaded ({err}). On a machine with internet run once: python -c \"from "
                f"torchvision.models import vgg16, VGG16_Weights; vgg16(weights=VGG16_Weights.IMAGENET1K_V1)\", "
                f"or pass --weights PATH to a saved state_dict, or --weights none for random init")
    else:
        if not Path(weights).expanduser().is_file():
            raise StudyError(f"--weights {weights} is not a file; pass imagenet, none, or the path of a saved "
                             f"VGG16 state_dict")
        try:
            state = torch.load(Path(weights).expanduser(), map_location="cpu", weights_only=True)
        except Exception as err:  # unreadable, not a torch file (pickle's KeyError names a byte), pickled code
            raise StudyError(f"--weights {weights} cannot be read as a state_dict (torch.load: {type(err).__name__});"
                             f" pass the path of a file saved with torch.save(model.state_dict(), PATH)")
        if not isinstance(state, dict):
            raise StudyError(f"--weights {weights} holds a {type(state).__name__}, expected a VGG16 state_dict")
    features = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    try:
        VGG16Patches().features.load_state_dict(features)
    except (RuntimeError, AttributeError) as err:
        raise StudyError(f"--weights {weights} does not fit VGG16's conv layers: {str(err).splitlines()[0]}")
    return features


def eval_logits(model, x: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B,) logits of a model with `features` and a one-logit `head` (VGG16Patches): the features under autocast,
    the head in fp32.
    Under bf16 the logits would keep 8 bits of mantissa: a few thousand distinct probabilities over tens of
    thousands of images, whose ties bias AUC, its bootstrap intervals and DeLong's test."""
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        features = model.features(x)
    with torch.autocast(x.device.type, enabled=False):
        return model.head(features.float()).float().squeeze(1)
