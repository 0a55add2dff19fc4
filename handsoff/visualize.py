"""Turning image tensors into files a person looks at."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


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
    """Save via a temporary file in the same folder, then rename, so a killed run leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    os.replace(tmp, path)
    return path
