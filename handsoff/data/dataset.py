"""A ``torch.utils.data.Dataset`` over the standard layout, with joint geometric augmentation.

Crop, resize and horizontal flip act on every label consistently: the image is resampled bilinearly
(antialiased), masks and depth by nearest neighbour (class ids stay ids, depth values stay measured values),
keypoints by the same affine map with left/right names swapped on flips and visibility 0 once outside.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F


def joint_transform(sample: dict, out_size: tuple[int, int], box: tuple[float, float, float, float],
                    flip: bool, flip_permutations: dict | None = None) -> dict:
    """Crop ``box`` = (x0, y0, width, height) (rounded to whole pixels), resize to out_size = (H, W), flip.

    Returns tensors: image (3, H, W) float in [-1, 1], and each label the sample holds as its task's ``transform``
    gives it (mask (H, W) int64; depth (1, H, W) float32; keypoints (K, 3) float32 in output pixels with pixel
    centres at +0.5). ``flip_permutations``: task name -> its labels' left/right permutation (``flip_permutation``).
    """
    from handsoff.tasks import sample_tasks

    out_h, out_w = out_size
    x0, y0, bw, bh = (int(round(v)) for v in box)  # whole pixels, so image and labels see the same crop
    out = {"name": sample["name"]}
    img = torch.from_numpy(np.array(sample["image"])).permute(2, 0, 1).float()[None] / 127.5 - 1
    h, w = img.shape[-2:]
    if x0 < 0 or y0 < 0 or x0 + bw > w or y0 + bh > h:
        raise ValueError(f"crop box {box} outside the {w}x{h} image {sample['name']}")
    crop = img[..., y0:y0 + bh, x0:x0 + bw]
    image = F.interpolate(crop, size=out_size, mode="bilinear", align_corners=False, antialias=True)[0]
    # Nearest-neighbour source index of every output pixel centre.
    cols = np.clip(np.floor(x0 + (np.arange(out_w) + 0.5) * bw / out_w), 0, w - 1).astype(np.int64)
    rows = np.clip(np.floor(y0 + (np.arange(out_h) + 0.5) * bh / out_h), 0, h - 1).astype(np.int64)
    if flip:
        image = image.flip(-1)
        cols = cols[::-1]
    out["image"] = image.clamp(-1, 1)
    for task in sample_tasks(sample):
        permutation = (flip_permutations or {}).get(task.name) if flip else None
        out[task.sample_key] = task.transform(sample[task.sample_key], rows, cols, (x0, y0, bw, bh), out_size, flip,
                                              permutation)
    return out


class LabeledImageDataset(torch.utils.data.Dataset):
    """Samples of a standard-layout dataset as tensors (see ``joint_transform`` for shapes and ranges).

    Args:
        root: dataset folder.
        size: output size (square), default the images' own size (then all images must share it).
        augment: random square crops covering ``crop_scale`` of the shorter side, and flips with ``flip_p``.
        seed: augmentation seed; sample i of epoch e is always transformed the same way.
    """

    def __init__(self, root: str | os.PathLike, size: int | None = None, augment: bool = False,
                 crop_scale: tuple[float, float] = (0.8, 1.0), flip_p: float = 0.5, seed: int = 0):
        from handsoff.data.webdataset import open_labeled

        self.folder = open_labeled(root)  # a standard-layout folder, or WebDataset shards
        self.card = self.folder.card
        self.size, self.augment, self.crop_scale, self.flip_p, self.seed = size, augment, crop_scale, flip_p, seed
        self.epoch = 0
        from handsoff.tasks import card_tasks

        self.flip_permutations = {t.name: t.flip_permutation(self.card) for t in card_tasks(self.card)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict:
        sample = self.folder.load(self.folder.names[index])
        h, w = sample["image"].shape[:2]
        out_size = (self.size, self.size) if self.size else (h, w)
        box, flip = (0.0, 0.0, float(w), float(h)), False
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            side = max(1, int(min(h, w) * rng.uniform(*self.crop_scale)))
            box = (int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1)), side, side)
            flip = bool(rng.uniform() < self.flip_p)
        return joint_transform(sample, out_size, box, flip, self.flip_permutations)


MIRROR_SUFFIX = "-mirror"


def write_mirrored_dataset(source: str | os.PathLike, out: str | os.PathLike) -> os.PathLike:
    """The labeled dataset ``source`` (standard layout) plus the left-right mirror of every sample, named
    NAME-mirror, written to ``out`` (reused when already complete: dataset.json is written last).

    The image is flipped exactly (no resampling); labels as ``joint_transform`` flips them, with left/right
    classes and keypoints swapped by the card's flip pairs, so a mirrored sample is a correct sample only where
    the card names its left/right pairs. Twice the examples for the label generator at the cost of inverting
    each image twice (HandsOff fits on the labeled images alone).
    """
    from pathlib import Path

    from handsoff.data.layout import DatasetWriter, LabeledFolder
    from handsoff.tasks import card_tasks

    out = Path(out)
    if (out / "dataset.json").exists():
        return out
    folder = LabeledFolder(source)
    permutations = {t.name: t.flip_permutation(folder.card) for t in card_tasks(folder.card)}
    writer = DatasetWriter(out, folder.card, overwrite=True)  # a folder left by a kill is rewritten whole
    for name in folder.names:
        sample = folder.load(name)
        h, w = sample["image"].shape[:2]
        mirrored = joint_transform(sample, (h, w), (0, 0, w, h), True, permutations)
        labels = {key: value for key, value in sample.items() if key not in ("name", "image")}
        writer.add(name, sample["image"], **labels)
        # Back to the stored shapes (joint_transform gives depth a channel axis).
        writer.add(name + MIRROR_SUFFIX, np.ascontiguousarray(sample["image"][:, ::-1]),
                   **{key: mirrored[key].numpy().reshape(np.shape(value)) for key, value in labels.items()})
    return writer.close()
