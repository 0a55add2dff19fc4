"""Differentiable augmentation of images for GAN training (ADA, Karras et al., NeurIPS 2020).

Every operation is applied to each sample independently with probability ``p``. The geometric ones (x-flip,
90-degree rotation, integer translation, isotropic scaling, rotation, anisotropic scaling, fractional
translation) compose into one 3x3 matrix per sample, applied by a single ``grid_sample`` with reflection
padding, so an image goes through exactly one resampling. The colour ones (brightness, contrast, saturation,
hue rotation) compose into one 4x4 matrix on homogeneous RGB. Everything is differentiable with respect to the
images, which is what GAN training needs: the discriminator sees augmented reals *and* augmented fakes, and the
generator's gradient flows through the augmentation.

Images only: labels never pass through GAN training. The one label-aware augmentation (crops, resizing and flips
that keep masks, depth and keypoints aligned) is the downstream dataset's (``handsoff.data.dataset``).

Conventions: images (B, C, H, W) float in about [-1, 1]. Matrices act on normalized coordinates in [-1, 1]
(``align_corners=False``) and map *output* positions to *input* positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Strength of each operation (ADA's 'bgc' pipeline defaults).
TRANSLATE_MAX = 0.125      # integer translation, fraction of the image size
SCALE_STD = 0.2            # log2 of the isotropic scale
ROTATE_MAX = 1.0           # fraction of a full half-turn (pi)
ANISO_STD = 0.2            # log2 of the anisotropic scale
FRAC_TRANSLATE_STD = 0.125
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5         # log2
SATURATION_STD = 1.0       # log2
HUE_MAX = 1.0              # fraction of pi

GEOMETRIC_OPS = ("xflip", "rotate90", "translate", "scale", "rotate", "aniso", "frac_translate")
COLOR_OPS = ("brightness", "contrast", "saturation", "hue")


def _rand(batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(batch, generator=generator).to(device)


def _randn(batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.randn(batch, generator=generator).to(device)


def _gate(values: torch.Tensor, identity: float, p: float, generator, device) -> torch.Tensor:
    """Keep each sample's value with probability p, else the identity value."""
    keep = _rand(len(values), generator, device) < p
    return torch.where(keep, values, torch.full_like(values, identity))


def _matrix(rows: list[list[torch.Tensor | float]], batch: int, device) -> torch.Tensor:
    out = torch.zeros(batch, len(rows), len(rows[0]), device=device)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            out[:, i, j] = v
    return out


def _scale2d(sx, sy, batch, device):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], batch, device)


def _translate2d(tx, ty, batch, device):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], batch, device)


def _rotate2d(angle, batch, device):
    c, s = torch.cos(angle), torch.sin(angle)
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], batch, device)


def sample_geometry(batch: int, p: float, size: tuple[int, int], generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu", ops: tuple[str, ...] = GEOMETRIC_OPS) -> torch.Tensor:
    """Random geometric transforms, (B, 3, 3) matrices from output to input normalized coordinates.

    Each op in ``ops`` is applied per sample with probability p (rotation twice with 1 - sqrt(1 - p), around the
    anisotropic scaling, as ADA does, so that its overall probability is p). size = (H, W), for whole-pixel
    translation.
    """
    unknown = set(ops) - set(GEOMETRIC_OPS)
    if unknown:
        raise ValueError(f"unknown geometric augmentations {sorted(unknown)}; choose from {GEOMETRIC_OPS}")
    h, w = size
    m = torch.eye(3, device=device).repeat(batch, 1, 1)
    if p <= 0:
        return m
    if "xflip" in ops:
        flip = torch.floor(_rand(batch, generator, device) * 2)
        m = m @ _scale2d(1 - 2 * _gate(flip, 0, p, generator, device), 1, batch, device)
    if "rotate90" in ops:
        quarter = torch.floor(_rand(batch, generator, device) * 4)
        m = m @ _rotate2d(_gate(quarter, 0, p, generator, device) * math.pi / 2, batch, device)
    if "translate" in ops:
        t = [(_rand(batch, generator, device) * 2 - 1) * TRANSLATE_MAX for _ in range(2)]
        # Whole pixels: one pixel is 2 / size in normalized coordinates.
        tx = torch.round(_gate(t[0], 0, p, generator, device) * w) * 2 / w
        ty = torch.round(_gate(t[1], 0, p, generator, device) * h) * 2 / h
        m = m @ _translate2d(tx, ty, batch, device)
    if "scale" in ops:
        s = _gate(torch.exp2(_randn(batch, generator, device) * SCALE_STD), 1, p, generator, device)
        m = m @ _scale2d(s, s, batch, device)
    p_rot = 1 - math.sqrt(max(0.0, 1 - p))
    if "rotate" in ops:
        a = (_rand(batch, generator, device) * 2 - 1) * math.pi * ROTATE_MAX
        m = m @ _rotate2d(_gate(a, 0, p_rot, generator, device), batch, device)
    if "aniso" in ops:
        s = _gate(torch.exp2(_randn(batch, generator, device) * ANISO_STD), 1, p, generator, device)
        m = m @ _scale2d(s, 1 / s, batch, device)
    if "rotate" in ops:
        a = (_rand(batch, generator, device) * 2 - 1) * math.pi * ROTATE_MAX
        m = m @ _rotate2d(_gate(a, 0, p_rot, generator, device), batch, device)
    if "frac_translate" in ops:
        tx = _gate(_randn(batch, generator, device) * FRAC_TRANSLATE_STD * 2, 0, p, generator, device)
        ty = _gate(_randn(batch, generator, device) * FRAC_TRANSLATE_STD * 2, 0, p, generator, device)
        m = m @ _translate2d(tx, ty, batch, device)
    return m


def sample_color(batch: int, p: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", ops: tuple[str, ...] = COLOR_OPS) -> torch.Tensor:
    """Random colour transforms, (B, 4, 4) matrices on homogeneous RGB (values in [-1, 1], mid-grey 0)."""
    unknown = set(ops) - set(COLOR_OPS)
    if unknown:
        raise ValueError(f"unknown colour augmentations {sorted(unknown)}; choose from {COLOR_OPS}")
    c = torch.eye(4, device=device).repeat(batch, 1, 1)
    if p <= 0:
        return c
    luma = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device) / math.sqrt(3)  # the grey axis
    if "brightness" in ops:
        b = _gate(_randn(batch, generator, device) * BRIGHTNESS_STD, 0, p, generator, device)
        t = torch.eye(4, device=device).repeat(batch, 1, 1)
        t[:, :3, 3] = b[:, None]
        c = t @ c
    if "contrast" in ops:
        s = _gate(torch.exp2(_randn(batch, generator, device) * CONTRAST_STD), 1, p, generator, device)
        t = torch.eye(4, device=device).repeat(batch, 1, 1)
        t[:, :3, :3] *= s[:, None, None]
        c = t @ c
    if "hue" in ops:
        a = _gate((_rand(batch, generator, device) * 2 - 1) * math.pi * HUE_MAX, 0, p, generator, device)
        c = _rotate_about(luma[:3], a) @ c
    if "saturation" in ops:
        s = _gate(torch.exp2(_randn(batch, generator, device) * SATURATION_STD), 1, p, generator, device)
        outer = torch.outer(luma, luma)
        t = outer + (torch.eye(4, device=device) - outer) * s[:, None, None]
        t[:, 3, 3] = 1
        c = t @ c
    return c


def _rotate_about(axis: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) homogeneous rotations by ``angle`` (B,) about the unit 3-vector ``axis`` (Rodrigues)."""
    x, y, z = axis
    k = torch.tensor([[0, -z, y], [z, 0, -x], [-y, x, 0]], device=angle.device)
    s, c = torch.sin(angle)[:, None, None], torch.cos(angle)[:, None, None]
    r = torch.eye(3, device=angle.device) + s * k + (1 - c) * (k @ k)
    out = torch.eye(4, device=angle.device).repeat(len(angle), 1, 1)
    out[:, :3, :3] = r
    return out


def warp(x: torch.Tensor, matrix: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Resample x (B, C, H, W) float through ``matrix`` (B, 3, 3), reflection padding; 'bilinear' or 'nearest'."""
    grid = F.affine_grid(matrix[:, :2, :].to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="reflection", align_corners=False)


def apply_color(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Apply (B, 4, 4) colour matrices to RGB images (B, 3, H, W)."""
    b, c, h, w = images.shape
    if c != 3:
        raise ValueError(f"colour augmentation needs RGB images, got {c} channels")
    m = matrix.to(images.dtype)
    flat = images.reshape(b, 3, h * w)
    return (m[:, :3, :3] @ flat + m[:, :3, 3:]).reshape(b, 3, h, w)


def augment(images: torch.Tensor, p: float, generator: torch.Generator | None = None, *,
            geometric_ops: tuple[str, ...] = GEOMETRIC_OPS, color_ops: tuple[str, ...] = COLOR_OPS) -> dict:
    """Augment a batch of images (B, 3, H, W); returns {"images": ...}. With p == 0 the input is returned
    unchanged (no resampling at all)."""
    out = {"images": images}
    if p <= 0:
        return out
    b, _, h, w = images.shape
    if geometric_ops:
        out["images"] = warp(images, sample_geometry(b, p, (h, w), generator, images.device, geometric_ops))
    if color_ops:
        out["images"] = apply_color(out["images"], sample_color(b, p, generator, images.device, color_ops))
    return out


class AdaptiveAugmentation:
    """ADA's controller: raise p when the discriminator is too sure of the reals, lower it otherwise.

    The overfitting heuristic r_t = E[sign(D(real))] is compared with ``target`` (0.6) after each update
    interval; p moves by (images in the interval) / ``speed_images``, so it can go from 0 to 1 in that many
    images. ``target=None`` keeps p fixed.
    """

    def __init__(self, p: float = 0.0, target: float | None = 0.6, speed_images: int = 100_000):
        self.p, self.target, self.speed_images = float(p), target, speed_images
        self._signs, self._count = 0.0, 0

    def accumulate(self, real_logits: torch.Tensor) -> None:
        self._signs += float(torch.sign(real_logits.detach().float()).sum())
        self._count += real_logits.numel()

    def update(self, images_seen: int) -> float | None:
        """Adjust p from the logits accumulated since the last update; returns r_t (None if nothing to use)."""
        if self.target is None or self._count == 0:
            return None
        rt = self._signs / self._count
        step = images_seen / self.speed_images
        self.p = min(max(self.p + (step if rt > self.target else -step), 0.0), 1.0)
        self._signs, self._count = 0.0, 0
        return rt
