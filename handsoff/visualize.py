"""Turning image tensors into files a person looks at."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handsoff.fileio import atomic_save


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [-1, 1] -> (B, H, W, C) uint8, values clipped."""
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> Image.Image:
    """Tile (B, C, H, W) images in [-1, 1] into one RGB image, ``columns`` wide (default: about square)."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    columns = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, np.uint8)
    for i in range(b):
        r, col = divmod(i, columns)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[i]
    return Image.fromarray(grid.squeeze(-1) if c == 1 else grid)


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save an image (format from the suffix, PNG by default) without ever leaving a half-written file."""
    fmt = (Path(path).suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG")
    return atomic_save(path, lambda tmp: image.save(tmp, format=fmt))


def depth_to_rgb(depth: np.ndarray) -> np.ndarray:
    """(H, W) depth -> (H, W, 3) uint8, near = bright yellow, far = dark purple.

    Colours follow each pixel's depth rank within the image, so the relief of a near object stays visible next
    to a far background.
    """
    d = depth.astype(np.float32).reshape(-1)
    rank = np.empty(d.size, np.float32)
    rank[np.argsort(d, kind="stable")] = np.arange(d.size)
    return _colormap(1 - (rank / max(d.size - 1, 1)).reshape(depth.shape))


def _colormap(t: np.ndarray) -> np.ndarray:
    """t in [0, 1] -> viridis-like RGB uint8 (0 dark purple, 1 bright yellow)."""
    stops = np.array([[68, 1, 84], [33, 145, 140], [253, 231, 37]], np.float32)
    t = np.clip(t, 0, 1)
    lo = np.clip((t * 2).astype(int), 0, 1)
    frac = (t * 2 - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


def heat_to_rgb(values: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """(H, W) non-negative values (e.g. per-pixel uncertainty) -> (H, W, 3) uint8; 0 dark, ``vmax`` (default:
    the map's maximum) and above bright."""
    v = np.asarray(values, np.float32)
    vmax = float(v.max()) if vmax is None else vmax
    return _colormap(v / vmax if vmax > 0 else np.zeros_like(v))


def label_panels(sample: dict, colors, scale: int = 2) -> Image.Image:
    """One sample side by side, upscaled ``scale`` times: image | overlay | extra panels, each task drawing its
    label (``paint``: segmentation blends its mask into the overlay, depth adds a panel; ``mark``: keypoints are
    drawn on the overlay after upscaling)."""
    from PIL import ImageDraw

    from handsoff.tasks import sample_tasks

    image = sample["image"]
    h, w = image.shape[:2]
    panels = [image, image.copy()]
    tasks = sample_tasks(sample)
    for task in tasks:
        task.paint(panels, sample[task.sample_key], colors)
    strip = Image.fromarray(np.concatenate(panels, axis=1)).resize((w * len(panels) * scale, h * scale),
                                                                     Image.NEAREST)
    draw = ImageDraw.Draw(strip)
    for task in tasks:
        task.mark(draw, sample[task.sample_key], (w * scale, 0), scale)
    return strip


def contact_sheet(folder, n: int = 16, columns: int = 2, scale: int = 2) -> Image.Image:
    """The first n samples of a ``LabeledFolder`` with their labels, in a grid of ``columns`` strips."""
    from handsoff.data.layout import default_color

    card = folder.card
    colors = card.colors or [tuple(default_color(i)) for i in range(len(card.classes or []))]
    return strip_sheet([label_panels(folder.load(name), colors, scale) for name in folder.names[:n]], columns)


def strip_sheet(strips: list[Image.Image], columns: int = 2) -> Image.Image:
    """Equal-sized strips (e.g. from ``label_panels``) in a grid of ``columns``, on white."""
    sw, sh = strips[0].size
    rows = -(-len(strips) // columns)
    sheet = Image.new("RGB", (columns * (sw + 4) + 4, rows * (sh + 4) + 4), (255, 255, 255))
    for i, strip in enumerate(strips):
        r, c = divmod(i, columns)
        sheet.paste(strip, (4 + c * (sw + 4), 4 + r * (sh + 4)))
    return sheet
