"""Plain image folders (no labels): GAN training data and images to invert."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from handsoff.data.layout import DatasetError, read_image
from handsoff.fileio import visible_files

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class ImageFolder:
    """The images of a folder and its subfolders (its ``images/`` subfolder if it is a handsoff labeled dataset),
    hidden files and folders excepted (``fileio.visible_files``), read lazily.

    Every image must be readable as 8-bit RGB (``layout.to_rgb8``: grey, palette and 16-bit images convert
    exactly) and ``resolution`` x ``resolution``, or, with ``resize``, of any size (then resized to the square
    with a Lanczos filter, antialiased when shrinking; a non-square image is stretched, as its labels are when the
    label generator is fitted: labeled images for inversion, whose labels stay at the label resolution); anything
    else is an error naming the file. ``batch(indices)`` returns (B, 3, R, R) float32 in
    [-1, 1]; ``names`` are the file stems (relative paths without suffix for images in subfolders).
    """

    def __init__(self, root: str | Path, resolution: int, resize: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"{root}: image folder does not exist")
        folder = root / "images" if (root / "dataset.json").is_file() and (root / "images").is_dir() else root
        self.files = [p for p in visible_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.files:
            raise DatasetError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        self.root, self.resolution, self.resize = folder, resolution, resize
        # Names key latents and labels: the file stem, with its subfolder if it is in one (so they are unique).
        self.names = [p.relative_to(folder).with_suffix("").as_posix() for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        path = self.files[index]
        array = read_image(path)
        h, w = array.shape[:2]
        if (h, w) == (self.resolution, self.resolution):
            return array
        if self.resize:
            from PIL import Image

            size = (self.resolution, self.resolution)
            return np.asarray(Image.fromarray(array).resize(size, Image.Resampling.LANCZOS))
        raise DatasetError(f"{path}: image is {w}x{h}, expected {self.resolution}x{self.resolution} (the "
                           "generator's resolution; resize the data first)")

    def batch(self, indices) -> torch.Tensor:
        arrays = np.stack([self.read(int(i)) for i in indices])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1
