"""Perceptual distances behind one interface: ``loss(x, y) -> (B,)``, images (B, 3, H, W) in [-1, 1].

* ``DiscriminatorFeatureDistance`` (the default): the GAN discriminator's block outputs, each unit-normalized
  over channels at every position (as LPIPS does), squared differences summed over channels, averaged over
  positions and then over layers. Every StyleGAN2 training checkpoint (and every handsoff one) carries a D, so
  this needs no download.
* ``LPIPS`` (Zhang et al., CVPR 2018, the 'vgg' variant): VGG16 conv features at relu1_2, relu2_2, relu3_3,
  relu4_3, relu5_3, unit-normalized over channels, squared differences weighted per channel by the learned
  linear heads, spatially averaged and summed over layers. Weights come only from local files the user gives:
  a torchvision ``vgg16`` state dict (``features.N.*``; other keys are ignored) and the LPIPS linear heads
  (``lin0.model.1.weight`` .. ``lin4.model.1.weight``, each (1, C, 1, 1), as in the ``lpips`` package's
  ``vgg.pth``).

Both return 0 for identical images and grow with the difference. ``name`` says which distance was used, so it
can be recorded with the latents it produced.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from handsoff.errors import UsageError
from handsoff.generator.checkpoints import CheckpointError


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


class _TargetCache:
    """Features of the last target batch: optimization compares many reconstructions with the same targets, so
    their features (computed without gradient) are reused while the same tensor, unchanged, comes back."""

    def __init__(self):
        self.ref, self.version, self.value = None, None, None

    def get(self, y: torch.Tensor, compute):
        if y.requires_grad:
            return compute(y)
        # The same tensor object (a weak reference, so a new tensor at a recycled address never matches), unmodified.
        if self.ref is None or self.ref() is not y or self.version != y._version:
            with torch.no_grad():
                self.ref, self.version, self.value = weakref.ref(y), y._version, compute(y)
        return self.value


class DiscriminatorFeatureDistance(nn.Module):
    """Distance between discriminator features of two image batches; ``D`` is frozen (no gradient to it)."""

    def __init__(self, discriminator: nn.Module, layers: int | None = None):
        super().__init__()
        self.D = discriminator.eval().requires_grad_(False)
        self.layers = layers
        self.name = "discriminator-features"
        self._targets = _TargetCache()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.D.block_features(x, force_fp32=True)[1]
        return [_unit_normalize(f) for f in (feats[:self.layers] if self.layers is not None else feats)]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx, fy = self._features(x), self._targets.get(y, self._features)
        return torch.stack([(a - b).square().sum(1).mean(dim=(1, 2)) for a, b in zip(fx, fy)]).mean(0)


# VGG16 ('D' configuration): conv widths with 'M' for max-pooling, and the indices in torchvision's
# ``vgg16().features`` after which LPIPS taps its five feature maps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
LPIPS_TAPS = (3, 8, 15, 22, 29)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's input normalization, for images in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` layout (same module indices, so its state dict keys load), up to relu5_3."""
    layers: list[nn.Module] = []
    channels = 3
    for v in VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=False)]
            channels = v
    return nn.Sequential(*layers)


def _load_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} weights not found (handsoff never downloads weights; give a local "
                              "file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise CheckpointError(f"{path}: cannot read {what} weights ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of {what} weights, got {type(state).__name__}")
    return state


class LPIPS(nn.Module):
    """LPIPS-VGG from local weight files (see module docstring). ``resize``: resample inputs to this size first."""

    def __init__(self, vgg_weights: str | os.PathLike, lin_weights: str | os.PathLike, resize: int | None = None):
        super().__init__()
        self.name = "lpips-vgg"
        self.resize = resize
        self.features = vgg16_features()
        vgg_path, lin_path = Path(vgg_weights), Path(lin_weights)
        state = _load_state(vgg_path, "VGG16")
        wanted = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        expected = set(self.features.state_dict())
        missing = sorted(expected - set(wanted))
        if missing:
            raise CheckpointError(f"{vgg_path}: not a torchvision vgg16 state dict "
                                  f"(missing {', '.join(missing[:4])} ...)")
        try:
            self.features.load_state_dict({k: wanted[k] for k in expected})
        except RuntimeError as e:
            raise CheckpointError(f"{vgg_path}: VGG16 weights of the wrong shape ({e})") from None
        lin = _load_state(lin_path, "LPIPS linear-head")
        self.lins = nn.ParameterList()
        for i, c in enumerate(LPIPS_CHANNELS):
            key = f"lin{i}.model.1.weight"
            if key not in lin:
                raise CheckpointError(f"{lin_path}: missing {key} (expected the lpips package's vgg.pth layout)")
            if tuple(lin[key].shape) != (1, c, 1, 1):
                raise CheckpointError(f"{lin_path}: {key} has shape {tuple(lin[key].shape)}, expected (1, {c}, 1, 1)")
            self.lins.append(nn.Parameter(lin[key].float().clone(), requires_grad=False))
        self._targets = _TargetCache()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE)[None, :, None, None])
        self.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.resize is not None and x.shape[-1] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        x = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in LPIPS_TAPS:
                out.append(_unit_normalize(x))
                if len(out) == len(LPIPS_TAPS):
                    break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = 0
        for fx, fy, w in zip(self._taps(x), self._targets.get(y, self._taps), self.lins):
            d = (fx - fy).square()
            total = total + F.conv2d(d, w).mean(dim=(1, 2, 3))
        return total


def build_perceptual(kind: str, discriminator: nn.Module | None = None, lpips_vgg: str | None = None,
                     lpips_lin: str | None = None) -> nn.Module:
    """'discriminator' (needs the checkpoint's D) or 'lpips' (needs both local weight files)."""
    if kind == "discriminator":
        if discriminator is None:
            raise CheckpointError("the discriminator-feature distance needs a checkpoint that holds a discriminator; "
                                  "use --perceptual lpips with local weights instead")
        return DiscriminatorFeatureDistance(discriminator)
    if kind == "lpips":
        if not lpips_vgg or not lpips_lin:
            raise CheckpointError("LPIPS needs --lpips-vgg (torchvision vgg16 state dict) and --lpips-lin "
                                  "(linear heads)")
        return LPIPS(lpips_vgg, lpips_lin)
    raise UsageError(f"unknown perceptual distance {kind!r}; choose 'discriminator' or 'lpips'")
