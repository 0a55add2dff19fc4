"""Plain image folders (no labels): GAN training data and images to invert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from handsoff.data.layout import DatasetError, read_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class ImageFolder:
    """The images of a folder (its ``images/`` subfolder if it is a handsoff labeled dataset), read lazily.

    Every image must be ``resolution`` x ``resolution`` and readable as 8-bit RGB
    (``layout.to_rgb8``: grey, palette and 16-bit images convert exactly); anything else is an error naming the file.
    ``batch(indices)`` returns (B, 3, R, R) float32 in [-1, 1]; ``names`` are the file stems
    (relative paths without suffix for images in subfolders).
    """

    def __init__(self, root: str | Path, resolution: int):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: image folder does not exist")
        folder = root / "images" if (root / "dataset.json").is_file() and (root / "images").is_dir() else root
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DatasetError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        self.root, self.resolution = folder, resolution
        # Names key latents and labels: the file stem, with its subfolder if it is in one (so they are unique).
        self.names = [p.relative_to(folder).with_suffix("").as_posix() for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        path = self.files[index]
        array = read_image(path)
        if array.shape != (self.resolution, self.resolution, 3):
            raise DatasetError(f"{path}: image is {array.shape[1]}x{array.shape[0]}, expected "
                               f"{self.resolution}x{self.resolution} (the generator's resolution; resize the data "
                               "first)")
        return array

    def batch(self, indices) -> torch.Tensor:
        arrays = np.stack([self.read(int(i)) for i in indices])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1
